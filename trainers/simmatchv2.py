"""SimMatchV2: Semi-Supervised Learning with Graph Consistency (Zheng et al., ICCV 2023).

Every augmented view is a node (a label and an embedding) and every similarity between two views is an edge.
Four consistencies train the student on the strong views against an EMA teacher on the weak view:

- node-node   L_nn = mean 1[max p^w >= threshold] H(y_hat, softmax(f(x_s)))   (class prediction vs pseudo-label)
- edge-edge   L_ee = H(r^w, r^s), r = softmax(z U^T / t)                        (similarities to the unlabeled bank)
- node-edge   L_ne = H(p^w, r^s P_U)                                            (strong view's edges carry labels)
- edge-node   y_hat = (P Y)[0], P = (1 - alpha)(I - alpha A)^-1                 (closed-form label propagation over
              the unlabeled node and its top-n labeled-bank neighbours; it makes the pseudo-label of L_nn)

L = CE(labeled) + lambda_nn L_nn + lambda_ee L_ee + lambda_ne L_ne. Strong-view terms are averaged over the strong
crops (the full-size one and the local ones of "weak_strong_multicrop").

Paper symbol -> Config field:
    t (temperature of every edge, also in A)      t
    alpha (label-propagation damping)             alpha
    n (labeled neighbours in the propagation)     topn
    K (unlabeled bank size)                       bank_size      (official: k * B * mu * world = 256*8*5*8 = 81920)
    DA momentum, DA on/off                        da_m, use_da
    confidence threshold                          threshold
    lambda_nn / lambda_ee / lambda_ne             lambda_nn, lambda_ee, lambda_ne
    EMA momentum m                                ema_m
    steps of the run (the ramp of m, see below)   total_steps    (= optim.steps)
    feature normalization (LayerNorm)             norm_feat
    embedding dimension (128)                     proj_dim

Defaults are the official ImageNet 10% recipe (the argparse defaults of main.py: lambda 10/5/5); the 1% recipe
uses lambda 10/10/10 (experiments/simmatchv2/imagenet_1p.yaml). The official repository has no CIFAR/STL
settings. The small-data experiment files use a third-party single-GPU USB port's values where it has them
(K = 2560, threshold 0.95, lambda_ee = lambda_ne = 5) and lambda_nn = 1 (USB's lambda_u for FixMatch/SimMatch;
the port's value is not recorded in our notes); everything else keeps the ImageNet values.

Model: the backbone's pooled feature -> LayerNorm (norm_feat) -> fc head (logits) and -> Linear-ReLU-Linear
projection to proj_dim, L2-normalised (embeddings z). The teacher is an EMA copy of the whole network and runs in
train mode on cat([x_lb, x_ulb_w]) (its BN uses batch statistics, as the official teacher does). Evaluation
scores the student, as the official `validate` does (`model(images)` -> `main`).

Teacher momentum, as the official main.py: m stays ema_m when ema_m > 0.996 (the ImageNet default 0.999); at or below
0.996 it is cosine-ramped to 1 over the run, m_t = 1 - (1 - ema_m)(cos(pi t / T) + 1) / 2 after the t-th optimizer
step of T = total_steps (set it to optim.steps; the check refuses a ramped ema_m without it).

Deviations from the official code (github.com/mingkai-zheng/SimMatchV2), with reasons:
1. Multi-crop is one full-size strong crop (224, scale 0.14-1) plus k = data.num_local_crops crops of one
   smaller size (96/224 of full, scale 0.05-0.429) instead of 5 crops of graded sizes 224/192/160/120/96: the
   data views hand out fixed-shape tensors. The local crops go through the student in one forward (official:
   one forward per crop, so BN statistics here are shared across the local crops). The SPEC's default views
   are "weak_strong" (one RandAugment strong view, as the USB-style small-data settings use); the ImageNet
   files select "weak_strong_multicrop" as the official scripts select --multicrop.
2. The labeled bank's labels are written by index as labeled images arrive (uniform 1/C before an index is
   first seen): a trainer's DataInfo carries no labels. Official: the true one-hot labels from the start.
   Rows of Y stay distributions either way, so y_hat is always a distribution.
3. The unlabeled FIFO wraps around at any K (official asserts K % (B*mu*world) == 0), so USB's K = 2560 works
   with a batch of 448.
4. The label propagation solves for row 0 of (I - alpha A)^-1 only (one batched torch.linalg.solve of
   (I - alpha A)^T w = e_0 on (N, n+1, n+1)) instead of inverting the whole matrix: y_hat needs only that row.
   It runs in float32 with autocast off. n = min(topn, number of labeled images).
5. L_ee uses log_softmax instead of log(softmax) (same value, no -inf from underflow); the NaN/Inf guard of
   L_ee and L_ne is kept (L_ne is +inf while the bank's probabilities are still the zeros it starts with).
6. No shuffle-BN for the teacher across GPUs (each rank's teacher normalises its own batch); no fp16 GradScaler
   (the orchestrator's AMP is bf16 on GPU).
7. The EMA copies the student's BN buffers into the teacher (trainers/_common/ema.py); the official teacher keeps
   its own running statistics. Both normalise with batch statistics in training, so only an evaluated teacher
   would differ, and evaluation uses the student.
8. Weak view: the shared `transforms.weak` (ImageNet: RandomResizedCrop scale 0.08-1; official 0.2-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import build_backbone, check_config_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat, all_reduce_mean
from trainers._common.ema import cosine_momentum, ema_update, make_teacher


@dataclass
class Config:
    """Paper defaults: the official ImageNet 10% recipe (ResNet-50, 8 GPUs, batch 64 + 320)."""

    arch: str = "resnet50"  # a timm name, wrn28_2 / wrn28_8 / wrn37_2, or small_cnn
    proj_dim: int = 128  # embedding dimension of the projection head
    norm_feat: bool = True  # LayerNorm on the pooled feature, before the fc and the projection head
    t: float = 0.1  # temperature of every similarity (edges, and A of the label propagation)
    alpha: float = 0.1  # label propagation: P = (1 - alpha)(I - alpha A)^-1
    topn: int = 128  # labeled-bank neighbours of each unlabeled node in the propagation
    bank_size: int = 81920  # K, unlabeled FIFO bank: 256 * 8 * 5 * 8 (k * B * mu * world)
    use_da: bool = True  # distribution alignment
    da_m: float = 0.9  # d <- da_m * d + (1 - da_m) * batch-mean probability
    threshold: float = 0.7  # mask of L_nn on max p^w
    lambda_nn: float = 10.0
    lambda_ee: float = 5.0
    lambda_ne: float = 5.0
    ema_m: float = 0.999  # teacher momentum: constant above RAMP_BELOW, cosine-ramped to 1 at or below it (official)
    total_steps: int | None = None  # T of that ramp: optim.steps (needed when ema_m <= RAMP_BELOW)


RAMP_BELOW = 0.996  # the official code ramps m to 1 when ema_m <= 0.996

# Small banks and lambdas of 1 so that 15 SGD steps on one batch show the loss going down: the bank fills in two
# steps and L_ne switches on at step 1 (its bank starts with zero probabilities, so step 0 zeroes it).
TINY = Config(arch="small_cnn", proj_dim=16, topn=4, bank_size=32, threshold=0.5, lambda_nn=1.0, lambda_ee=1.0,
              lambda_ne=1.0)


# ---------------------------------------------------------------------------------------------- model


class Network(nn.Module):
    """Backbone -> LayerNorm -> (fc logits, L2-normalised projection): the official `ResNet` wrapper."""

    def __init__(self, arch: str, in_channels: int, num_classes: int, proj_dim: int, norm_feat: bool):
        super().__init__()
        self.backbone = build_backbone(arch, in_channels, num_classes)  # .head is the fc classifier
        width = self.backbone.num_features
        self.norm = nn.LayerNorm(width) if norm_feat else nn.Identity()
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.backbone.features(x))  # (B, D)
        return self.backbone.head(h), F.normalize(self.projector(h), dim=1)  # (B, C), (B, proj_dim)


class SimMatchV2(nn.Module):
    """Student, EMA teacher, and the banks (buffers, so checkpoints carry them)."""

    def __init__(self, cfg: Config, info: DataInfo):
        super().__init__()
        C, d = info.num_classes, cfg.proj_dim
        self.student = Network(cfg.arch, info.in_channels, C, d, cfg.norm_feat)
        self.teacher = make_teacher(self.student)
        self.register_buffer("labeled_bank", F.normalize(torch.randn(info.num_labeled, d), dim=1))  # (L, d)
        self.register_buffer("labeled_labels", torch.full((info.num_labeled, C), 1.0 / C))  # (L, C) one-hot
        self.register_buffer("unlabeled_bank", F.normalize(torch.randn(cfg.bank_size, d), dim=1))  # U: (K, d)
        self.register_buffer("unlabeled_probs", torch.zeros(cfg.bank_size, C))  # P_U: (K, C), as the official
        self.register_buffer("unlabeled_ptr", torch.zeros((), dtype=torch.long))  # next FIFO row
        self.register_buffer("da", torch.full((C,), 1.0 / C))  # d: running class distribution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits: the evaluated model."""
        return self.student(x)[0]


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return SimMatchV2(cfg, info)


