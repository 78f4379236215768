"""What the supervised warm start and the RL methods share: the policy's config fields, its initial weights,
reading a batch of problems, and the evaluation (greedy accuracy on the test problems).

Batches carry text as zero-padded UTF-8 rows (orchestrator/data/reasoning.py): "prompt", "answer" and "solution",
each (B, W) uint8. The method tokenizes them with its policy's tokenizer, so the data does not depend on the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers._common.contract import Batch, ConfigError
from trainers.rl.policy import Sequences, decode_responses, generate, left_pad
from trainers.rl.tasks import from_bytes, get_verifier


@dataclass
class PolicyConfig:
    """The policy and how its answers are checked."""

    policy: str = "tiny"  # "tiny": the project's LM over bytes; else a local Hugging Face causal-LM directory
    d_model: int = 128  # tiny policy only
    n_layers: int = 4
    n_heads: int = 4
    init_from: str = ""  # a checkpoint (model.pt) whose `actor.` weights start the policy, e.g. run:<sft run>
    max_new_tokens: int = 16  # response budget (the paper's long CoT: thousands)
    verifier: str = "last_number"  # last_number | exact | module:function (trainers/rl/tasks.py)
    eval_samples: int = 4  # k of eval/accuracy_avg{k} (avg@k): samples per test prompt at temperature 1 (the paper: 32)


def check_policy(cfg: PolicyConfig) -> None:
    if cfg.policy != "tiny" and not (Path(cfg.policy) / "config.json").is_file():
        raise ConfigError("policy", "'tiny' or a Hugging Face model directory holding config.json", cfg.policy)
    if cfg.init_from and not _model_file(cfg.init_from).is_file():
        raise ConfigError("init_from", "a checkpoint directory holding model.pt, a model.pt file, run:<name> or "
                          "mlflow:<run_id>", cfg.init_from)
    try:
        get_verifier(cfg.verifier)
    except (ValueError, TypeError) as err:
        raise ConfigError("verifier", "last_number, exact or an importable module:function", cfg.verifier) from err
    if cfg.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", "at least 1", cfg.max_new_tokens)
    if cfg.eval_samples < 0:
        raise ConfigError("eval_samples", "0 (greedy accuracy only) or more", cfg.eval_samples)


def _model_file(init_from: str) -> Path:
    path = Path(init_from)
    return path / "model.pt" if path.is_dir() else path


def load_actor(actor: nn.Module, init_from: str) -> None:
    """The `actor.` entries of a checkpoint's model state into `actor` (an SFT or an RL run's checkpoint)."""
    state = torch.load(_model_file(init_from), map_location="cpu", weights_only=True)
    actor_state = {k.removeprefix("actor."): v for k, v in state.items() if k.startswith("actor.")}
    if not actor_state:
        raise ValueError(f"init_from {init_from}: the checkpoint has no actor.* weights (not an sft/ppo/grpo/vapo run)")
    try:
        actor.load_state_dict(actor_state)
    except RuntimeError as err:
        raise ValueError(f"init_from {init_from}: its policy does not fit this config's: {err}") from None


def read_problems(batch: Batch, tokenizer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Tokenized, left-padded prompts (B, P) with their mask, and the answers as strings."""
    prompts = [tokenizer.encode(p) for p in from_bytes(batch["prompt"].cpu().numpy())]
    ids, mask = left_pad(prompts, tokenizer.pad_id, device)
    return ids, mask, from_bytes(batch["answer"].cpu().numpy())


def teacher_forced(tokenizer: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   responses: list[str]) -> Sequences:
    """Prompts followed by the given response texts and the end token: what supervised training reads."""
    tokens = [tokenizer.encode(r) + [tokenizer.eos_id] for r in responses]
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.bool)
    for row, t in enumerate(tokens):
        ids[row, : len(t)], mask[row, : len(t)] = torch.tensor(t), True
    device = prompt_ids.device
    return Sequences(torch.cat([prompt_ids, ids.to(device)], 1), torch.cat([prompt_mask, mask.to(device)], 1),
                     prompt_ids.shape[1])


def check_answers(cfg: PolicyConfig, tokenizer: Any, seqs: Sequences, answers: list[str],
                  device: torch.device) -> torch.Tensor:
    """1.0 where the verifier accepts the response: (N,)."""
    verifier = get_verifier(cfg.verifier)
    texts = decode_responses(tokenizer, seqs)
    return torch.tensor([float(verifier(t, a)) for t, a in zip(texts, answers)], device=device)


@torch.no_grad()
def eval_step(model: nn.Module, batch: Batch, cfg: PolicyConfig) -> dict[str, torch.Tensor]:
    """Per test prompt: the greedy response's accuracy and length, and the mean accuracy of eval_samples samples
    at temperature 1 (avg@k); sums and the count."""
    tokenizer = model.actor.tokenizer
    ids, mask, answers = read_problems(batch, tokenizer, ids_device(model))
    greedy = generate(model.actor, ids, mask, cfg.max_new_tokens, greedy=True)
    sums = {"accuracy": check_answers(cfg, tokenizer, greedy, answers, ids.device).sum(),
            "response_length": greedy.response_mask.sum(), "n": torch.tensor(float(len(answers)), device=ids.device)}
    if cfg.eval_samples:
        k = cfg.eval_samples
        sampled = generate(model.actor, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), cfg.max_new_tokens)
        correct = check_answers(cfg, tokenizer, sampled, [a for a in answers for _ in range(k)], ids.device)
        sums[f"accuracy_avg{k}"] = correct.sum() / k
    return sums


def ids_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
