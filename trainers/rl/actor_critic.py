"""The RL loop that PPO, GRPO and VAPO share: rollouts with group sampling, verifiable rewards, advantages, and
the clipped policy-gradient update over mini-batches of the rollout (objectives.py has the formulas).

In the orchestrator's step contract one optimizer step is one mini-batch update:

    a rollout   the step's prompts (optim.batch_size over all workers), each sampled group_size times
                -> N responses, rewards, old log-probs, values, advantages, value targets, diagnostics
    its updates ppo_epochs x minibatches steps, each on one mini-batch of its N responses (reshuffled per epoch)

so PPO's mini-batch size is N / minibatches. The next rollout is made when this one's updates are used up; the
loader's batches in between are not read. The rollout is kept on the module, not in checkpoints: a resumed run
starts with a fresh rollout from the restored policy. With optim.grad_accum A, one optimizer step takes A
mini-batches. The first value_pretrain_steps steps train the critic alone on rollouts of the initial policy
(VAPO's value pretraining), regressing on the Monte-Carlo returns (lambda = 1, as VAPO prescribes, whatever
lambda_critic and decoupled_gae say); the policy is not updated then.

GAE advantages are whitened (standardised over the rollout's response tokens) by default, as verl's and OpenRLHF's
PPO do; the VAPO paper does not say whether it whitens. `whiten_advantages: false` keeps the raw GAE advantages.
Group advantages (GRPO) are never whitened again: they are already standardised within each group.

Every step reports the rollout's diagnostics (the limitations paper's failure modes): value bias and explained
variance against Monte-Carlo returns, overall and per response position; advantage mean/std by response length;
the correlation of token advantages with the final reward; and the update's entropy, clip fractions on both sides,
ratio and KL.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_reduce_mean
from trainers.rl import objectives as obj
from trainers.rl.common import (
    PolicyConfig,
    check_answers,
    check_policy,
    eval_step,
    ids_device,
    load_actor,
    read_problems,
)
from trainers.rl.policy import Critic, Sequences, build_backbone, generate, response_log_probs, response_values


@dataclass
class RLConfig(PolicyConfig):
    """VAPO's recipe; ppo.py and grpo.py change the defaults of their baselines."""

    group_size: int = 16  # samples per prompt (VAPO: 512 prompts x 16)
    temperature: float = 1.0
    reward_correct: float = 1.0
    reward_wrong: float = -1.0
    ppo_epochs: int = 1
    minibatches: int = 16  # updates per epoch of a rollout (VAPO: 8192 samples in mini-batches of 512)
    advantage: Literal["gae", "group"] = "gae"  # gae: critic + GAE (PPO, VAPO); group: GRPO, no critic
    gamma: float = 1.0
    lambda_policy: float = 0.95  # used when length_adaptive is off
    lambda_critic: float = 1.0
    decoupled_gae: bool = True  # False: the critic's targets use the policy's lambda
    length_adaptive: bool = True  # lambda_policy = 1 - 1/(alpha l)
    alpha: float = 0.05
    whiten_advantages: bool = True  # GAE advantages standardised over the rollout's tokens (verl's default)
    eps_low: float = 0.2
    eps_high: float = 0.28  # Clip-Higher; eps_low for symmetric PPO clipping
    token_level: bool = True  # token-level loss averaging; False: per-response means, then their mean
    nll_coef: float = 0.1  # mu of the positive-example LM loss; 0 turns it off
    value_coef: float = 1.0
    critic_lr_scale: float = 2.0  # critic lr / actor lr (VAPO: 2e-6 / 1e-6)
    value_pretrain_steps: int = 50
    kl_coef: float = 0.0  # beta of the k3 KL to a frozen copy of the initial policy (GRPO's 0.04)
    diag_positions: int = 8  # response positions with their own value diagnostics


