"""Supervised warm start of a policy for RL: next-token NLL of each problem's reference solution given its prompt.

    L_SFT = - 1/sum_i |y_i| sum_i sum_t log pi(y_{i,t} | q_i, y_{i,<t})     y_i = solution_i + end token

The RL methods (ppo, grpo, vapo) start from its checkpoint with `config.init_from: run:<this run's name>`. Its
evaluation is theirs: greedy accuracy of the verifier on the test problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainers._common.contract import Batch, DataInfo, TrainerSpec
from trainers.rl.common import (
    PolicyConfig,
    check_policy,
    eval_step,
    ids_device,
    load_actor,
    read_problems,
    teacher_forced,
)
from trainers.rl.objectives import masked_mean
from trainers.rl.policy import build_backbone, response_log_probs
from trainers.rl.tasks import from_bytes


@dataclass
class Config(PolicyConfig):
    """Supervised fine-tuning on the reference solutions; the policy fields of trainers/rl/common.py."""


TINY = Config(d_model=32, n_layers=1, n_heads=2, max_new_tokens=6)


class PolicyModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.actor = build_backbone(cfg.policy, cfg.d_model, cfg.n_layers, cfg.n_heads)
        if cfg.init_from:
            load_actor(self.actor, cfg.init_from)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return PolicyModel(cfg)


def train_step(model: PolicyModel, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    tokenizer = model.actor.tokenizer
    ids, mask, _ = read_problems(batch, tokenizer, ids_device(model))
    seqs = teacher_forced(tokenizer, ids, mask, from_bytes(batch["solution"].cpu().numpy()))
    log_probs, _ = response_log_probs(model.actor, seqs)
    return masked_mean(-log_probs, seqs.response_mask), {}


SPEC = TrainerSpec(
    name="sft",
    paper="Supervised warm start of a policy for verifiable-reward RL (VAPO, arXiv 2504.05118)",
    Config=Config,
    TINY=TINY,
    views="problems",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    check=check_policy,
    path_fields=("init_from",),
)
