"""Decoder-only language model with pluggable attention and output layer (ComplexFormer, VQ-Logits).

Spec: ../shared/papers/methods_nas_gen_llm.md sections 7 (ComplexFormer) and 8 (VQ-Logits).

    h_0 = E[x]                                        token embedding, no absolute positions (both attentions
    h_l = h_{l-1} + Attn(LN(h_{l-1}))                 encode positions themselves)
    h_l = h_l + MLP(LN(h_l))                          MLP: Linear(d, r d) - GELU - Linear(r d, d)
    p(x_{t+1} | x_<=t) = softmax(LN(h_L) W^T)         output "softmax": W = E when tied (GPT-2)
                       = VQ-Logits(LN(h_L))           output "vq": K codebook logits, exact cross-entropy over V

- attention "rope": causal multi-head attention with rotate-half RoPE, scores scaled by 1/sqrt(d_head).
- attention "complex": ComplexFormer's CMHA (lab_kernels/complex_attention.py): Euler transform of q and k, per-head
  adaptive phase delta * (theta_q - theta_k) + b plus the RoPE relative angle; unscaled scores as the official code
  (attention_scale: sqrt is the ablation). delta = 1, b = 0 is exactly RoPE.
- output "vq": codebook of K = num_codes vectors and a fixed token->code mapping: contiguous blocks or a seeded
  random balanced assignment (codebook drawn from N(0, vq_codebook_std^2)), or "kmeans", the official
  `kmeans_on_C_init`: k-means of the output embeddings of a softmax LM checkpoint `vq_init_from` (a checkpoint
  directory holding model.pt, a model.pt, or mlflow:<run_id> / run:<name>; the tied `embed.weight`, or `head.weight`
  when untied); the centroids are the codebook, the labels the mapping. With vq_init_body the token embedding,
  the blocks and the final norm start from that checkpoint too.

Sizes (Config fields d_model / n_layers / n_heads): TINY 64/2/4 for tests; the defaults are GPT-2 small
(768/12/12, about 124M parameters with V = 50k and tied embeddings); 2048/24/16 is about 1.3B.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lab_kernels.complex_attention import ComplexMultiHeadAttention, KVCache, RoPEMultiHeadAttention
from lab_kernels.vq_logits import CODEBOOK_STD, VQLogits
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers.supervised import model_file


@dataclass
class Config:
    """GPT-2-small-sized defaults with the RoPE / full-softmax baseline.

    VQ-Logits defaults, measured (benchmarks/results/lm_vq.md: V = 8192, K = 1024, d = 128, 150 steps on the stdlib
    corpus, mean validation perplexity of seeds 0 and 1; softmax 376): the codebook starts at std 0.02, not the
    official code's std 1 (contiguous 643 vs 2426, random 980 vs 7045; with layer-normed hidden states std 1 gives
    initial logits of std sqrt(d), a loss near 30 nats); without a checkpoint the mapping stays contiguous (random:
    980; BPE ids follow merge order, so a block probably holds tokens of similar frequency). Best is vq_mapping:
    kmeans with the body (vq_init_body): 40 softmax steps, k-means, 110 VQ steps give 396 (+5%), and 289 at the
    softmax's wall time; k-means of the mapping alone with a fresh body gives 637. K = 256 ranks them the same
    (lm_vq256.md).
    """

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    attention: Literal["rope", "complex"] = "rope"
    attention_scale: Literal["default", "none", "sqrt"] = "default"  # default: sqrt for rope, none for complex
    attention_compiled: bool = False  # complex: q/k rotation fused by torch.compile (needs a C++ compiler on CPUs)
    rope_base: float = 10000.0
    output: Literal["softmax", "vq"] = "softmax"
    tie_embeddings: bool = True  # softmax output only: W = E
    num_codes: int = 1024  # VQ-Logits K
    vq_mapping: Literal["contiguous", "random", "kmeans"] = "contiguous"
    vq_codebook_std: float = CODEBOOK_STD  # initial codebook N(0, std^2) for contiguous / random
    vq_init_from: str = ""  # kmeans: the softmax LM's checkpoint directory, model.pt or mlflow:<run_id>
    vq_init_body: bool = True  # kmeans: also start embedding, blocks and final norm from vq_init_from
    dropout: float = 0.0
    activation_checkpointing: bool = False  # recompute each block in the backward pass


TINY = Config(d_model=64, n_layers=2, n_heads=4, num_codes=32)


class TokenEmbedding(nn.Embedding):
    """The token embedding E, also the tied output layer: forward(ids) looks tokens up, forward(h) with float
    hidden states gives the logits h E^T. Both go through `forward`, where ZeRO-3 gathers E (a weight read outside
    its module's forward would be an empty shard)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, L, D); (..., D) -> (..., V)
        return super().forward(x) if not x.is_floating_point() else F.linear(x, self.weight)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: Config):
        super().__init__()
        scale = {"default": {}, "none": {"scale": "none"}, "sqrt": {"scale": "sqrt"}}[cfg.attention_scale]
        attention = ComplexMultiHeadAttention if cfg.attention == "complex" else RoPEMultiHeadAttention
        self.norm_1 = nn.LayerNorm(cfg.d_model)
        options = {**scale, "compiled": cfg.attention_compiled} if cfg.attention == "complex" else scale
        self.attention = attention(cfg.d_model, cfg.n_heads, base=cfg.rope_base, dropout=cfg.dropout, **options)
        self.norm_2 = nn.LayerNorm(cfg.d_model)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        h = h + self.attention(self.norm_1(h), positions, cache, key_mask)
        return h + self.mlp(self.norm_2(h))


class LanguageModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.vq = self._vq_output(cfg, vocab_size) if cfg.output == "vq" else None
        untied = cfg.output == "softmax" and not cfg.tie_embeddings
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False) if untied else None

    @staticmethod
    def _vq_output(cfg: Config, vocab_size: int) -> VQLogits:
        if cfg.vq_mapping != "kmeans":
            return VQLogits(cfg.d_model, vocab_size, cfg.num_codes, init=cfg.vq_mapping,
                            codebook_std=cfg.vq_codebook_std)
        embeddings = output_embeddings(load_softmax_state(cfg.vq_init_from))  # (V, D)
        if embeddings.shape != (vocab_size, cfg.d_model):
            raise ValueError(f"vq_init_from {cfg.vq_init_from}: output embeddings {tuple(embeddings.shape)}, this "
                             f"model needs ({vocab_size}, {cfg.d_model})")
        return VQLogits.from_embeddings(embeddings, cfg.num_codes)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               caches: list[KVCache] | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) int64 -> (B, L, D). Padded batches give per-sequence `positions` (B, L) and `key_mask` (B, T) of
        the real tokens; incremental decoding passes one KVCache per block (see lab_kernels/complex_attention.py)."""
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            extra = (positions, caches[i] if caches else None, key_mask)
            recompute = self.cfg.activation_checkpointing and self.training
            h = checkpoint(block, h, *extra, use_reentrant=False) if recompute else block(h, *extra)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V) of the softmax output
        return self.head(h) if self.head is not None else self.embed(h)

    def nll(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next tokens `labels` (B, L) given hidden states h (B, L, D)."""
        if self.vq is not None:
            return self.vq.loss(h, labels, reduction=reduction)
        logits = self.logits(h)  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V), for generation
        if self.vq is not None:
            return self.vq.log_probs(h)
        return torch.log_softmax(self.logits(h).float(), dim=-1)


def load_softmax_state(path: str) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint (directory or model.pt), memory-mapped."""
    return torch.load(model_file(path), map_location="cpu", weights_only=True, mmap=True)


def output_embeddings(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A softmax LM's output embeddings (V, D): `head.weight` when untied, else the tied `embed.weight`."""
    return state["head.weight"] if "head.weight" in state else state["embed.weight"]


