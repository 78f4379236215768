"""VAPO: value-based augmented PPO for verifiable-reward reasoning (ByteDance Seed, arXiv 2504.05118).

Spec: ../shared/papers/methods_nas_gen_llm.md section 9 (no official code; constants from third-party code and the
paper's ablation table). Every component is a Config switch, so the paper's ablations are one `--set` each:

    component                  on (VAPO)                          off (the ablation)
    Value-Pretraining          value_pretrain_steps: 50           value_pretrain_steps: 0
    Decoupled-GAE              decoupled_gae: true (lambda_c 1)   decoupled_gae: false (critic uses lambda_policy
                                                                  after value pretraining, which always regresses
                                                                  on Monte-Carlo returns)
    Length-adaptive GAE        length_adaptive: true (alpha 0.05) length_adaptive: false (lambda_policy 0.95)
    Clip-Higher                eps_high: 0.28                     eps_high: 0.2
    Token-level loss           token_level: true                  token_level: false
    Positive-example LM loss   nll_coef: 0.1                      nll_coef: 0.0
    Group-Sampling             group_size: 16                     group_size: 1 (16x the prompts, same samples)

gamma = 1, no KL penalty, actor lr 1e-6 and critic lr 2e-6 (critic_lr_scale 2). The loop, rollouts and
diagnostics are trainers/rl/actor_critic.py; the formulas trainers/rl/objectives.py.

Deviations: the critic starts from the policy's weights (the paper's from a reward model, which a verifiable-reward
task does not have); lambda_policy is clamped to [0, 1] (objectives.py says why); the rollout's mini-batch split is
per worker (each worker updates on its own samples; the token-level mean is over all workers' tokens); GAE
advantages are whitened over the rollout's tokens, as in verl's PPO (the paper does not say; whiten_advantages).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.rl import actor_critic


@dataclass
class Config(actor_critic.RLConfig):
    """VAPO's components all on (the RLConfig defaults)."""


TINY = Config(d_model=32, n_layers=1, n_heads=2, max_new_tokens=6, group_size=2, minibatches=2,
              value_pretrain_steps=1)

SPEC = actor_critic.trainer_spec(
    "vapo", "VAPO: Efficient and Reliable RL for Advanced Reasoning Tasks (arXiv 2504.05118)", Config, TINY
)
