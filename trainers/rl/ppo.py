"""PPO for verifiable-reward reasoning: the baseline VAPO improves on (Schulman et al. 2017, as in VAPO's table).

One sample per prompt, GAE with lambda 0.95 for both the policy and the critic's targets, symmetric clipping
(eps 0.2), per-response loss averaging, no value pretraining and no LM loss. The loop is VAPO's
(trainers/rl/actor_critic.py) with those switches; gamma = 1 and the critic starts from the policy, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.rl import actor_critic


@dataclass
class Config(actor_critic.RLConfig):
    """Vanilla PPO's switches."""

    group_size: int = 1
    decoupled_gae: bool = False
    length_adaptive: bool = False
    lambda_policy: float = 0.95
    eps_high: float = 0.2
    token_level: bool = False
    nll_coef: float = 0.0
    value_pretrain_steps: int = 0


TINY = Config(d_model=32, n_layers=1, n_heads=2, max_new_tokens=6, minibatches=2)

SPEC = actor_critic.trainer_spec(
    "ppo", "PPO baseline for verifiable-reward RL (VAPO's vanilla PPO, arXiv 2504.05118)", Config, TINY
)
