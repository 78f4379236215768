"""What one training step is: the language model's sizes, the batch, the parallel layout and the precision.

A `Workload` is read from an `lm` experiment file (`from_spec`) or built by the planner for each candidate layout.
The project's trainer (trainers/lm.py under launch.py) runs data parallelism with DDP or DeepSpeed ZeRO 0-3;
tensor (`tp`) and pipeline (`pp`) parallelism are modelled the Megatron way for planning only (`runnable` says
whether the orchestrator can run a layout as it is).

Memory per device (`memory_bytes`), in the usual accounting (ZeRO paper; Korthikanti et al. 2022 for activations):
    weights   P_dev x w            P_dev = P / (tp pp), / dp under ZeRO-3; w = 2 bytes bf16, 4 fp32
    gradients P_dev x w            / dp under ZeRO-2 and 3
    optimizer P_dev x (8 + 4 if bf16: fp32 master weights) AdamW moments, / dp under ZeRO-1, 2 and 3
    activations per layer and micro-batch b: s b d (10 + 24 / tp) w/2 bytes (fused attention: no s^2 scores),
              only the block inputs (s b d w) under activation checkpointing, plus one block's full set;
              1F1B keeps up to pp micro-batches of the first stage in flight; plus the logits s b V / tp x 4 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from orchestrator.spec import ExperimentSpec, Shown, SpecError

ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class Workload:
    d_model: int
    n_layers: int
    n_heads: int
    vocab: int
    seq_len: int
    batch: int  # global batch, sequences per optimizer step
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    checkpointing: bool = False  # activation checkpointing: recompute each block in the backward pass
    dtype: str = "float32"  # float32 or bfloat16
    dp: int = 1
    tp: int = 1
    pp: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step and data-parallel rank (the pipeline's m)
    zero: int | None = None  # DeepSpeed ZeRO stage, None: DDP
    clip_grad: bool = True

    def __post_init__(self) -> None:
        if self.batch % (self.dp * self.grad_accum):
            raise ValueError(f"batch {self.batch} is not a multiple of dp x grad_accum = {self.dp * self.grad_accum}")
        if self.n_layers % self.pp:
            raise ValueError(f"n_layers {self.n_layers} is not a multiple of pp {self.pp}")
        if self.n_heads % self.tp:
            raise ValueError(f"tp {self.tp} must divide n_heads {self.n_heads}")

    @property
    def micro_batch(self) -> int:
        return self.batch // (self.dp * self.grad_accum)

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def word_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def runnable(self) -> bool:
        """The orchestrator's lm trainer runs data parallelism only (DDP or ZeRO)."""
        return self.tp == 1 and self.pp == 1

    @property
    def vocab_shard(self) -> int:
        """Vocabulary rows per tensor-parallel rank (padded up to a multiple of tp, as Megatron pads)."""
        return -(-self.vocab // self.tp)

    def layer_params(self) -> int:
        d, h = self.d_model, self.hidden
        return 4 * d * d + 2 * d * h + h + d + 4 * d  # q, k, v, o (no bias); MLP with biases; two LayerNorms

    def module_tensors(self) -> list[list[int]]:
        """Elements of each parameter tensor, module by module in forward order, of the largest stage on one
        tensor-parallel rank: the embedding; per block norm_1, q, k, v, o, norm_2 and the MLP's two linears (with
        biases); the final norm."""
        d, h, t = self.d_model, self.hidden, self.tp
        block = [[d, d], *[[d * d // t]] * 4, [d, d], [h * d // t, h // t], [d * h // t, d]]
        return [[self.vocab_shard * d], *block * (self.n_layers // self.pp), [d, d]]

    def module_params(self) -> list[int]:
        return [sum(tensors) for tensors in self.module_tensors()]

    def modules(self) -> int:
        """Modules of trainers/lm.py's model that DeepSpeed hooks (every one, parameters or not) on the largest
        stage: the step wrapper, the model, the embedding, the block list and the final norm; per block the block,
        two norms, the attention and its four projections, the MLP with its two linears, GELU and dropout."""
        return 5 + 13 * (self.n_layers // self.pp)

    def embedding_params(self) -> int:
        return self.vocab * self.d_model

    def params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab * self.d_model
        return self.embedding_params() + self.n_layers * self.layer_params() + 2 * self.d_model + head

    def stage_params(self) -> int:
        """Parameters held by the largest pipeline stage's device (its layers plus the embedding), before ZeRO."""
        first = self.embedding_params() + (self.n_layers // self.pp) * self.layer_params()
        if self.pp == 1:
            return self.params() // self.tp
        last = self.embedding_params() + (self.n_layers // self.pp) * self.layer_params() + 2 * self.d_model
        return max(first, last) // self.tp

    def memory_bytes(self) -> dict[str, float]:
        """Estimated peak bytes per device, by part."""
        p, w, zero = self.stage_params(), self.word_bytes, self.zero or 0
        optimizer = p * (ADAM_BYTES + (4 if w == 2 else 0))
        parts = {
            "weights": p * w / (self.dp if zero >= 3 else 1),
            "gradients": p * w / (self.dp if zero >= 2 else 1),
            "optimizer": optimizer / (self.dp if zero >= 1 else 1),
        }
        s, b, d = self.seq_len, self.micro_batch, self.d_model
        full_layer = s * b * d * (10 + 24 / self.tp) * w / 2
        layers = self.n_layers // self.pp
        per_micro = layers * s * b * d * w + full_layer if self.checkpointing else layers * full_layer
        parts["activations"] = per_micro * min(self.pp, self.grad_accum)
        parts["logits"] = s * b * self.vocab_shard * 4 * 2  # fp32 logits and their gradient
        parts["total"] = sum(parts.values())
        return parts

    def with_layout(self, **layout: Any) -> Workload:
        return replace(self, **layout)


def from_spec(spec: ExperimentSpec, path: str = "<memory>") -> Workload:
    """The workload of an `lm` experiment file as the orchestrator would run it."""
    if spec.method != "lm":
        raise SpecError(path, "method", "the performance model covers the language-model trainer (method: lm)",
                        Shown(spec.method))
    cfg = spec.method_config()
    for key, modelled in (("attention", "rope"), ("output", "softmax")):
        if getattr(cfg, key) != modelled:
            raise SpecError(path, f"config.{key}", f"{modelled!r}: the operators of the {key} variant "
                            f"{getattr(cfg, key)!r} are not in the performance model", Shown(getattr(cfg, key)))
    ds = spec.resources.deepspeed
    on_gpu = spec.resources.gpus_per_worker > 0
    return Workload(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio,
                    vocab=spec.data.vocab_size, seq_len=spec.data.seq_len, batch=spec.optim.batch_size,
                    tie_embeddings=cfg.tie_embeddings or cfg.output != "softmax",
                    checkpointing=cfg.activation_checkpointing,
                    dtype="bfloat16" if on_gpu and spec.optim.amp else "float32", dp=spec.resources.workers,
                    grad_accum=spec.optim.grad_accum, zero=None if ds is None else ds.zero_stage,
                    clip_grad=spec.optim.clip_grad_norm is not None)
