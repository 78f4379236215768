"""SimMatch (Zheng et al., CVPR 2022): semantic and instance similarity through a labeled memory bank.

Spec: ../shared/papers/methods_ssl.md section 1. Official code: github.com/mingkai-zheng/SimMatch (ImageNet);
CIFAR/STL numbers come from USB (microsoft/Semi-supervised-learning, `simmatch`).

    p_w = DA(softmax(teacher logits(x_w)))                          class pseudo-label, distribution-aligned
    q_w_j = softmax_j(z_w . z_j / t)  over the labeled bank          instance similarities of the weak view
    q_hat_j = q_w_j * p_w[y_j] / sum_k q_w_k * p_w[y_k]              unfolding (instance pseudo-label)
    a_c = sum_{j: y_j = c} q_w_j                                     aggregation (class view of the instances)
    p_hat = alpha * p_w + (1 - alpha) * a        (official code)     label propagation; the paper: p_hat ∝ p_w ⊙ a
    L = L_x + lambda_u * mean_i 1[max p_hat_i >= tau] H(p_hat_i, softmax(logits(x_s_i)))
            + lambda_in * mean_i H(q_hat_i, softmax_j(z_s_i . z_j / t))

Paper symbol -> Config field:
    t (teacher and student temperature, 0.1; official --tt/--st, USB T) -> tau
    tau (confidence threshold; 0.95 USB CIFAR, 0.7 ImageNet)            -> p_cutoff
    alpha (official --c_smooth, USB smoothing_alpha, 0.9)              -> alpha
    lambda_u (1 USB, 10 ImageNet) and lambda_in (1 USB, 5 ImageNet)    -> lambda_u, lambda_in
    DA FIFO length (32 USB, 256 ImageNet)                              -> da_len
    teacher: EMA network (ImageNet) or the student itself (USB CIFAR)  -> ema_teacher
    bank momentum without a teacher (0.7, USB)                         -> bank_momentum
    which axis that bank update normalises (see deviations)            -> bank_norm
    EMA momentum m (0.999)                                             -> ema_momentum
    projection head to 128-d                                           -> proj_dim (hidden size = backbone features)
    "epoch 0": L_in = 0 and p_hat = p_w                                -> warmup_steps
    additive (code) or multiplicative (paper) label propagation        -> label_propagation

Defaults are USB's CIFAR recipe: tau 0.1, p_cutoff 0.95, alpha 0.9, da_len 32, lambda_u = lambda_in = 1, no EMA
teacher (the labeled bank is updated as normalize(0.7 * old + 0.3 * new) with the student's embeddings), and the
EMA model (0.999) used for evaluation. warmup_steps = 1024 is USB's first "epoch" (2^20 iterations / 1024 epochs).
The ImageNet recipe (experiments/simmatch/imagenet_*.yaml) is ema_teacher true (the bank is then overwritten with
the teacher's embedding), p_cutoff 0.7, lambda_u 10, lambda_in 5, da_len 256, eval_ema false (the official code
evaluates the student), warmup_steps = one epoch of steps.

Forward passes: without an EMA teacher, labeled + weak + strong images go through the student in one pass (USB);
with one, labeled + strong go through the student and labeled + weak through the teacher (official code).
The bank starts as random unit vectors with labels 0, as in both codes; the warm-up (>= one pass over the labeled
set) fills it before L_in and the propagated labels use it. The DA FIFO starts at zeros, as in both codes: dividing
by the mean over all da_len rows equals dividing by the mean of the filled rows up to a constant, which the
renormalisation removes.

Deviations from the official code / USB, with reasons:
- One temperature `tau` for teacher and student similarities: both codes use 0.1 for both (USB has a single T).
- No shuffle-BN for the EMA teacher (official ImageNet default): the orchestrator's DDP step has no cross-rank batch
  shuffle; the teacher only provides detached targets, and its BN statistics are copied from the student.
- Warm-up counted in optimizer steps, not epochs: the orchestrator's loop is step-based.
- When a labeled index occurs several times in a (gathered) batch, the last occurrence updates the bank; both codes
  leave it to index assignment, which is nondeterministic on GPU.
- L_in is multiplied by 0 during the warm-up rather than skipped (as USB; the official code skips it): the projection
  head then stays in the graph with zero gradients, which DDP without find_unused_parameters requires.
- The bank update without an EMA teacher (bank_norm "embedding", the default) renormalises each updated row to unit
  length, as the paper's bank of unit embeddings and the official code's overwrite imply. USB's code differs: it
  applies F.normalize to the (proj_dim, B) slice `mem_bank[:, index]`, whose default dim=1 normalises each feature
  across the batch's B columns, so its bank rows end with norm about sqrt(proj_dim / B) (1.41 at proj_dim 128 and
  B 64, 2.83 at B 16) and the similarity logits z . z_j / t are scaled by that much. bank_norm "usb" reproduces
  that rule literally (duplicated indices included in the normalisation, as in USB), for comparing with USB's
  published CIFAR/STL numbers.
- USB runs DA with p_target uniform and +1e-6 on both sides; the ratio here has no epsilon (the official code's form),
  and the uniform target is a constant that the renormalisation removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_config_arch
from trainers._common.contract import Batch, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat, all_reduce_mean
from trainers._common.ema import ema_update, make_teacher


@dataclass
class Config:
    """USB's CIFAR recipe (no EMA teacher, bank momentum 0.7); the ImageNet values are in the module docstring."""

    arch: str = "wrn28_2"  # wrn28_2 (CIFAR-10), wrn28_8 (CIFAR-100), wrn37_2 (STL-10), resnet50 (ImageNet), small_cnn
    drop_rate: float = 0.0
    proj_dim: int = 128  # embedding size of the projection head and the bank
    tau: float = 0.1  # t: temperature of the instance similarities (teacher and student)
    p_cutoff: float = 0.95  # confidence threshold on max p_hat
    alpha: float = 0.9  # p_hat = alpha * p_w + (1 - alpha) * a ("interpolate")
    label_propagation: Literal["interpolate", "multiply"] = "interpolate"  # code (default) or paper form
    da_len: int = 32  # distribution alignment FIFO of batch-mean probabilities; 0 disables DA
    lambda_u: float = 1.0
    lambda_in: float = 1.0
    ema_teacher: bool = False  # True: ImageNet variant (EMA teacher, bank overwritten); False: USB CIFAR variant
    bank_momentum: float = 0.7  # without an EMA teacher: bank = normalize(m * old + (1 - m) * new)
    bank_norm: Literal["embedding", "usb"] = "embedding"  # that normalize: per row (unit rows) or USB's across the batch
    ema_momentum: float = 0.999  # the EMA network: teacher (ema_teacher) and/or evaluation model (eval_ema)
    eval_ema: bool = True  # evaluate the EMA network (USB) or the student (official ImageNet code)
    warmup_steps: int = 1024  # steps with L_in = 0 and p_hat = p_w; 0 disables


