"""ReSSL: Relational Self-Supervised Learning with Weak Augmentation (Zheng et al., NeurIPS 2021), and the options of
its extended version "Weak Augmentation Guided Relational Self-Supervised Learning" (arXiv 2203.08717).

Spec: ../shared/papers/methods_ssl.md section 4. Official code: github.com/KyleZheng1997/ReSSL (= mingkai-zheng/ReSSL).

    q = normalize(g(f(x_s)))              student on the contrastive (strong) view x_s = batch["x2"]
    k = normalize(g'(f'(x_w)))            teacher (EMA of f and g) on the weak view x_w = batch["x1"], no gradient
    p_t = softmax(k Q^T / tau_t)          the weak view's relation to the queue Q of past teacher keys (K, d)
    p_s = softmax(q Q^T / tau_s)          the strong view's relation to the same queue
    L = mean_i H(p_t_i, p_s_i)            one-directional; after the step the batch's keys join Q (FIFO)

Paper symbol -> Config field:
    f (backbone, ResNet-50)                                   arch (a timm name, wrn28_2, small_cnn, ...)
    g: Linear(D, 4096)-ReLU-Linear(4096, 512), no BN          proj_hidden, dim
    K (queue length, 65536 * 2)                               queue_size
    m (EMA momentum of the teacher, 0.999, constant)          momentum
    tau_s (student temperature, 0.1), tau_t (teacher, 0.04)   tau_s, tau_t
    multi-crop students (ressl_multi.py)                      multi_crop (+ the data's num_local_crops)
    shuffle-BN of the teacher                                 shuffle_bn
Defaults are the official ImageNet values; the small-data values (queue 4096, m 0.99) are in experiments/ressl/.

Extended version (no public code; the constants below are our choice, not the paper's):
    - predictor (predictor, predictor_hidden): a BYOL-style MLP Linear(d, hidden)-BN-ReLU-Linear(hidden, d) on the
      student only, q = normalize(h(g(f(x_s)))); the teacher has none. hidden = 4096, the projector's width (BYOL's
      predictor width too).
    - InfoNCE warm-up (infonce_warmup_steps, infonce_t): for the first steps the loss is MoCo's instance
      discrimination, CE over [q.k, q Q^T] / t with the image's own teacher key as the positive and the queue as the
      negatives; the relational loss afterwards. t = 0.2 (MoCo v2's temperature: ReSSL's strong view is MoCo v2's
      augmentation). No warm-up length is suggested: 0 (off) by default.
    Both are off by default: the NeurIPS version.

Multi-crop (cfg.multi_crop and a batch with "x_local"): every student crop (x2 and each of the k local crops) is
matched to the one weak teacher view; the loss is the mean over the 1 + k crops (the official code averages over
all crop rows, the same thing since every crop has the batch's rows).

Representation convention: `encoder` is the student backbone f as a `Classifier` (backbone at encoder.encoder); its
`head` is an online linear classifier on the detached features of x2 (cross-entropy added to the loss, metric
online_acc); images labelled -1 (STL-10's unlabeled extras) are left out of it. `eval_step` scores that classifier.

Shuffle-BN: under DDP (world size > 1, shuffle_bn) the teacher's weak views are gathered from every rank, permuted by
one permutation drawn on rank 0, split back, encoded, gathered again and un-permuted, as the official code does. In
one process there is nothing to shuffle across, so the teacher normalises the student's batch; the official small-data
runs (one GPU) simulated shuffle-BN with the MoCo CIFAR demo's split BatchNorm (BN statistics per sub-batch in both
encoders, and a shuffle inside the batch); that is not done here: it needs the backbones' BN layers replaced.

Deviations from the official code, with reasons:
1. The queue is (K, d) rows and wraps around at any K (official: (d, K) and asserts K % batch == 0); a gathered batch
   larger than K keeps its last K keys.
2. The keys are enqueued and the teacher EMA-updated in on_step_end, after the optimizer step (official: the EMA
   before the teacher's forward, the enqueue after the logits): the same teacher weights and the same queue at every
   loss. With gradient accumulation every micro-batch of a step sees the same queue (its keys enter it together).
3. The EMA copies the student's BN buffers into the teacher (trainers/_common/ema.py; official: the teacher keeps its
   own). The teacher runs in train mode with batch statistics, as the official one does, so its buffers are unused.
4. Multi-crop: the local crops all have one size (the data layer's 96/224 of full size, scale 0.086-0.429) and go
   through the student in one forward pass; the official 5 student crops have sizes 224/192/160/128/96 and one
   forward each. data.num_local_crops = 4 gives the official 5 student crops.
5. The online linear classifier is the project's convention (the official code evaluates with a separate linear
   probe afterwards). The similarities and losses are computed in float32 with autocast off.
6. Weight decay: the orchestrator's default parameter groups (none on biases and norm parameters) are the official
   groups (none on 'bn' and 'bias' parameters), so there is no param_groups here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat, world_size
from trainers._common.ema import ema_update, make_teacher


@dataclass
class Config:
    """Paper defaults: the official ImageNet recipe (ResNet-50, queue 131072 x 512, m 0.999, tau_s 0.1, tau_t 0.04)."""

    arch: str = "resnet50"  # f: a timm name (resnet50, official), wrn28_2, small_cnn, ...
    proj_hidden: int = 4096  # g: Linear(D, proj_hidden)-ReLU-Linear(proj_hidden, dim), no BN (official head)
    dim: int = 512  # d: embedding size of q, k and the queue (official 512)
    queue_size: int = 131072  # K: past teacher keys (official 65536 * 2; small data 4096)
    momentum: float = 0.999  # m: teacher EMA momentum, constant (official 0.999; small data 0.99)
    tau_s: float = 0.1  # student temperature (official 0.1)
    tau_t: float = 0.04  # teacher temperature, sharper (official --t 0.04)
    multi_crop: bool = False  # also match the batch's "x_local" crops to the weak view (official ressl_multi.py)
    shuffle_bn: bool = True  # shuffle the teacher's batch across DDP ranks (official); nothing to do in one process
    predictor: bool = False  # extended version: BYOL-style predictor on the student only (off: NeurIPS version)
    predictor_hidden: int = 4096  # extended version, our choice: the projector's hidden width (BYOL's 4096)
    infonce_warmup_steps: int = 0  # extended version: InfoNCE for steps < this, then relational; 0 = off (our choice)
    infonce_t: float = 0.2  # extended version, our choice: MoCo v2's InfoNCE temperature


# The paper's d = 512 with a small queue of two batches of 8. With d this large the random initial queue rows are
# nearly orthogonal to every key, so the step-0 relations are as flat as those of the untrained (alike) keys that
# replace them, and 15 steps on one batch show the loss going down. With d = 16-64 the step-0 loss against the random
# rows is far below the loss once the queue holds the alike keys, and it takes longer than 15 steps to come back.
TINY = Config(arch="small_cnn", proj_hidden=128, dim=512, queue_size=16, momentum=0.99)


# ---------------------------------------------------------------------------------------------- model


def projection_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """g: Linear-ReLU-Linear without BN (the official ProjectionHead)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def predictor_head(dim: int, hidden: int) -> nn.Sequential:
    """The extended version's student-only predictor: Linear-BN-ReLU-Linear (BYOL's MLP)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class ReSSL(nn.Module):
    """Student (encoder f with its online classifier, projector g, optional predictor), EMA teacher (f', g'), queue.

    `pending_keys` holds this step's teacher keys from train_step until on_step_end enqueues them.
    """

    def __init__(self, cfg: Config, info: DataInfo):
        super().__init__()
        self.encoder = build_backbone(cfg.arch, info.in_channels, info.num_classes)
        self.projector = projection_head(self.encoder.num_features, cfg.proj_hidden, cfg.dim)
        self.predictor = predictor_head(cfg.dim, cfg.predictor_hidden) if cfg.predictor else None
        self.teacher_encoder = make_teacher(self.encoder.encoder)
        self.teacher_projector = make_teacher(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))  # Q: (K, d)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite
        self.pending_keys: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The online classifier's logits (B, num_classes): the evaluated model."""
        return self.encoder(x)

    def student(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> features h (B, D), unit embeddings q (B, d)."""
        h = self.encoder.features(x)
        z = self.projector(h)
        if self.predictor is not None:
            z = self.predictor(z)
        return h, F.normalize(z, dim=1)

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> unit keys k (B, d), without gradient."""
        return F.normalize(self.teacher_projector(self.teacher_encoder(x)), dim=1)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return ReSSL(cfg, info)


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    for field in ("proj_hidden", "dim", "queue_size", "predictor_hidden"):
        if getattr(cfg, field) < 1:
            raise ConfigError(field, "a positive integer", getattr(cfg, field))
    for field in ("tau_s", "tau_t", "infonce_t"):
        if getattr(cfg, field) <= 0:
            raise ConfigError(field, "a positive temperature", getattr(cfg, field))
    if not 0.0 <= cfg.momentum <= 1.0:
        raise ConfigError("momentum", "an EMA momentum in [0, 1]", cfg.momentum)


# ---------------------------------------------------------------------------------------------- pure functions


def relational_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float
                    ) -> torch.Tensor:
    """mean_i H(p_t_i, p_s_i), p_t = softmax(k Q^T / tau_t), p_s = softmax(q Q^T / tau_s).

    q (B, d) student, k (B, d) teacher, queue Q (K, d) -> (). No gradient reaches k or the queue.
    """
    queue = queue.detach()
    p_t = torch.softmax(k.detach() @ queue.T / tau_t, dim=1)  # (B, K)
    log_p_s = F.log_softmax(q @ queue.T / tau_s, dim=1)  # (B, K)
    return -(p_t * log_p_s).sum(dim=1).mean()


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's InfoNCE: CE over [q.k, q Q^T] / t with the own key (column 0) as the positive.

    q (B, d) student, k (B, d) teacher, queue Q (K, d) -> (). No gradient reaches k or the queue.
    """
    positive = (q * k.detach()).sum(dim=1, keepdim=True)  # (B, 1)
    negatives = q @ queue.detach().T  # (B, K)
    logits = torch.cat([positive, negatives], dim=1) / t  # (B, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def online_classifier_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the labelled rows (y >= 0) of logits (B, C), y (B,); 0 for none labelled."""
    labelled = y >= 0  # (B,)
    count = labelled.sum().clamp(min=1)
    ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")  # (B,)
    correct = (logits.argmax(dim=1) == y) & labelled
    return (ce * labelled).sum() / count, correct.sum() / count


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """FIFO: rows ptr, ptr+1, ... (mod K) of queue (K, d) <- keys (N, d); ptr advances by N (mod K)."""
    K, n = queue.size(0), keys.size(0)
    keep = min(n, K)  # more keys than rows: the last K stay
    rows = (ptr + n - keep + torch.arange(keep, device=queue.device)) % K
    queue[rows] = keys[n - keep:].to(queue.dtype)
    ptr.copy_((ptr + n) % K)