def body_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything but the output layer: the token embedding, the blocks and the final norm."""
    return {k: v for k, v in state.items() if not k.startswith(("head.", "vq."))}


def check(cfg: Config) -> None:
    """vq_init_from is set exactly for the k-means mapping and is a softmax LM checkpoint of width d_model."""
    kmeans = cfg.output == "vq" and cfg.vq_mapping == "kmeans"
    wanted = "a softmax LM's checkpoint directory (holding model.pt), a model.pt file, or mlflow:<run_id>"
    if cfg.attention_compiled and cfg.attention != "complex":
        raise ConfigError("attention_compiled", "false unless attention: complex (RoPE has nothing to fuse)",
                          cfg.attention_compiled)
    if cfg.vq_codebook_std <= 0:
        raise ConfigError("vq_codebook_std", "a positive standard deviation", cfg.vq_codebook_std)
    if not kmeans:
        if cfg.vq_init_from:
            raise ConfigError("vq_init_from", "empty unless output: vq and vq_mapping: kmeans", cfg.vq_init_from)
        return
    if not cfg.vq_init_from or not model_file(cfg.vq_init_from).is_file():
        raise ConfigError("vq_init_from", f"{wanted} (vq_mapping: kmeans clusters its output embeddings)",
                          cfg.vq_init_from)
    try:
        state = load_softmax_state(cfg.vq_init_from)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError("vq_init_from", f"{wanted}; it does not load: {err}", cfg.vq_init_from) from None
    keys = ("head.weight", "embed.weight")
    if not isinstance(state, dict) or "vq.codebook" in state or not any(k in state for k in keys):
        raise ConfigError("vq_init_from", f"{wanted}; it holds no softmax output embeddings (head.weight or "
                          "embed.weight)", cfg.vq_init_from)
    width = output_embeddings(state).shape[-1]
    if width != cfg.d_model:
        raise ConfigError("vq_init_from", f"{wanted} of d_model={cfg.d_model}; its embeddings have width {width}",
                          cfg.vq_init_from)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    if not info.vocab_size:
        raise ValueError("the lm method needs a text dataset (data.dataset: text), found no vocabulary")
    model = LanguageModel(cfg, info.vocab_size)
    if model.vq is not None and cfg.vq_mapping == "kmeans" and cfg.vq_init_body:
        load_body(model, cfg.vq_init_from)
    return model


def load_body(model: LanguageModel, path: str) -> None:
    """Start everything but the VQ-Logits output layer from the softmax LM checkpoint `path`."""
    try:
        missing, unexpected = model.load_state_dict(body_state(load_softmax_state(path)), strict=False)
    except RuntimeError as err:
        raise ValueError(f"vq_init_from {path}: its body does not fit this model: {err}") from None
    missing = [k for k in missing if not k.startswith("vq.")]
    if missing or unexpected:
        raise ValueError(f"vq_init_from {path}: its body does not fit this model (missing {missing}, unexpected "
                         f"{unexpected})")


def train_step(model: LanguageModel, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    loss = model.nll(model.hidden(batch["input_ids"]), batch["labels"])
    return loss, {}


@torch.no_grad()
def eval_step(model: LanguageModel, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Summed next-token NLL and the token count: eval/loss is the mean NLL per token."""
    nll = model.nll(model.hidden(batch["input_ids"]), batch["labels"], reduction="sum")
    return {"loss": nll, "n": torch.tensor(float(batch["labels"].numel()), device=nll.device)}


def eval_summary(means: dict[str, float]) -> dict[str, float]:
    return {"ppl": math.exp(min(means["loss"], 50.0))}


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, or ComplexFormer's delta and b (delta = 1 is RoPE, so
    decaying it towards 0 would pull the attention away from its position encoding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or name.endswith(("attention.delta", "attention.bias"))
        (no_decay if exempt else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


SPEC = TrainerSpec(
    name="lm",
    paper="Decoder-only LM: RoPE / ComplexFormer (arXiv 2505.10222) attention, softmax / VQ-Logits (arXiv 2505.10202)",
    Config=Config,
    TINY=TINY,
    views="tokens",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    eval_summary=eval_summary,
    param_groups=param_groups,
    check=check,
    path_fields=("vq_init_from",),
)