# ---------------------------------------------------------------------------------------------- pure functions


def distribution_alignment(probs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p^w = normalize(probs / d): (N, C), (C,) -> (N, C)."""
    p = probs / d
    return p / p.sum(dim=1, keepdim=True)


def label_propagation(f: torch.Tensor, y: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    """Edge-node consistency: y_hat = (P Y)[0] for each of N small graphs, solved for all at once.

    f: (N, n+1, d) node embeddings, row 0 the unlabeled node; y: (N, n+1, C) node labels -> y_hat: (N, C).
    A = row-softmax(F F^T / t - 1e9 I), P = (1 - alpha)(I - alpha A)^-1. Row 0 of the inverse is w with
    (I - alpha A)^T w = e_0, so y_hat = (1 - alpha) w^T Y.
    """
    with torch.autocast(f.device.type, enabled=False):
        f, y = f.float(), y.float()
        n1 = f.size(1)
        eye = torch.eye(n1, device=f.device)
        A = torch.softmax(f @ f.transpose(1, 2) / t - 1e9 * eye, dim=-1)  # (N, n+1, n+1), no self-edges
        e0 = eye[:, :1].expand(f.size(0), n1, 1)  # (N, n+1, 1)
        w = torch.linalg.solve((eye - alpha * A).transpose(1, 2), e0)  # (N, n+1, 1): row 0 of (I - alpha A)^-1
        return (1 - alpha) * (w.transpose(1, 2) @ y).squeeze(1)  # (N, C)


def edge_node_pseudo_label(z_w: torch.Tensor, p_w: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor,
                           topn: int, t: float, alpha: float) -> torch.Tensor:
    """The pseudo-label of each unlabeled node from its top-n labeled neighbours.

    z_w: (N, d) teacher embeddings, p_w: (N, C), bank: (L, d), labels: (L, C) -> y_hat: (N, C).
    """
    n = min(topn, bank.size(0))
    nearest = (z_w @ bank.T).topk(n, dim=1).indices  # (N, n)
    f = torch.cat([z_w[:, None], bank[nearest]], dim=1)  # (N, n+1, d)
    y = torch.cat([p_w[:, None], labels[nearest]], dim=1)  # (N, n+1, C)
    return label_propagation(f, y, t, alpha)


def node_node_loss(logits_s: torch.Tensor, y_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i mask_i H(y_hat_i, softmax(logits_s_i)): (M, C), (M, C), (M,) -> ()."""
    return (-(y_hat * F.log_softmax(logits_s, dim=1)).sum(dim=1) * mask).mean()


def edge_edge_loss(z_s: torch.Tensor, z_w: torch.Tensor, bank: torch.Tensor, t: float) -> torch.Tensor:
    """H(r^w, r^s) with r = softmax(z U^T / t): z_s (M, d) student, z_w (M, d) teacher, bank U (K, d) -> ()."""
    r_w = torch.softmax(z_w @ bank.T / t, dim=1)  # (M, K)
    log_r_s = F.log_softmax(z_s @ bank.T / t, dim=1)  # (M, K)
    return -(r_w * log_r_s).sum(dim=1).mean()


def node_edge_loss(z_s: torch.Tensor, p_w: torch.Tensor, bank: torch.Tensor, bank_probs: torch.Tensor,
                   t: float) -> torch.Tensor:
    """H(p^w, r^s P_U): the strong view's class prediction aggregated over its edges to the bank.

    z_s: (M, d), p_w: (M, C), bank U: (K, d), bank_probs P_U: (K, C) -> ().
    """
    r_s = torch.softmax(z_s @ bank.T / t, dim=1)  # (M, K)
    return -(p_w * (r_s @ bank_probs).log()).sum(dim=1).mean()


def zero_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """The official guard of L_ee and L_ne: a NaN or Inf loss becomes 0 (and gives no gradient)."""
    return loss if bool(torch.isfinite(loss)) else loss.new_zeros(())


# ---------------------------------------------------------------------------------------------- banks


@torch.no_grad()
def update_da(d: torch.Tensor, probs: torch.Tensor, m: float) -> None:
    """d <- m d + (1 - m) mean(probs) over the global batch; probs: (N, C) raw teacher probabilities."""
    d.mul_(m).add_(all_reduce_mean(probs.mean(dim=0)), alpha=1 - m)


@torch.no_grad()
def update_labeled_bank(bank: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                        idx: torch.Tensor) -> None:
    """Overwrite rows idx of the labeled bank (L, d) and its one-hot labels (L, C); z (B, d), y and idx (B,)."""
    z, y, idx = all_gather_cat(z), all_gather_cat(y), all_gather_cat(idx)
    bank[idx] = z.to(bank.dtype)
    labels[idx] = F.one_hot(y, labels.size(1)).to(labels.dtype)


@torch.no_grad()
def push_unlabeled(bank: torch.Tensor, probs: torch.Tensor, ptr: torch.Tensor, z: torch.Tensor,
                   p: torch.Tensor) -> None:
    """FIFO: rows ptr, ptr+1, ... (mod K) of bank (K, d) and probs (K, C) <- z (N, d), p (N, C); ptr advances."""
    z, p = all_gather_cat(z), all_gather_cat(p)
    K, n = bank.size(0), z.size(0)
    keep = min(n, K)  # a batch larger than the bank keeps its last K rows
    rows = (ptr + n - keep + torch.arange(keep, device=bank.device)) % K
    bank[rows] = z[n - keep:].to(bank.dtype)
    probs[rows] = p[n - keep:].to(probs.dtype)
    ptr.copy_((ptr + n) % K)


# ---------------------------------------------------------------------------------------------- step


def strong_crops(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The full-size strong crop (N, C, H, W), the local crops (k*N, C, s, s) crop-major or None, and 1 + k."""
    x_s = batch["x_ulb_s"].flatten(0, 1)
    local = batch.get("x_ulb_local")  # (B, mu, k, C, s, s)
    if local is None or local.size(2) == 0:
        return x_s, None, 1
    return x_s, local.permute(2, 0, 1, 3, 4, 5).flatten(0, 2), 1 + local.size(2)


def train_step(model: SimMatchV2, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x_lb, y_lb = batch["x_lb"], batch["y_lb"]  # (B, C, H, W), (B,)
    x_w = batch["x_ulb_w"].flatten(0, 1)  # (N, C, H, W), N = B * mu
    B = x_lb.size(0)
    # Snapshots: the losses read the banks as they were before this step's updates (and autograd keeps them).
    labeled_bank, labeled_labels = model.labeled_bank.clone(), model.labeled_labels.clone()
    U, P_U = model.unlabeled_bank.clone(), model.unlabeled_probs.clone()

    with torch.no_grad():
        logits_k, z_k = model.teacher(torch.cat([x_lb, x_w]))
        logits_k, z_k = logits_k.float(), z_k.float()
        z_kx, z_w = z_k[:B], z_k[B:]  # (B, d), (N, d)
        probs = torch.softmax(logits_k[B:], dim=1)  # (N, C)
        p_w = distribution_alignment(probs, model.da) if cfg.use_da else probs
        if cfg.use_da:
            update_da(model.da, probs, cfg.da_m)
        y_hat = edge_node_pseudo_label(z_w, p_w, labeled_bank, labeled_labels, cfg.topn, cfg.t, cfg.alpha)
        mask = (p_w.max(dim=1).values >= cfg.threshold).float()  # (N,): on p^w, not y_hat, as the official

    # The labeled images go through the student with the full-size strong crop only (BN), as in the official code.
    x_s, x_local, num_crops = strong_crops(batch)
    logits_q, z_q = model.student(torch.cat([x_lb, x_s]))
    logits_x, logits_s, z_s = logits_q[:B].float(), logits_q[B:].float(), z_q[B:].float()
    if x_local is not None:
        logits_l, z_l = model.student(x_local)
        logits_s, z_s = torch.cat([logits_s, logits_l.float()]), torch.cat([z_s, z_l.float()])

    # Every strong crop has the targets of its image: (num_crops * N, ...), crop-major as logits_s and z_s.
    z_w_r, p_w_r, y_hat_r = z_w.repeat(num_crops, 1), p_w.repeat(num_crops, 1), y_hat.repeat(num_crops, 1)
    loss_x = F.cross_entropy(logits_x, y_lb)
    loss_nn = node_node_loss(logits_s, y_hat_r, mask.repeat(num_crops))
    loss_ee = zero_if_not_finite(edge_edge_loss(z_s, z_w_r, U, cfg.t))
    loss_ne = zero_if_not_finite(node_edge_loss(z_s, p_w_r, U, P_U, cfg.t))
    loss = loss_x + cfg.lambda_nn * loss_nn + cfg.lambda_ee * loss_ee + cfg.lambda_ne * loss_ne

    update_labeled_bank(model.labeled_bank, model.labeled_labels, z_kx, y_lb, batch["idx_lb"])
    push_unlabeled(model.unlabeled_bank, model.unlabeled_probs, model.unlabeled_ptr, z_w, p_w)
    metrics = {
        "loss_x": loss_x.detach(),
        "loss_nn": loss_nn.detach(),
        "loss_ee": loss_ee.detach(),
        "loss_ne": loss_ne.detach(),
        "mask": mask.mean(),
        "acc_lb": (logits_x.argmax(1) == y_lb).float().mean().detach(),
    }
    return loss, metrics


def teacher_momentum(cfg: Config, step: int) -> float:
    """m after the `step`-th optimizer step (1-based, the official curr_step)."""
    if cfg.ema_m > RAMP_BELOW:
        return cfg.ema_m
    return cosine_momentum(step, cfg.total_steps, cfg.ema_m)


def on_step_end(model: SimMatchV2, cfg: Config, step: int) -> None:
    ema_update(model.teacher, model.student, teacher_momentum(cfg, step))


def check(cfg: Config) -> None:
    check_config_arch(cfg)
    if cfg.ema_m <= RAMP_BELOW and (cfg.total_steps is None or cfg.total_steps <= 0):
        raise ConfigError("total_steps", f"the run's optim.steps: ema_m {cfg.ema_m} <= {RAMP_BELOW} is cosine-ramped "
                          "to 1 over the run (official)", cfg.total_steps)


def eval_step(model: SimMatchV2, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The student classifier (the official `validate` scores `main`), with the supervised baseline's sums."""
    return supervised.eval_step(model, batch, cfg)


SPEC = TrainerSpec(
    name="simmatchv2",
    paper="SimMatchV2: Semi-Supervised Learning with Graph Consistency (ICCV 2023)",
    Config=Config,
    TINY=TINY,
    views="weak_strong",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check,
)