# The contract test trains 15 steps on one batch: with p_cutoff 0.95 (or 0.5) the mask switches on mid-run and the
# loss jumps; p_cutoff 0 keeps L_u on from step 0. No warm-up, so L_in and label propagation run from step 0.
TINY = Config(arch="small_cnn", proj_dim=16, p_cutoff=0.0, da_len=4, warmup_steps=0)


class SimMatchNet(nn.Module):
    """Backbone + linear classifier + projection head (Linear-ReLU-Linear, then L2 normalisation)."""

    def __init__(self, backbone: Classifier, proj_dim: int):
        super().__init__()
        d = backbone.num_features
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.backbone(x)

    def logits_and_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> logits (B, num_classes), unit embeddings z (B, proj_dim)."""
        h = self.backbone.features(x)  # (B, D)
        return self.backbone.head(h), F.normalize(self.projector(h), dim=1)


class SimMatch(nn.Module):
    """Student, EMA network, labeled memory bank (L, proj_dim) with labels (L,), and the DA FIFO (da_len, C)."""

    def __init__(self, student: SimMatchNet, num_labeled: int, num_classes: int, proj_dim: int, da_len: int):
        super().__init__()
        self.student = student
        self.ema = make_teacher(student)
        self.register_buffer("bank", F.normalize(torch.randn(num_labeled, proj_dim), dim=1))  # (L, proj_dim)
        self.register_buffer("bank_labels", torch.zeros(num_labeled, dtype=torch.long))  # (L,)
        self.register_buffer("da_queue", torch.zeros(da_len, num_classes))  # (da_len, C)
        self.register_buffer("da_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes), the student's logits
        return self.student(x)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    backbone = build_backbone(cfg.arch, info.in_channels, info.num_classes, cfg.drop_rate)
    student = SimMatchNet(backbone, cfg.proj_dim)
    return SimMatch(student, info.num_labeled, info.num_classes, cfg.proj_dim, cfg.da_len)


# ---------------------------------------------------------------------------------------------- pure functions


def distribution_alignment(p_w: torch.Tensor, da_queue: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities divided by the FIFO's mean class distribution (da_len, C) -> (N, C), rows renormalised."""
    aligned = p_w / da_queue.mean(dim=0)  # (N, C)
    return aligned / aligned.sum(dim=1, keepdim=True)


