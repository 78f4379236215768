"""CoNe: Contrast Your Neighbours for Supervised Image Classification (Zheng, You, Huang, Su, Wang, Qian, Wang, Xu;
arXiv 2308.10761).

Spec: ../shared/papers/methods_ssl.md section 3. Official code: github.com/mingkai-zheng/CoNe, network/cone.py (queue,
losses), network/backbone.py + network/head.py (encoder), cone_train.py (loop, schedules), script/train.sh (flags).

Supervised classification with a MoCo-style key encoder and a queue. The student and the key encoder (an EMA of the
student) map an image x to features h = f(x) (B, D), a projection e = g(h) (B, dim), logits z = fc(e) (B, C) (the
classifier sits on the projection, as the official BackBone) and a unit embedding normalize(e). The query q and the
key k come from the SAME augmented image (official `im_k = samples.clone()`). The queue holds the last K keys k_j
(K, dim), their labels y_j and the key encoder's predictions p_j = softmax(z_k,j) (K, C).

    N_i   = the knn_k queue entries most similar to q_i (by q_i . k_j)
    w_ij  = softmax_{j in N_i}(q_i . k_j / tau_sup)
    s_i   = sum_{j in N_i, y_j = y_i} w_ij                       the neighbours' vote for the true class
    L_sup = -1/B sum_{i: s_i > 1e-8} log s_i                     dropped rows still count in B (official)
    d_i   = sum_{j=1..K} softmax_j(k_i . k_j / tau_dc) p_j       the key against the WHOLE queue; no gradient
    R     = {i : min_c softmax(z_i)_c > 1e-8}                    the official row mask
    L_dc  = 1/B sum_{i in R} KL(d_i || softmax(z_i))
    L_ce  = 1/B sum_{i in R} CE(z_i, y_i)                        official: the CE is masked by R too
    L     = L_ce + alpha_sup L_sup + alpha_dc L_dc               from step ce_only_steps on
    L     = 1/B sum_i CE(z_i, y_i)                               before it (official `cone = epoch >= 1`)

After every step the queue receives (k, y, softmax(z_k)) of the step's batch, gathered over ranks, in FIFO order.

Paper symbol / official flag -> Config field:
    backbone f (--backbone resnet50)                               arch
    g: Linear(D, hidden)-BN-ReLU-Linear(hidden, dim) (--use_bn,
      --layers 1; hidden = max(2D, 4096) = 4096, dim 256)          hidden_dim, dim
    K (--k 65536), top-k neighbours (--knn_k 512)                  queue_size, knn_k
    tau_sup (--t_sup 0.1), tau_dc (--t_dc 0.07)                    tau_sup, tau_dc
    loss weights (--alpha_sup 0.7, --alpha_dc 0.4)                 alpha_sup, alpha_dc
    label smoothing (--ls 0)                                       label_smoothing
    EMA momentum m = 1 - (1 - 0.996)(cos(pi t / T) + 1) / 2        base_momentum, total_steps (T = optim.steps)
    CoNe losses from epoch 1 on (`cone = epoch >= 1`)              ce_only_steps (one epoch of steps)
    --sync_bn                                                      sync_bn
    SGD weight decay on every parameter                            decay_norms_and_biases
The optimizer lives in the experiment's `optim:` block (official: SGD momentum 0.9, lr 0.1 x batch / 256, wd 1e-4,
5 linear warm-up epochs, cosine, 100 epochs at batch 1024, fp16).

Step indexing: train_step(step) gets the optimizer steps done so far (official iteration t = step); on_step_end(step)
gets the steps done after it, and updates the key encoder with m at t = step: the update the official loop makes at
the start of iteration `step`, before its forward. The official update at t = 0 is a no-op (the key encoder starts
as a copy), so the key encoder sees the same parameters at every step as in the official loop.

The queue before it is full (our choice, documented): the official queue starts with random unit keys, labels 0 and
`randn` "predictions" (not probabilities), but its CoNe losses only start at epoch 1, when the 65,536 rows have been
overwritten many times (64 steps at batch 1024), so those values never reach a loss. Here they could (a short
ce_only_steps, a queue larger than an epoch), so rows not yet filled are marked: labels -1, keys and predictions 0.
They get a logit of UNFILLED in both softmaxes, i.e. weight exactly 0 next to any filled row: the top-k and d are
taken over the filled rows only, and a label -1 is never a positive. With no filled row at all, s = 0 (every row is
dropped, L_sup = 0) and d = 0 (L_dc = 0): the step is CE only. All of it without NaNs or host syncs.

Metrics: loss_ce, loss_sup, loss_dc (the three parts, unweighted), acc (student top-1 on the batch), neighbour_frac
(share of rows with s > 1e-8, the rows L_sup uses), row_frac (share of rows in R), queue_fill (share of queue rows
filled), cone (1 when the CoNe losses are on). L_sup and L_dc are computed (and reported) during the CE-only steps
too, as diagnostics; they enter the loss from step ce_only_steps on. Evaluation: the student's logits (official
`encoder_q`), with supervised's eval_step.

Deviations from the official code, with reasons:
1. The queue is (K, dim) rows and wraps around at any K (official: (dim, K), asserts K % batch == 0); a gathered
   batch larger than K keeps its last K entries. The unfilled rows are masked (above).
2. The keys enter the queue in on_step_end, after the optimizer step (official: inside forward, after the losses):
   the losses see the same queue. With gradient accumulation every micro-batch of a step sees the same queue.
3. The EMA copies the student's BN buffers into the key encoder (trainers/_common/ema.py; official: the key encoder
   keeps its own). It runs in train mode on batch statistics and is never evaluated, so its buffers are unused.
4. The similarities, softmaxes and losses are computed in float32 with autocast off (official: under fp16 autocast).
5. The official momentum rule keeps any --m above 0.996 constant (`m if m > 0.996 else cosine`); here every
   base_momentum is cosine-ramped to 1. The recipe's 0.996 is ramped in both.
6. The backbone comes from `build_backbone` (timm's resnet50 zero-initialises the last BN of each block; the official
   torchvision-style ResNet does not). The lr schedule is the orchestrator's per-step cosine to 0 (official: per
   epoch, to lr / 1000).
7. sync_bn converts every BatchNorm to SyncBatchNorm: it needs GPUs under DDP; set it false for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat
from trainers._common.ema import cosine_momentum, ema_update, make_teacher

UNFILLED = -1.0e4  # logit of a queue row not yet filled: exp(UNFILLED - max) is exactly 0 in fp32 next to a filled row
DROP = 1.0e-8  # official threshold: rows with s <= DROP leave L_sup, rows with min softmax <= DROP leave R


@dataclass
class Config:
    """The official ImageNet recipe (script/train.sh): ResNet-50, head 4096/256, K 65536, top-512, tau_sup 0.1,
    tau_dc 0.07, L = CE + 0.7 L_sup + 0.4 L_dc after one CE-only epoch, EMA 0.996 -> 1, SyncBN, 100 epochs x 1251."""

    arch: str = "resnet50"  # f: resnet50 (official); small_cnn, wrn28_2 or any timm name
    hidden_dim: int = 4096  # g's hidden width (official max(2 D, 4096))
    dim: int = 256  # g's output: the embedding and the classifier's input
    queue_size: int = 65536  # K (official --k)
    knn_k: int = 512  # neighbours of L_sup (official --knn_k)
    tau_sup: float = 0.1  # temperature of the neighbour weights w (official --t_sup)
    tau_dc: float = 0.07  # temperature of the target d (official --t_dc)
    alpha_sup: float = 0.7  # weight of L_sup (official --alpha_sup in script/train.sh)
    alpha_dc: float = 0.4  # weight of L_dc (official --alpha_dc)
    label_smoothing: float = 0.0  # official --ls: 1 - ls on the true class, ls / (C - 1) on each other one
    base_momentum: float = 0.996  # m at step 0, cosine-ramped to 1 at total_steps
    total_steps: int = 125100  # T of the momentum ramp: 100 epochs x 1251 steps (batch 1024); = optim.steps
    ce_only_steps: int = 1251  # CE only before this step (official: epoch 0 = 1251 steps at batch 1024)
    sync_bn: bool = True  # SyncBatchNorm everywhere (official --sync_bn); needs GPUs under DDP
    decay_norms_and_biases: bool = True  # official: SGD weight decay on every parameter; false: orchestrator groups


# A queue of two batches of 8, 4 neighbours; the CoNe losses from step 1 on (step 0 fills the queue).
TINY = Config(arch="small_cnn", hidden_dim=32, dim=16, queue_size=16, knn_k=4, total_steps=20, ce_only_steps=1,
              sync_bn=False)


# ---------------------------------------------------------------------------------------------- model


def projection_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """g: Linear-BN-ReLU-Linear (the official ProjectionHead with use_bn, num_layers 1): (B, d_in) -> (B, d_out)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


