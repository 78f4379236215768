"""FixMatch (Sohn et al., NeurIPS 2020) as USB implements it (microsoft/Semi-supervised-learning, `fixmatch`).

    L = L_x + lambda_u * L_u
    L_x = CE(f(x_lb), y_lb)
    L_u = mean_b 1[max q_b >= tau] * CE(f(A(u_b)), q_hat_b),   q_b = softmax(f(alpha(u_b))),  q_hat_b = argmax q_b

Paper symbol -> Config field:
    tau (confidence threshold, 0.95)        -> p_cutoff
    lambda_u (unlabeled loss weight, 1)     -> lambda_u
    hard pseudo-labels (argmax)             -> hard_label (soft targets q_b with hard_label: false)
    T (USB's config key; see below)         -> temperature
    EMA of the weights for evaluation (0.999) -> ema_momentum
    mu (unlabeled ratio, 7), B (64), lr, wd  -> the experiment's data.unlabeled_ratio and optim block
    alpha(.) weak, A(.) strong augmentation -> the data layer's "weak_strong" views

As in USB: labeled, weak and strong images go through the student in one forward pass (BatchNorm sees them
together); the pseudo-labels come from the same pass's weak logits, detached; the mask is computed on softmax(logits)
before any temperature; L_u averages over all B*mu unlabeled images, masked ones included. Evaluation uses the EMA
model (USB's `ema_model`), updated after every optimizer step.

Soft targets (hard_label: false) are q_b itself, as in USB: its fixmatch passes probabilities to the pseudo-labeling
hook with softmax=False, so the `T` of its configs (0.5) never applies. `temperature: T` is an option beyond USB: soft
targets softmax(f(alpha(u_b)) / T), the hook's softmax=True path that USB's other algorithms use (the mask still reads
q_b). Hard labels ignore T either way.

Deviations from USB: none in the loss. The EMA is trainers/_common/ema.py (parameters averaged, BatchNorm
statistics copied from the student); the optimizer, LR schedule, weight-decay groups (none on biases and norms) and
data pipeline are the orchestrator's, configured in the experiment file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import build_backbone, check_config_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.ema import ema_update, make_teacher


@dataclass
class Config:
    """Paper / USB defaults for CIFAR-10: WRN-28-2, threshold 0.95, hard labels, lambda_u = 1, EMA 0.999."""

    arch: str = "wrn28_2"  # wrn28_2 (CIFAR-10), wrn28_8 (CIFAR-100), wrn37_2 (STL-10), resnet50, small_cnn
    drop_rate: float = 0.0
    p_cutoff: float = 0.95  # tau: keep a pseudo-label when its max probability reaches this
    lambda_u: float = 1.0
    temperature: float | None = None  # None: soft targets are softmax(logits) (USB); T: softmax(logits / T)
    hard_label: bool = True
    ema_momentum: float = 0.999  # the evaluation model follows the student with this momentum


# The contract test trains 15 steps on one batch: with tau = 0.95 (or 0.5) the mask switches on mid-run and the loss
# jumps by the newly unmasked terms. tau = 0 keeps every unlabeled term in the loss from step 0, so the test sees
# L_x + L_u decrease together.
TINY = Config(arch="small_cnn", p_cutoff=0.0)


class FixMatch(nn.Module):
    """The student and its EMA copy (the evaluation model)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.ema = make_teacher(student)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes), the student's logits
        return self.student(x)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return FixMatch(build_backbone(cfg.arch, info.in_channels, info.num_classes, cfg.drop_rate))


# ---------------------------------------------------------------------------------------------- losses


def pseudo_labels(logits_w: torch.Tensor, p_cutoff: float, hard_label: bool, temperature: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) weak logits -> targets ((N,) class ids, or (N, C) soft: the probabilities, or softmax(logits / T) with
    a temperature) and the (N,) float mask max p >= p_cutoff."""
    probs = torch.softmax(logits_w.detach().float(), dim=1)  # (N, C)
    mask = (probs.max(dim=1).values >= p_cutoff).float()  # (N,)
    if hard_label:
        return probs.argmax(dim=1), mask
    if temperature is None:
        return probs, mask
    return torch.softmax(logits_w.detach().float() / temperature, dim=1), mask


def consistency_loss(logits_s: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_n mask_n * CE(logits_s_n, target_n) over all N unlabeled images; targets are ids (N,) or soft (N, C)."""
    log_probs = F.log_softmax(logits_s.float(), dim=1)  # (N, C)
    if targets.ndim == 1:
        per_image = -log_probs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    else:
        per_image = -(targets * log_probs).sum(dim=1)  # (N,)
    return (per_image * mask).mean()


# ---------------------------------------------------------------------------------------------- the step


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x_lb, y_lb = batch["x_lb"], batch["y_lb"]  # (B, C, H, W), (B,)
    x_w, x_s = batch["x_ulb_w"].flatten(0, 1), batch["x_ulb_s"].flatten(0, 1)  # (B*mu, C, H, W) each
    logits = model.student(torch.cat([x_lb, x_w, x_s]))  # one pass: (B + 2*B*mu, num_classes)
    logits_lb = logits[: len(x_lb)]
    logits_w, logits_s = logits[len(x_lb):].chunk(2)  # (B*mu, num_classes) each
    loss_x = F.cross_entropy(logits_lb.float(), y_lb)
    targets, mask = pseudo_labels(logits_w, cfg.p_cutoff, cfg.hard_label, cfg.temperature)
    loss_u = consistency_loss(logits_s, targets, mask)
    loss = loss_x + cfg.lambda_u * loss_u
    metrics = {
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "mask": mask.mean(),
        "acc_lb": (logits_lb.argmax(1) == y_lb).float().mean().detach(),
    }
    return loss, metrics


def on_step_end(model: nn.Module, cfg: Config, step: int) -> None:
    ema_update(model.ema, model.student, cfg.ema_momentum)


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Accuracy / loss sums of the EMA model (USB evaluates `ema_model`)."""
    return supervised.eval_step(model.ema, batch, cfg)


def check(cfg: Config) -> None:
    check_config_arch(cfg)
    if cfg.temperature is not None and cfg.temperature <= 0:
        raise ConfigError("temperature", "a temperature > 0 (or null: USB's unsharpened probabilities)", cfg.temperature)


SPEC = TrainerSpec(
    name="fixmatch",
    paper="FixMatch (Sohn et al., NeurIPS 2020), USB implementation",
    Config=Config,
    TINY=TINY,
    views="weak_strong",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check,
)
