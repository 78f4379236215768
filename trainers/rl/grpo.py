"""GRPO (DeepSeekMath, arXiv 2402.03300): no critic; each response's advantage is its reward standardised within
the group of samples of its prompt, for every token; a k3 KL penalty (beta 0.04) to the frozen initial policy;
symmetric clipping (eps 0.2) and per-response loss averaging. Rollouts, rewards and the update loop are VAPO's
(trainers/rl/actor_critic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.rl import actor_critic


@dataclass
class Config(actor_critic.RLConfig):
    """GRPO's switches: group advantages, KL to the reference policy."""

    advantage: Literal["gae", "group"] = "group"
    eps_high: float = 0.2
    token_level: bool = False
    nll_coef: float = 0.0
    value_pretrain_steps: int = 0
    kl_coef: float = 0.04


TINY = Config(d_model=32, n_layers=1, n_heads=2, max_new_tokens=6, group_size=2, minibatches=2)

SPEC = actor_critic.trainer_spec(
    "grpo", "GRPO baseline for verifiable-reward RL (DeepSeekMath, arXiv 2402.03300)", Config, TINY
)