def rank_slices(perm: torch.Tensor, world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN indices of one rank for a permutation perm (world * B,) of the gathered batch:

    which gathered images it encodes (perm's rank-th block), and where its own B keys sit among the gathered
    shuffled keys (the rank-th block of perm's inverse).
    """
    return perm.view(world, -1)[rank], perm.argsort().view(world, -1)[rank]


# ---------------------------------------------------------------------------------------------- the step


@torch.no_grad()
def teacher_keys(model: ReSSL, x_w: torch.Tensor, shuffle_bn: bool) -> torch.Tensor:
    """The teacher's keys (B, d) of this rank's weak views (B, C, H, W), with shuffle-BN across DDP ranks."""
    world = world_size()
    if world == 1 or not shuffle_bn:
        return model.teacher(x_w)
    x_all = all_gather_cat(x_w)  # (world * B, C, H, W)
    perm = torch.randperm(len(x_all), device=x_w.device)
    dist.broadcast(perm, src=0)
    encode, own = rank_slices(perm, world, dist.get_rank())
    return all_gather_cat(model.teacher(x_all[encode]))[own]


def student_crops(model: ReSSL, batch: Batch, cfg: Config) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Features h (B, D) of x2 and the embeddings q of every student crop: [(B, d)] * (1 + k)."""
    h, q = model.student(batch["x2"])
    local = batch.get("x_local")  # (B, k, C, s, s)
    if not cfg.multi_crop or local is None or local.size(1) == 0:
        return h, [q]
    _, q_local = model.student(local.transpose(0, 1).flatten(0, 1))  # (k * B, d), crop-major
    return h, [q, *q_local.chunk(local.size(1))]


def train_step(model: ReSSL, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    k = teacher_keys(model, batch["x1"], cfg.shuffle_bn)  # (B, d)
    h, qs = student_crops(model, batch, cfg)
    warmup = step < cfg.infonce_warmup_steps
    with torch.autocast(k.device.type, enabled=False):
        k = k.float()
        losses = [infonce_loss(q.float(), k, model.queue, cfg.infonce_t) if warmup
                  else relational_loss(q.float(), k, model.queue, cfg.tau_s, cfg.tau_t) for q in qs]
        loss_ssl = torch.stack(losses).mean()
        online_ce, online_acc = online_classifier_loss(model.encoder.head(h.detach().float()), batch["y"])
    model.pending_keys.append(k)
    metrics = {"loss_ssl": loss_ssl.detach(), "online_ce": online_ce.detach(), "online_acc": online_acc.detach()}
    return loss_ssl + online_ce, metrics


def on_step_end(model: ReSSL, cfg: Config, step: int) -> None:
    """Enqueue the step's teacher keys (gathered over ranks), then move the teacher towards the student."""
    if model.pending_keys:
        enqueue(model.queue, model.queue_ptr, all_gather_cat(torch.cat(model.pending_keys)))
        model.pending_keys.clear()
    ema_update(model.teacher_encoder, model.encoder.encoder, cfg.momentum)
    ema_update(model.teacher_projector, model.projector, cfg.momentum)


def eval_step(model: ReSSL, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The online linear classifier on the student's features, with the supervised baseline's sums."""
    return supervised.eval_step(model.encoder, batch, cfg)


SPEC = TrainerSpec(
    name="ressl",
    paper="ReSSL: Relational Self-Supervised Learning with Weak Augmentation (Zheng et al., NeurIPS 2021)",
    Config=Config,
    TINY=TINY,
    views="weak_contrastive",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check,
)