class Encoder(nn.Module):
    """The official BackBone: backbone f, projection g, and the classifier fc on g's output (not on f's)."""

    def __init__(self, backbone: Classifier, hidden_dim: int, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.encoder  # the Classifier's own head is not used: fc sits on the projection
        self.projection = projection_head(backbone.num_features, hidden_dim, dim)
        self.fc = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> unit embedding (B, dim) and logits (B, num_classes), both float32."""
        e = self.projection(self.backbone(x))  # (B, dim)
        return F.normalize(e.float(), dim=1), self.fc(e).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.fc(self.projection(self.backbone(x)))


class CoNe(nn.Module):
    """Student `encoder_q`, EMA key encoder `encoder_k`, and the queue of keys, labels and key predictions.

    `pending` holds this step's (keys, labels, predictions) from train_step until on_step_end enqueues them.
    """

    def __init__(self, cfg: Config, info: DataInfo):
        super().__init__()
        backbone = build_backbone(cfg.arch, info.in_channels, info.num_classes)
        self.encoder_q = Encoder(backbone, cfg.hidden_dim, cfg.dim, info.num_classes)
        self.encoder_k = make_teacher(self.encoder_q)
        self.register_buffer("queue", torch.zeros(cfg.queue_size, cfg.dim))  # keys k_j (K, dim)
        self.register_buffer("queue_label", torch.full((cfg.queue_size,), -1, dtype=torch.long))  # y_j; -1: unfilled
        self.register_buffer("queue_prob", torch.zeros(cfg.queue_size, info.num_classes))  # p_j (K, C)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits (B, num_classes): the evaluated model."""
        return self.encoder_q(x)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    model = CoNe(cfg, info)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_bn else model


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    for field in ("hidden_dim", "dim", "queue_size", "knn_k", "total_steps"):
        if getattr(cfg, field) < 1:
            raise ConfigError(field, "a positive integer", getattr(cfg, field))
    if cfg.knn_k > cfg.queue_size:
        raise ConfigError("knn_k", f"at most queue_size ({cfg.queue_size})", cfg.knn_k)
    for field in ("tau_sup", "tau_dc"):
        if getattr(cfg, field) <= 0:
            raise ConfigError(field, "a positive temperature", getattr(cfg, field))
    for field in ("alpha_sup", "alpha_dc", "ce_only_steps"):
        if getattr(cfg, field) < 0:
            raise ConfigError(field, "a value >= 0", getattr(cfg, field))
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError("label_smoothing", "a value in [0, 1)", cfg.label_smoothing)
    if not 0.0 <= cfg.base_momentum <= 1.0:
        raise ConfigError("base_momentum", "an EMA momentum in [0, 1]", cfg.base_momentum)


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Official: one group, weight decay on every trainable parameter. Otherwise the orchestrator's default groups
    (no decay on biases and norm parameters), e.g. to compare with the supervised baseline under the same groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_norms_and_biases:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lars_exclude": True}]


# ---------------------------------------------------------------------------------------------- pure functions


def queue_logits(x: torch.Tensor, queue: torch.Tensor, queue_label: torch.Tensor, tau: float) -> torch.Tensor:
    """x (B, dim) . queue (K, dim) / tau -> (B, K), with UNFILLED where the row is not filled yet (label -1)."""
    return (x @ queue.T / tau).masked_fill(queue_label[None, :] < 0, UNFILLED)


def neighbour_vote(q: torch.Tensor, y: torch.Tensor, queue: torch.Tensor, queue_label: torch.Tensor, knn_k: int,
                   tau_sup: float) -> torch.Tensor:
    """s (B,): the softmax weight (at tau_sup) of q's top-knn_k queue neighbours that carry q's label y (B,).

    Official `supcon_in`: top-k by similarity, then the softmax over the k similarities / tau. Unfilled rows rank
    last, get weight 0 next to a filled row, and never match a label.
    """
    logits = queue_logits(q, queue.detach(), queue_label, tau_sup)  # (B, K)
    top, index = logits.topk(min(knn_k, len(queue)), dim=1)  # (B, k)
    w = torch.softmax(top, dim=1)  # (B, k)
    return (w * (queue_label[index] == y[:, None])).sum(dim=1)


def sup_loss(s: torch.Tensor) -> torch.Tensor:
    """L_sup = -1/B sum_{i: s_i > 1e-8} log s_i: dropped rows add nothing but count in B (official). s (B,) -> ()."""
    kept = s > DROP
    return -torch.where(kept, s, torch.ones_like(s)).log().sum() / len(s)


@torch.no_grad()
def dc_target(k: torch.Tensor, queue: torch.Tensor, queue_label: torch.Tensor, queue_prob: torch.Tensor,
              tau_dc: float) -> torch.Tensor:
    """d (B, C) = softmax over the whole queue of k (B, dim) . k_j / tau_dc, averaging the predictions p_j (K, C)."""
    return torch.softmax(queue_logits(k, queue, queue_label, tau_dc), dim=1) @ queue_prob


@torch.no_grad()
def row_mask(z: torch.Tensor) -> torch.Tensor:
    """R (B,): rows whose smallest class probability exceeds 1e-8 (official `q_mask`)."""
    return torch.softmax(z, dim=1).min(dim=1).values > DROP


def smoothed_targets(y: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """(B,) -> (B, C): 1 - ls on the true class, ls / (C - 1) on each other one (official `onehot`)."""
    off = torch.full((len(y), num_classes), label_smoothing / (num_classes - 1), device=y.device)
    return off.scatter(1, y[:, None], 1.0 - label_smoothing)


def ce_loss(z: torch.Tensor, y: torch.Tensor, label_smoothing: float, rows: torch.Tensor) -> torch.Tensor:
    """1/B sum_{i in rows} CE(z_i, smoothed y_i): z (B, C), y (B,), rows (B,) bool -> ()."""
    ce = -(smoothed_targets(y, z.size(1), label_smoothing) * F.log_softmax(z, dim=1)).sum(dim=1)  # (B,)
    return torch.where(rows, ce, torch.zeros_like(ce)).sum() / len(z)


def dc_loss(z: torch.Tensor, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """L_dc = 1/B sum_{i in rows} KL(d_i || softmax(z_i)), 0 log 0 = 0: z (B, C), d (B, C), rows (B,) bool -> ()."""
    kl = (torch.xlogy(d, d) - d * F.log_softmax(z, dim=1)).sum(dim=1)  # (B,)
    return torch.where(rows, kl, torch.zeros_like(kl)).sum() / len(z)


@torch.no_grad()
def enqueue(buffers: tuple[torch.Tensor, ...], ptr: torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
    """FIFO into parallel buffers (K, ...): rows ptr, ptr+1, ... (mod K) <- values (N, ...); ptr advances by N (mod
    K). More entries than rows: the last K stay, as if written one by one."""
    K, n = len(buffers[0]), len(values[0])
    keep = min(n, K)
    rows = (ptr + n - keep + torch.arange(keep, device=ptr.device)) % K  # (keep,)
    for buffer, value in zip(buffers, values):
        buffer[rows] = value[n - keep:].to(buffer.dtype)
    ptr.copy_((ptr + n) % K)


# ---------------------------------------------------------------------------------------------- the step


class Parts(NamedTuple):
    """The loss parts of one batch and the row statistics."""

    ce: torch.Tensor  # L_ce over the rows R
    sup: torch.Tensor  # L_sup
    dc: torch.Tensor  # L_dc over the rows R
    s: torch.Tensor  # (B,) neighbour votes
    rows: torch.Tensor  # (B,) R


def cone_parts(model: CoNe, q: torch.Tensor, z: torch.Tensor, k: torch.Tensor, y: torch.Tensor, cfg: Config) -> Parts:
    """The three losses of the student's q (B, dim), z (B, C) against the queue; k (B, dim) the keys of the batch."""
    s = neighbour_vote(q, y, model.queue, model.queue_label, cfg.knn_k, cfg.tau_sup)  # (B,)
    d = dc_target(k, model.queue, model.queue_label, model.queue_prob, cfg.tau_dc)  # (B, C)
    rows = row_mask(z)  # (B,)
    return Parts(ce_loss(z, y, cfg.label_smoothing, rows), sup_loss(s), dc_loss(z, d, rows), s, rows)


def train_step(model: CoNe, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch["x"], batch["y"]
    with torch.no_grad():
        k, z_k = model.encoder_k.embed(x)  # (B, dim), (B, C): the same image as the query's
    q, z = model.encoder_q.embed(x)  # (B, dim), (B, C)
    cone = step >= cfg.ce_only_steps
    with torch.autocast(x.device.type, enabled=False):
        parts = cone_parts(model, q, z, k, y, cfg)
        if cone:
            loss = parts.ce + cfg.alpha_sup * parts.sup + cfg.alpha_dc * parts.dc
        else:
            loss = ce_loss(z, y, cfg.label_smoothing, torch.ones_like(parts.rows))
    model.pending.append((k, y, torch.softmax(z_k, dim=1)))
    metrics = {
        "loss_ce": (parts.ce if cone else loss).detach(), "loss_sup": parts.sup.detach(),
        "loss_dc": parts.dc.detach(), "acc": (z.argmax(dim=1) == y).float().mean(),
        "neighbour_frac": (parts.s > DROP).float().mean(), "row_frac": parts.rows.float().mean(),
        "queue_fill": (model.queue_label >= 0).float().mean(), "cone": torch.tensor(float(cone), device=x.device),
    }
    return loss, metrics


def on_step_end(model: CoNe, cfg: Config, step: int) -> None:
    """Enqueue the step's keys, labels and key predictions (gathered over ranks), then move the key encoder towards
    the student with m at t = step (the official update at the start of iteration `step`)."""
    if model.pending:
        k, y, p = (all_gather_cat(torch.cat(parts)) for parts in zip(*model.pending))
        enqueue((model.queue, model.queue_label, model.queue_prob), model.queue_ptr, (k, y, p))
        model.pending.clear()
    ema_update(model.encoder_k, model.encoder_q, cosine_momentum(step, cfg.total_steps, cfg.base_momentum))


def eval_step(model: CoNe, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The student's logits (official `encoder_q`), with the supervised baseline's sums."""
    return supervised.eval_step(model.encoder_q, batch, cfg)


SPEC = TrainerSpec(
    name="cone",
    paper="CoNe: Contrast Your Neighbours for Supervised Image Classification (Zheng et al., arXiv 2308.10761)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    param_groups=param_groups,
    check=check,
)