def unfold_and_aggregate(q_w: torch.Tensor, p_w: torch.Tensor, bank_labels: torch.Tensor, num_classes: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance similarities q_w (N, L), class probabilities p_w (N, C), bank labels (L,) ->

    q_hat (N, L): q_w_j scaled by p_w[y_j] and renormalised (unfolding);
    a (N, C): a_c = sum of q_w_j over the bank items of class c (aggregation).
    """
    scale = p_w[:, bank_labels]  # (N, L): p_w of each bank item's label
    q_hat = q_w * scale
    q_hat = q_hat / q_hat.sum(dim=1, keepdim=True)
    a = q_w.new_zeros(q_w.size(0), num_classes).index_add_(1, bank_labels, q_w)  # (N, C)
    return q_hat, a


def propagate_labels(p_w: torch.Tensor, a: torch.Tensor, alpha: float, mode: str) -> torch.Tensor:
    """p_hat (N, C) from p_w and a: alpha-interpolation (official code) or p_w ⊙ a renormalised (paper)."""
    if mode == "interpolate":
        return alpha * p_w + (1.0 - alpha) * a
    if mode == "multiply":
        p_hat = p_w * a
        return p_hat / p_hat.sum(dim=1, keepdim=True)
    raise ValueError(f"label_propagation: expected 'interpolate' or 'multiply', found {mode!r}")


def soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """H(targets, softmax(logits)) per row: (N, K), (N, K) -> (N,)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def last_occurrence(idx: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) indices in [0, size) -> (N,) bool, True where no later position holds the same index."""
    positions = torch.arange(len(idx), device=idx.device)
    last = torch.full((size,), -1, dtype=torch.long, device=idx.device)
    last.scatter_reduce_(0, idx, positions, reduce="amax")
    return last[idx] == positions


# ---------------------------------------------------------------------------------------------- buffers (in place)


@torch.no_grad()
def push_da_queue(model: SimMatch, p_w: torch.Tensor) -> None:
    """Write the batch-mean class distribution (averaged over ranks) at the FIFO pointer and advance it."""
    ptr = int(model.da_ptr)
    model.da_queue[ptr] = all_reduce_mean(p_w.mean(dim=0).float())
    model.da_ptr.fill_((ptr + 1) % len(model.da_queue))


@torch.no_grad()
def update_bank(model: SimMatch, z: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, momentum: float,
                norm: str = "embedding") -> None:
    """Bank rows idx <- z (momentum 0: overwrite) or normalize(m * old + (1 - m) * z); labels <- y. Gathered over ranks.

    z (B, proj_dim), y (B,), idx (B,): every rank applies the same global update, so the banks stay identical.
    norm "embedding" makes each new row unit; "usb" normalises each feature over the B rows (USB's F.normalize of
    the (proj_dim, B) slice).
    """
    z, y, idx = all_gather_cat(z.detach().float()), all_gather_cat(y), all_gather_cat(idx)
    if momentum > 0:
        z = F.normalize(momentum * model.bank[idx] + (1.0 - momentum) * z, dim=0 if norm == "usb" else 1)
    keep = last_occurrence(idx, len(model.bank))
    model.bank[idx[keep]] = z[keep]
    model.bank_labels[idx[keep]] = y[keep]


# ---------------------------------------------------------------------------------------------- the step


def _forward(model: SimMatch, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Logits and embeddings of every view; the teacher's outputs (z_lb_t, logits_w_t, z_w_t) carry no gradient."""
    x_lb = batch["x_lb"]  # (B, C, H, W)
    x_w, x_s = batch["x_ulb_w"].flatten(0, 1), batch["x_ulb_s"].flatten(0, 1)  # (N = B*mu, C, H, W)
    b = len(x_lb)
    if cfg.ema_teacher:
        logits, z = model.student.logits_and_embeddings(torch.cat([x_lb, x_s]))  # (B + N, ...)
        with torch.no_grad():
            logits_t, z_t = model.ema.logits_and_embeddings(torch.cat([x_lb, x_w]))
        return {"logits_lb": logits[:b], "logits_s": logits[b:], "z_s": z[b:],
                "z_lb_t": z_t[:b], "logits_w_t": logits_t[b:], "z_w_t": z_t[b:]}
    logits, z = model.student.logits_and_embeddings(torch.cat([x_lb, x_w, x_s]))  # (B + 2N, ...)
    logits_w, logits_s = logits[b:].chunk(2)
    z_w, z_s = z[b:].chunk(2)
    return {"logits_lb": logits[:b], "logits_s": logits_s, "z_s": z_s,
            "z_lb_t": z[:b].detach(), "logits_w_t": logits_w.detach(), "z_w_t": z_w.detach()}


@torch.no_grad()
def _pseudo_labels(model: SimMatch, out: dict[str, torch.Tensor], bank: torch.Tensor, cfg: Config, warm: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class pseudo-labels p_hat (N, C) and instance pseudo-labels q_hat (N, L) from the teacher's weak view."""
    p_w = torch.softmax(out["logits_w_t"].float(), dim=1)  # (N, C)
    if cfg.da_len > 0:
        push_da_queue(model, p_w)
        p_w = distribution_alignment(p_w, model.da_queue)
    q_w = torch.softmax(out["z_w_t"].float() @ bank.T / cfg.tau, dim=1)  # (N, L)
    q_hat, a = unfold_and_aggregate(q_w, p_w, model.bank_labels, p_w.size(1))
    p_hat = p_w if warm else propagate_labels(p_w, a, cfg.alpha, cfg.label_propagation)
    return p_hat, q_hat


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    warm = step < cfg.warmup_steps
    out = _forward(model, batch, cfg)
    bank = model.bank.clone()  # (L, proj_dim): this step's bank, before its update
    p_hat, q_hat = _pseudo_labels(model, out, bank, cfg, warm)
    mask = (p_hat.max(dim=1).values >= cfg.p_cutoff).float()  # (N,)
    loss_x = F.cross_entropy(out["logits_lb"].float(), batch["y_lb"])
    loss_u = (soft_cross_entropy(p_hat, out["logits_s"].float()) * mask).mean()
    loss_in = soft_cross_entropy(q_hat, out["z_s"].float() @ bank.T / cfg.tau).mean()
    if warm:
        loss_in = loss_in * 0.0  # kept in the graph: every parameter gets a gradient (DDP)
    loss = loss_x + cfg.lambda_u * loss_u + cfg.lambda_in * loss_in
    update_bank(model, out["z_lb_t"], batch["y_lb"], batch["idx_lb"], 0.0 if cfg.ema_teacher else cfg.bank_momentum,
                cfg.bank_norm)
    metrics = {
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "loss_in": loss_in.detach(),
        "mask": mask.mean(),
        "acc_lb": (out["logits_lb"].argmax(1) == batch["y_lb"]).float().mean().detach(),
    }
    return loss, metrics


def on_step_end(model: nn.Module, cfg: Config, step: int) -> None:
    ema_update(model.ema, model.student, cfg.ema_momentum)


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Accuracy / loss sums of the EMA network (eval_ema, USB) or of the student (official ImageNet code)."""
    return supervised.eval_step(model.ema if cfg.eval_ema else model.student, batch, cfg)


SPEC = TrainerSpec(
    name="simmatch",
    paper="SimMatch (Zheng et al., CVPR 2022)",
    Config=Config,
    TINY=TINY,
    views="weak_strong",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check_config_arch,
)
