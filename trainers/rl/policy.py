"""Policies and value models for RL fine-tuning, and batched generation with a key/value cache.

A backbone is a causal LM seen through four calls, so the rollout and losses read the same for both kinds:

    hidden(ids (B, L), positions (B, L), key_mask (B, T), cache) -> (B, L, D)   T = cached + L tokens
    logits(h (B, L, D)) -> (B, L, V)
    new_cache() -> an empty cache that `hidden` extends in place
    tokenizer

- TinyBackbone: the project's decoder-only LM (trainers/lm.py, RoPE attention) over UTF-8 bytes, for CPU runs.
- HFBackbone: any Hugging Face causal LM saved in a local directory (`save_pretrained` layout), for clusters.

Prompts are left-padded: positions count real tokens only (cumsum of the mask - 1), and padding is never attended
to, so a prompt gives the same logits whatever its padding. Generation runs the same number of forward passes on
every rank until all of them are done (ZeRO-3 gathers parameters collectively inside each forward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lab_kernels.complex_attention import KVCache
from trainers.lm import Config as LMConfig
from trainers.lm import LanguageModel
from trainers.rl.tasks import ByteTokenizer, HFTokenizer


class TinyBackbone(nn.Module):
    def __init__(self, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tokenizer = ByteTokenizer()
        lm_config = LMConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        self.lm = LanguageModel(lm_config, self.tokenizer.vocab_size)
        self.width = d_model

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
               cache: list[KVCache] | None = None) -> torch.Tensor:
        return self.lm.hidden(ids, positions, cache, key_mask)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(h)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.lm.blocks]


class HFBackbone(nn.Module):
    """AutoModelForCausalLM.from_pretrained(directory): its base model gives the hidden states, its output
    embedding the logits."""

    def __init__(self, directory: str):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.tokenizer = HFTokenizer(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        self.width = self.model.config.hidden_size
        parameters = inspect.signature(self.model.base_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
               cache: Any = None) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, attention_mask=key_mask.long(), position_ids=positions,
                                    use_cache=cache is not None, **{self.cache_argument: cache})
        return out.last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(h)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()


def build_backbone(policy: str, d_model: int, n_layers: int, n_heads: int) -> nn.Module:
    """"tiny": the project's LM of the given size; anything else: a local Hugging Face model directory."""
    return TinyBackbone(d_model, n_layers, n_heads) if policy == "tiny" else HFBackbone(policy)


class Critic(nn.Module):
    """A value model: its own backbone and a scalar head on each position's hidden state."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.hidden(ids, positions, key_mask)).squeeze(-1)  # (B, L)


# ------------------------------------------------------------------------------------------------ sequences


@dataclass
class Sequences:
    """Left-padded prompts followed by right-padded responses, the layout every forward pass uses."""

    ids: torch.Tensor  # (N, P + T) int64
    mask: torch.Tensor  # (N, P + T) bool: real tokens (prompt, response up to and including its end token)
    prompt_length: int  # P

    @property
    def positions(self) -> torch.Tensor:  # (N, P + T)
        return positions_of(self.mask)

    @property
    def response(self) -> torch.Tensor:  # (N, T)
        return self.ids[:, self.prompt_length:]

    @property
    def response_mask(self) -> torch.Tensor:  # (N, T) float
        return self.mask[:, self.prompt_length:].float()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens: (N, L) bool -> (N, L) int64, padding at 0."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def left_pad(token_lists: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (N, P) and mask (N, P), padded on the left to the longest."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = True
    return ids.to(device), mask.to(device)


def response_log_probs(backbone: nn.Module, seqs: Sequences, with_entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) of each response token, (N, T), and the policy's entropy there when asked. The
    logits at position P-1+t predict response token t."""
    p = seqs.prompt_length
    h = backbone.hidden(seqs.ids[:, :-1], seqs.positions[:, :-1], seqs.mask[:, :-1])[:, p - 1:]  # (N, T, D)
    log_probs = torch.log_softmax(backbone.logits(h).float(), dim=-1)  # (N, T, V)
    taken = log_probs.gather(-1, seqs.response[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return taken, entropy


def response_values(critic: Critic, seqs: Sequences) -> torch.Tensor:
    """V(s_t) of the state before each response token t, (N, T): the value at position P-1+t."""
    p = seqs.prompt_length
    return critic(seqs.ids[:, :-1], seqs.positions[:, :-1], seqs.mask[:, :-1])[:, p - 1:].float()


@torch.no_grad()
def generate(backbone: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False) -> Sequences:
    """Sample (or greedily decode) up to max_new_tokens per prompt, stopping each at the end token; one prefill
    pass over the prompts, then one cached pass per token. Tokens after a sequence's end are padding."""
    tokenizer = backbone.tokenizer
    cache = backbone.new_cache()
    positions = positions_of(prompt_mask)
    h = backbone.hidden(prompt_ids, positions, prompt_mask, cache)[:, -1:]  # (N, 1, D)
    next_position = positions[:, -1:] + 1  # (N, 1)
    mask, done, tokens = prompt_mask, torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device), []
    for step in range(max_new_tokens):
        logits = backbone.logits(h)[:, 0].float()  # (N, V)
        token = logits.argmax(-1) if greedy else torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
        token = torch.where(done, torch.full_like(token, tokenizer.pad_id), token)
        tokens.append(token)
        mask = torch.cat([mask, ~done[:, None]], dim=1)
        done = done | (token == tokenizer.eos_id)
        if step == max_new_tokens - 1 or _everyone_done(done):
            break
        h = backbone.hidden(token[:, None], next_position, mask, cache)
        next_position = next_position + 1
    ids = torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)
    return Sequences(ids, mask, prompt_ids.shape[1])


def _everyone_done(done: torch.Tensor) -> bool:
    """All sequences ended, on every rank (one all-reduce per token under a process group)."""
    flag = done.all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def decode_responses(tokenizer: Any, seqs: Sequences) -> list[str]:
    """Each response up to (not including) its end token."""
    texts = []
    for row, keep in zip(seqs.response.tolist(), seqs.response_mask.bool().tolist()):
        tokens = [t for t, k in zip(row, keep) if k and t != tokenizer.eos_id]
        texts.append(tokenizer.decode(tokens))
    return texts