def check(cfg: RLConfig) -> None:
    check_policy(cfg)
    if cfg.group_size < 1 or (cfg.advantage == "group" and cfg.group_size < 2):
        raise ConfigError("group_size", "at least 2 for group advantages (at least 1 otherwise)", cfg.group_size)
    if not 0 <= cfg.eps_low < 1 or cfg.eps_high < 0:
        raise ConfigError("eps_low", "0 <= eps_low < 1 and eps_high >= 0", (cfg.eps_low, cfg.eps_high))
    for name in ("lambda_policy", "lambda_critic", "gamma"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(name, "a value in [0, 1]", getattr(cfg, name))
    if cfg.alpha <= 0:
        raise ConfigError("alpha", "a positive number", cfg.alpha)
    if cfg.minibatches < 1 or cfg.ppo_epochs < 1:
        raise ConfigError("minibatches", "minibatches >= 1 and ppo_epochs >= 1", (cfg.minibatches, cfg.ppo_epochs))
    if cfg.advantage == "group" and cfg.value_pretrain_steps:
        raise ConfigError("value_pretrain_steps", "0 with group advantages (there is no critic)",
                          cfg.value_pretrain_steps)


class ActorCritic(nn.Module):
    """The policy, its critic (GAE only) and a frozen reference policy (KL only), all starting from the same
    weights (init_from, else the backbone's initialisation). `rollout` is working memory, not state."""

    def __init__(self, cfg: RLConfig):
        super().__init__()
        self.actor = build_backbone(cfg.policy, cfg.d_model, cfg.n_layers, cfg.n_heads)
        if cfg.init_from:
            load_actor(self.actor, cfg.init_from)
        self.critic = Critic(copy.deepcopy(self.actor)) if cfg.advantage == "gae" else None
        self.reference = copy.deepcopy(self.actor).requires_grad_(False) if cfg.kl_coef else None
        self.rollout: Rollout | None = None


def build(cfg: RLConfig, info: DataInfo) -> nn.Module:
    return ActorCritic(cfg)


def param_groups(model: ActorCritic, cfg: RLConfig) -> list[dict[str, Any]]:
    groups = [{"params": [p for p in model.actor.parameters() if p.requires_grad]}]
    if model.critic is not None:
        groups.append({"params": list(model.critic.parameters()), "lr_scale": cfg.critic_lr_scale})
    return groups


# ------------------------------------------------------------------------------------------------ rollout


@dataclass
class Rollout:
    seqs: Sequences  # N = prompts x group_size
    old_log_probs: torch.Tensor  # (N, T)
    advantages: torch.Tensor  # (N, T)
    returns: torch.Tensor  # (N, T) value targets (lambda_critic, or lambda_policy when not decoupled)
    monte_carlo: torch.Tensor  # (N, T) Monte-Carlo returns (lambda = 1): the value-pretraining targets
    positive: torch.Tensor  # (N,) 1.0 for correct responses
    ref_log_probs: torch.Tensor | None
    diagnostics: dict[str, torch.Tensor]
    chunks: list[torch.Tensor] = field(default_factory=list)  # row indices of the mini-batches still to use


@torch.no_grad()
def make_rollout(model: ActorCritic, batch: Batch, cfg: RLConfig) -> Rollout:
    tokenizer = model.actor.tokenizer
    ids, mask, answers = read_problems(batch, tokenizer, ids_device(model))
    ids, mask = ids.repeat_interleave(cfg.group_size, 0), mask.repeat_interleave(cfg.group_size, 0)
    answers = [a for a in answers for _ in range(cfg.group_size)]
    seqs = generate(model.actor, ids, mask, cfg.max_new_tokens, cfg.temperature)
    correct = check_answers(cfg, tokenizer, seqs, answers, ids.device)  # (N,)
    scores = torch.where(correct > 0, cfg.reward_correct, cfg.reward_wrong)
    response_mask = seqs.response_mask
    old_log_probs, _ = response_log_probs(model.actor, seqs)
    ref_log_probs = response_log_probs(model.reference, seqs)[0] if model.reference is not None else None
    diagnostics = {"reward": scores.mean(), "accuracy": correct.mean(),
                   "response_length": obj.lengths_of(response_mask).mean()}
    if model.critic is not None:
        advantages, returns, monte_carlo, extra = _gae_targets(model, seqs, scores, cfg)
        diagnostics.update(extra)
    else:
        advantages = obj.group_advantages(scores, cfg.group_size)[:, None] * response_mask
        returns = monte_carlo = torch.zeros_like(advantages)
    diagnostics.update(obj.advantage_by_length(advantages, response_mask))
    diagnostics["credit_assignment"] = obj.credit_assignment(advantages, response_mask, scores)
    return Rollout(seqs, old_log_probs, advantages, returns, monte_carlo, correct, ref_log_probs, diagnostics)


def _gae_targets(model: ActorCritic, seqs: Sequences, scores: torch.Tensor, cfg: RLConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Policy advantages (lambda_policy, length-adaptive or fixed), critic targets (lambda_critic when decoupled)
    and the Monte-Carlo returns (lambda = 1), plus the value diagnostics against the latter."""
    mask = seqs.response_mask
    values = response_values(model.critic, seqs) * mask
    rewards = obj.terminal_rewards(scores, mask)
    lengths = obj.lengths_of(mask)
    lam_policy = obj.length_adaptive_lambda(lengths, cfg.alpha) if cfg.length_adaptive else cfg.lambda_policy
    advantages, _ = obj.gae(rewards, values, mask, cfg.gamma, lam_policy)
    _, returns = obj.gae(rewards, values, mask, cfg.gamma, cfg.lambda_critic if cfg.decoupled_gae else lam_policy)
    _, monte_carlo = obj.gae(rewards, values, mask, cfg.gamma, 1.0)
    if cfg.whiten_advantages:
        advantages = obj.whiten(advantages, mask)
    extra = obj.value_diagnostics(values, monte_carlo, mask, cfg.diag_positions)
    extra["lambda_policy"] = torch.as_tensor(lam_policy, device=mask.device, dtype=mask.dtype).mean()
    return advantages, returns, monte_carlo, extra


def _schedule(n: int, cfg: RLConfig, device: torch.device) -> list[torch.Tensor]:
    """Row indices of every mini-batch of a rollout: ppo_epochs shuffles of its n rows, minibatches parts each."""
    shuffles = [torch.randperm(n, device=device) for _ in range(cfg.ppo_epochs)]
    return [chunk for order in shuffles for chunk in order.tensor_split(cfg.minibatches)]


# ------------------------------------------------------------------------------------------------ update


def train_step(model: ActorCritic, batch: Batch, cfg: RLConfig, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    if model.rollout is None or not model.rollout.chunks:
        model.rollout = make_rollout(model, batch, cfg)
        model.rollout.chunks = _schedule(len(model.rollout.seqs.ids), cfg, model.rollout.advantages.device)
    rows = model.rollout.chunks.pop(0)
    pretraining = step < cfg.value_pretrain_steps
    loss, metrics = _update_loss(model, model.rollout, rows, cfg, pretraining)
    return loss, {**model.rollout.diagnostics, **metrics, "value_pretraining": float(pretraining)}


def _update_loss(model: ActorCritic, rollout: Rollout, rows: torch.Tensor, cfg: RLConfig,
                 pretraining: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    seqs = Sequences(rollout.seqs.ids[rows], rollout.seqs.mask[rows], rollout.seqs.prompt_length)
    mask = seqs.response_mask
    zero = torch.zeros((), device=mask.device)
    metrics = {k: zero for k in ("policy_loss", "value_loss", "nll_loss", "kl", "entropy", "clip_low_frac",
                                 "clip_high_frac", "ratio")}
    loss = zero
    if model.critic is not None:
        values = response_values(model.critic, seqs)
        targets = rollout.monte_carlo if pretraining else rollout.returns
        metrics["value_loss"] = 0.5 * obj.masked_mean((values - targets[rows]) ** 2, mask)
        loss = loss + cfg.value_coef * metrics["value_loss"]
    if pretraining:
        return loss, {k: v.detach() for k, v in metrics.items()}
    log_probs, entropy = response_log_probs(model.actor, seqs, with_entropy=True)
    per_token, active = obj.clipped_surrogate(log_probs, rollout.old_log_probs[rows], rollout.advantages[rows],
                                              cfg.eps_low, cfg.eps_high)
    token_count = all_reduce_mean(mask.sum())  # mean tokens per rank: DDP's gradient mean is then per token
    metrics["policy_loss"] = obj.aggregate(per_token, mask, cfg.token_level, token_count)
    loss = loss + metrics["policy_loss"]
    positive = mask * rollout.positive[rows][:, None]
    metrics["nll_loss"] = obj.masked_mean(-log_probs, positive)
    if cfg.nll_coef:
        loss = loss + cfg.nll_coef * metrics["nll_loss"]
    if rollout.ref_log_probs is not None:
        metrics["kl"] = obj.aggregate(obj.k3_kl(log_probs, rollout.ref_log_probs[rows]), mask, cfg.token_level)
        loss = loss + cfg.kl_coef * metrics["kl"]
    metrics.update(entropy=obj.masked_mean(entropy, mask), clip_low_frac=obj.masked_mean(active["clip_low"], mask),
                   clip_high_frac=obj.masked_mean(active["clip_high"], mask),
                   ratio=obj.masked_mean(active["ratio"], mask))
    return loss, {k: v.detach() for k, v in metrics.items()}


def trainer_spec(name: str, paper: str, config: type, tiny: RLConfig) -> TrainerSpec:
    """The SPEC of a method of this loop (ppo, grpo, vapo differ only in their name, paper and defaults)."""
    return TrainerSpec(
        name=name,
        paper=paper,
        Config=config,
        TINY=tiny,
        views="problems",
        build=build,
        train_step=train_step,
        eval_step=eval_step,
        param_groups=param_groups,
        check=check,
        path_fields=("init_from",),
        dynamic_graph=True,  # the policy is not in the loss during value pretraining
    )
