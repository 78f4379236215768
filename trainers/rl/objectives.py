"""Advantages, losses and diagnostics of PPO, GRPO and VAPO: pure functions of (N, T) response tensors.

N responses of up to T tokens; `mask` (N, T) is 1.0 on real response tokens (up to and including the end token).
The verifiable reward R_i arrives at the last token: r_{i,t} = R_i [t = l_i - 1], nothing else is rewarded.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   V(s_{l}) = 0 after the last token
    A_t = sum_k (gamma lambda)^k delta_{t+k}             GAE
    G_t = A_t + V(s_t)                                   the value target (lambda = 1: the Monte-Carlo return)

VAPO (spec: ../shared/papers/methods_nas_gen_llm.md section 9):
- Decoupled GAE: the critic's targets use lambda_critic = 1.0, the policy's advantages a smaller lambda_policy.
- Length-adaptive GAE: lambda_policy = 1 - 1/(alpha l) per response of length l (alpha = 0.05), clamped to [0, 1]:
  with alpha = 0.05 any response under 20 tokens would get lambda <= 0 (the formula is meant for CoT lengths in the
  hundreds), so short responses fall back to one-step TD.
- Clip-Higher: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), eps_low 0.2 < eps_high 0.28.
- Token-level loss: 1/sum_i l_i sum_i sum_t, every token weighs the same whatever its response's length.
- Positive-example LM loss: mu * NLL over the tokens of correct responses.
GRPO: A_i = (R_i - mean_group R) / (std_group R + eps) for every token of response i, and a k3 KL estimate to a
frozen reference policy.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over responses of each response's token mean (PPO/GRPO's sample-level averaging)."""
    per_sequence = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_sequence[mask.sum(1) > 0].mean() if (mask.sum(1) > 0).any() else x.sum() * 0


def lengths_of(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1)  # (N,)


def terminal_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_i (N,) placed on the last real token of each response: (N, T)."""
    last = (lengths_of(mask).long() - 1).clamp(min=0)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), last] = scores * (lengths_of(mask) > 0)
    return rewards


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda = 1 - 1/(alpha l), clamped to [0, 1]: (N,) -> (N,)."""
    return (1.0 - 1.0 / (alpha * lengths.clamp(min=1.0))).clamp(0.0, 1.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets (N, T) by the backward GAE recursion; `lam` a float or per response (N,).
    Values beyond a response's end count as 0 (the episode ended)."""
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).expand(len(values))
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros(len(values), dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each reward standardised within its group of group_size samples of one prompt: (N,) -> (N,).
    Consecutive rows are one group (the rollout repeats each prompt group_size times)."""
    groups = scores.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True, unbiased=group_size > 1) if group_size > 1 else torch.ones_like(groups)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).flatten()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the real tokens."""
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(variance + eps) * mask


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and where the clip is active: (N, T) each."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    active = {"clip_low": ((ratio < 1.0 - eps_low) & (advantages < 0)).float(),
              "clip_high": ((ratio > 1.0 + eps_high) & (advantages > 0)).float(), "ratio": ratio.detach()}
    return loss, active


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, token_level: bool,
              token_count: torch.Tensor | None = None) -> torch.Tensor:
    """Token level: sum / token_count (all tokens of the batch; the count over every rank's mini-batch divided by
    the ranks, so DDP's gradient mean is the global token mean). Sequence level: the mean of response means."""
    if not token_level:
        return sequence_mean(per_token, mask)
    count = mask.sum() if token_count is None else token_count
    return (per_token * mask).sum() / count.clamp(min=1.0)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's unbiased, non-negative KL(pi || pi_ref) estimate per token: exp(d) - d - 1, d = ref - log pi."""
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1.0


# ------------------------------------------------------------------------------------------------ diagnostics


def explained_variance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - prediction) / Var(target) over 1-D samples; 0 when the target does not vary."""
    var = target.var(unbiased=False)
    if len(target) < 2 or var <= 1e-12:
        return torch.zeros((), device=target.device)
    return 1.0 - (target - prediction).var(unbiased=False) / var


def value_diagnostics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                      positions: int) -> dict[str, torch.Tensor]:
    """Value-prediction bias E[V - G] and explained variance against the Monte-Carlo returns G, over all tokens and
    at each response position t < positions (over the responses that reach t; 0 where none does)."""
    real = mask.bool()
    out = {"value_bias": masked_mean(values - returns, mask),
           "value_explained_variance": explained_variance(values[real], returns[real])}
    for t in range(min(positions, values.shape[1])):
        reach = real[:, t]
        bias = (values[reach, t] - returns[reach, t]).mean() if reach.any() else torch.zeros((), device=values.device)
        out[f"value_bias/t{t:02d}"] = bias
        out[f"value_explained_variance/t{t:02d}"] = explained_variance(values[reach, t], returns[reach, t])
    return out


def advantage_by_length(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and standard deviation of token advantages in the shortest, middle and longest third of responses."""
    lengths = lengths_of(mask)
    order = torch.argsort(lengths, stable=True)
    out = {}
    for name, rows in zip(("short", "medium", "long"), torch.tensor_split(order, 3)):
        tokens = advantages[rows][mask[rows].bool()]
        zero = torch.zeros((), device=advantages.device)
        out[f"advantage_mean/{name}"] = tokens.mean() if len(tokens) else zero
        out[f"advantage_std/{name}"] = tokens.std(unbiased=False) if len(tokens) else zero
        out[f"length/{name}"] = lengths[rows].float().mean() if len(rows) else zero
    return out


def credit_assignment(advantages: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each token's advantage with its response's final reward (0 when either is constant):
    how much of the terminal signal reaches the individual tokens."""
    real = mask.bool()
    a, r = advantages[real], scores[:, None].expand_as(advantages)[real]
    if len(a) < 2 or a.std() <= 1e-12 or r.std() <= 1e-12:
        return torch.zeros((), device=advantages.device)
    return torch.corrcoef(torch.stack([a, r]))[0, 1]
