"""SAU: synthetic-aware and synthetic-unaware learning for long-tailed recognition with generated images (Li, Song,
Zheng; ICONIP 2024).

Spec: ../shared/papers/methods_ssl.md section 8. Official code: github.com/lgX1123/gm4lt (Trainer.py,
loss/ContrastiveLoss.py, loss/MixLoss.py, utils/util.py, model/resnet_small.py).

The training pool is the long-tailed real set, each class filled up to the head-class count with synthetic images
(`is_syn`). Three views per image ("sau" views): v1 crop + flip, v2 = v1 + AutoAugment + Cutout, v3 SimCLR-style.
One backbone f with an fc classifier and a contrastive head g (D-2048-BN-ReLU-2048-BN-ReLU-128), z = g(f(x)) / |.|:

    synthetic-unaware  x_mix = lam x1 + (1 - lam) x1[pi]                 lam ~ Beta(1, 1), pi a partner per image
                       x_cut = x1 with a box of x1[pi] pasted,           lam = 1 - box area / image area
                       L_mix = CE(fc(f(x_mix)), lam y + (1-lam) y[pi]) + CE(fc(f(x_cut)), lam y + (1-lam) y[pi])
    synthetic-aware    rows = real images of the batch + class prototypes p_c (both "real") + synthetic images,
                       each with its v2 and v3 embeddings (z2, z3);
                       a synthetic image is "noisy" unless its most cosine-similar real row or prototype carries
                       its label in v2 AND in v3;
                       L_SCL = SupCon over the 2 x rows embeddings at tau, noisy rows handled by `strategy`
    total              L = lambda_mix L_mix + lambda_scl L_SCL                                   (1 : 1)

strategy (official `--loss_strategy`, default "pos_neg"): a noisy synthetic image is
    pos_neg   given a unique negative label: its only positive is its own other view
    neg_only  labelled -1: not an anchor, only a negative of the others
    drop      removed from L_SCL

Paper symbol -> Config field:
    backbone (CIFAR: ResNet-32, base width 64)   -> arch (default wrn34_4, see below)
    contrastive head widths 2048 / 128           -> hidden_dim, out_dim
    SupCon temperature 0.1                       -> tau
    Beta(alpha, alpha) of mixup and cutmix, 1    -> mix_alpha
    L_mix : L_SCL = 1 : 1                        -> lambda_mix, lambda_scl
    noisy-sample strategy                        -> strategy
    (ablation, not in the paper) label correction off: every synthetic image trusted -> label_correction (False)
    (ablation, not in the paper) the fc trained by plain CE on view 1 in L_mix's place -> classifier_loss ("ce")
The optimizer is the experiment's `optim:` block (official: SGD momentum 0.9, lr 0.01, wd 5e-3, batch 128, 200 epochs
cosine). As in the official code weight decay applies to every parameter, BN and biases included (`param_groups`).

Evaluation: argmax of the fc (`acc`, `loss`, `acc5`) and the accuracy of the many-shot (> 100 real training images),
medium-shot (21-100) and few-shot (<= 20) classes, from DataInfo.class_counts (kept as a buffer, so a resumed run
evaluates the same way): eval_step sums `<group>_correct` and `<group>_n`, eval_summary divides them into
`<group>_acc` (a group without classes has none). The official code averages per-class accuracies over a group's
classes; on a balanced test set that equals the pooled accuracy computed here. The boundaries are the official
`> 100`, `<= 100 and > 20`, `<= 20` (the spec's "few < 20" puts a class of exactly 20 in the medium group; the code
puts it in few).

Where this follows the official code:
- Four passes through the backbone per step (mixup, cutmix, v2, v3), each with its own BN statistics.
- Prototypes are the per-class mean of unit embeddings per view, not re-normalised, and they are anchors of the
  SupCon loss like the real rows (only the batch rows carry gradient).
- Label correction (the latest official `SCL.relabel`): per view, the synthetic rows, the batch's real rows and the
  prototypes are L2-normalised, and a synthetic image takes the label of the reference row of largest cosine
  similarity (argmax of z_syn @ z_ref.T); it is noisy unless that label is its own in v2 and in v3. Only this search
  normalises the prototypes: in the SupCon loss they stay the un-normalised means (as official). A Euclidean 1-NN
  against the un-normalised prototypes (this file's earlier search) can pick another row when a prototype is short
  (tests/test_sau.py has such a case).
- The SupCon loss is the mean over all anchors (pos_neg, drop), or the sum over the non-noisy anchors divided by
  their number (neg_only); the official subtraction of the row maximum is replaced by logsumexp (the same values).

Differences from the official code, with reasons:
- Prototypes. Official: at each epoch start, one eval-mode pass over the real training images gives every class's
  mean v2 and v3 embedding. Here the method has no dataset access (step contract), so a bank (buffers, num_train x 2
  x out_dim) keeps each real image's latest v2/v3 embedding, indexed by `idx`, filled from the train-mode passes as
  the images go by (gathered over ranks, so every rank holds the same bank). The prototypes of a step are the
  per-class means of the filled entries before this step's batch is stored: embeddings up to one epoch old, from
  train-mode passes, instead of an eval-mode pass once per epoch. A class with no filled entry has no prototype yet.
  The bank has a row per pool image (synthetic rows stay empty): 51 MB at CIFAR scale (50,000 x 2 x 128 fp32).
- Mix partner. Official: a second shuffled loader over the same pool. Here: a random permutation of the batch itself,
  equal in distribution when the batch is a uniform draw from the pool (it is, with the orchestrator's sampler).
- CutMix label. Official labels with the drawn lam even when the box is clipped at the border; here lam is
  recomputed as 1 - (pasted area) / (image area), as in the CutMix paper's reference code, so the soft label matches
  the pixels.
- Backbone. The official CIFAR ResNet-32 (3 stages of 5 basic blocks, 64/128/256 channels, option-A shortcuts) is
  not among the project's backbones; the default wrn34_4 (WRN-34-4: 3 stages of 5 pre-activation basic blocks,
  64/128/256 channels, 1x1 convolution shortcuts, a 16-channel stem) has the same stages and widths and 7.4M
  parameters like it. Layers are initialised by the backbone's own scheme, not the official Kaiming normal.
- With several workers each rank's SupCon sees its own share of the batch plus the prototypes (official: one GPU).
- Under the orchestrator's bf16 autocast the networks run in bf16; the losses and the cosine search run in fp32.
- `label_correction` False (an ablation switch, not official) marks no synthetic image noisy. `lambda_mix` or
  `lambda_scl` 0 weights a branch out but still computes it: every parameter keeps a gradient (zeros), as DDP needs.
  `lambda_mix` 0 leaves the fc untrained (it learns only from L_mix, as official), so the ablation of the
  synthetic-unaware branch is `classifier_loss: ce` (also not official): the fc learns by CE on view 1 with hard
  labels, without mixup or cutmix, and L_SCL is unchanged.
- `acc` (a diagnostic, not in the official log): the fc's accuracy on view 1, from one more forward pass under
  no_grad in eval mode, so it changes no BN statistics (about 8% more compute per step).
- `noisy_fraction`: the share of the batch's synthetic images marked noisy (0 when the batch has none);
  `num_prototypes`: the classes that have a prototype (all of them once every class's real images were seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.backbones import Classifier, build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat
from trainers._common.long_tail import shot_summary, shot_sums
from trainers.wcl import projection_head

STRATEGIES = ("pos_neg", "neg_only", "drop")
CLASSIFIER_LOSSES = ("mix", "ce")


@dataclass
class Config:
    """The official CIFAR recipe: contrastive head 2048/128, tau 0.1, Beta(1, 1), L_mix : L_SCL = 1 : 1, pos_neg."""

    arch: str = "wrn34_4"  # official ResNet-32 width 64 is not a project backbone; WRN-34-4 has its stages and widths
    hidden_dim: int = 2048  # contrastive head hidden width
    out_dim: int = 128  # contrastive embedding size
    tau: float = 0.1  # SupCon temperature
    mix_alpha: float = 1.0  # lam ~ Beta(mix_alpha, mix_alpha) for mixup and cutmix
    lambda_mix: float = 1.0  # weight of L_mix (synthetic-unaware branch)
    lambda_scl: float = 1.0  # weight of L_SCL (synthetic-aware branch)
    strategy: Literal["pos_neg", "neg_only", "drop"] = "pos_neg"  # noisy synthetic images (official argparse default)
    label_correction: bool = True  # False: no synthetic image is noisy (ablation; the official code always corrects)
    classifier_loss: Literal["mix", "ce"] = "mix"  # "ce": the fc learns by plain CE on view 1 (ablation, not official)


TINY = Config(arch="small_cnn", hidden_dim=32, out_dim=16)


class SAU(nn.Module):
    """`encoder`: backbone + fc classifier (`encoder.head`); `head`: contrastive MLP. Buffers: the prototype bank
    (num_train, 2, out_dim) of real images' v2/v3 unit embeddings, its labels (num_train,) (-1: not filled), and the
    real training images per class (num_classes,) for the many/medium/few evaluation (empty if unknown)."""

    def __init__(self, encoder: Classifier, hidden_dim: int, out_dim: int, num_train: int,
                 class_counts: tuple[int, ...]):
        super().__init__()
        self.encoder = encoder
        self.head = projection_head(encoder.num_features, hidden_dim, out_dim)
        self.register_buffer("bank", torch.zeros(num_train, 2, out_dim))
        self.register_buffer("bank_labels", torch.full((num_train,), -1, dtype=torch.long))
        self.register_buffer("class_counts", torch.tensor(class_counts, dtype=torch.long))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, out_dim) unit, fp32
        return F.normalize(self.head(self.encoder.features(x)).float(), dim=1)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    encoder = build_backbone(cfg.arch, info.in_channels, info.num_classes)
    return SAU(encoder, cfg.hidden_dim, cfg.out_dim, info.num_train, info.class_counts)


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    if cfg.classifier_loss not in CLASSIFIER_LOSSES:
        raise ConfigError("classifier_loss", f"one of {', '.join(CLASSIFIER_LOSSES)}", cfg.classifier_loss)
    if cfg.strategy not in STRATEGIES:
        raise ConfigError("strategy", f"one of {', '.join(STRATEGIES)}", cfg.strategy)
    for field in ("lambda_mix", "lambda_scl"):
        if getattr(cfg, field) < 0:
            raise ConfigError(field, "a loss weight >= 0", getattr(cfg, field))
    if cfg.tau <= 0:
        raise ConfigError("tau", "a temperature > 0", cfg.tau)
    if cfg.mix_alpha <= 0:
        raise ConfigError("mix_alpha", "a Beta parameter > 0", cfg.mix_alpha)


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """One group: weight decay on every parameter, BN and biases included (the official torch.optim.SGD call)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


# ---------------------------------------------------------------------------------------------- synthetic-unaware


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, K), target (B, K) probabilities -> mean over the batch of -sum_k target_k log softmax(logits)_k."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mixup(x: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, C, S, S) images and their partners -> lam x + (1 - lam) partner."""
    return lam * x + (1 - lam) * partner


def cutmix_box(height: int, width: int, lam: float, center: tuple[float, float]) -> tuple[int, int, int, int]:
    """The official box: sides sqrt(1 - lam) of the image's, centred at `center` (cy, cx) in [0, 1) of the image,
    clipped to the image and rounded -> (y0, y1, x0, x1)."""
    cy, cx = center[0] * height, center[1] * width
    h, w = height * math.sqrt(1 - lam), width * math.sqrt(1 - lam)
    y0, y1 = round(max(cy - h / 2, 0)), round(min(cy + h / 2, height))
    x0, x1 = round(max(cx - w / 2, 0)), round(min(cx + w / 2, width))
    return y0, y1, x0, x1


def cutmix(x: torch.Tensor, partner: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """(B, C, S, S) images with the partners' pixels pasted inside box (y0, y1, x0, x1) -> the images and lam, the
    share of each image that is still its own: 1 - box area / image area."""
    y0, y1, x0, x1 = box
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (x.size(2) * x.size(3))


def mix_targets(y: torch.Tensor, partner_y: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """(B,) labels of the images and of their partners -> (B, num_classes) lam one_hot(y) + (1 - lam) one_hot(y')."""
    return lam * F.one_hot(y, num_classes).float() + (1 - lam) * F.one_hot(partner_y, num_classes).float()


def _beta(alpha: float) -> float:
    return torch.distributions.Beta(alpha, alpha).sample().item()  # CPU generator: no device sync


def mix_loss(model: SAU, x1: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """L_mix: soft-label CE of the fc on a mixup and on a cutmix of view 1 (B, C, S, S) with a permutation of the
    batch as partners, one lam and one box per batch (official)."""
    num_classes = model.encoder.head.out_features
    partner = torch.randperm(len(y), device=y.device)
    lam_mix = _beta(cfg.mix_alpha)
    center = torch.rand(2).tolist()
    x_cut, lam_cut = cutmix(x1, x1[partner], cutmix_box(x1.size(2), x1.size(3), _beta(cfg.mix_alpha), center))
    logits_mix = model.encoder(mixup(x1, x1[partner], lam_mix)).float()  # (B, num_classes)
    logits_cut = model.encoder(x_cut).float()  # (B, num_classes)
    return (soft_cross_entropy(logits_mix, mix_targets(y, y[partner], lam_mix, num_classes))
            + soft_cross_entropy(logits_cut, mix_targets(y, y[partner], lam_cut, num_classes)))


# ---------------------------------------------------------------------------------------------- synthetic-aware


def sup_con(z: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss over two views: z (M, 2, d) unit embeddings, labels (M,), anchors (M,) bool ->
    the mean over anchor views of -(mean over positives of log softmax over all other 2M - 1 views).

    The 2M views are z[:, 0] then z[:, 1]; a view's positives are the other views with its label (always its own
    other view)."""
    m = len(z)
    views = torch.cat([z[:, 0], z[:, 1]])  # (2M, d)
    labels, anchors = labels.repeat(2), anchors.repeat(2)  # (2M,)
    self_mask = torch.eye(2 * m, dtype=torch.bool, device=z.device)
    logits = (views @ views.T / tau).masked_fill(self_mask, float("-inf"))  # (2M, 2M)
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask  # (2M, 2M)
    per_view = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1).clamp(min=1)  # (2M,)
    return -(per_view * anchors).sum() / anchors.sum().clamp(min=1)


@torch.no_grad()
def noisy_synthetic(z_syn: torch.Tensor, y_syn: torch.Tensor, z_ref: torch.Tensor, y_ref: torch.Tensor
                    ) -> torch.Tensor:
    """Label correction: z_syn (S, 2, d) synthetic embeddings with labels y_syn (S,), z_ref (R, 2, d) the real rows
    and prototypes with labels y_ref (R,) -> (S,) bool, True where the most cosine-similar reference row of v2 or of
    v3 (every row L2-normalised, prototypes included) has another label (all True when there is no reference row)."""
    if len(z_ref) == 0:
        return torch.ones_like(y_syn, dtype=torch.bool)
    agree = torch.ones_like(y_syn, dtype=torch.bool)
    for v in range(2):
        cosine = F.normalize(z_syn[:, v], dim=1) @ F.normalize(z_ref[:, v], dim=1).T  # (S, R)
        agree &= y_ref[cosine.argmax(dim=1)] == y_syn
    return ~agree


def apply_strategy(z_syn: torch.Tensor, y_syn: torch.Tensor, noisy: torch.Tensor, strategy: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic rows z_syn (S, 2, d), labels (S,), noisy (S,) -> the rows, labels and anchor flags L_SCL uses:
    pos_neg: labels -1, -2, ... of their own; neg_only: label -1 and not anchors; drop: noisy rows removed."""
    if strategy == "drop":
        keep = ~noisy
        return z_syn[keep], y_syn[keep], torch.ones_like(y_syn[keep], dtype=torch.bool)
    y = y_syn.clone()
    if strategy == "pos_neg":
        y[noisy] = -torch.arange(1, int(noisy.sum()) + 1, device=y.device)
        return z_syn, y, torch.ones_like(y, dtype=torch.bool)
    y[noisy] = -1
    return z_syn, y, ~noisy


def scl_loss(z: torch.Tensor, y: torch.Tensor, is_syn: torch.Tensor, prototypes: torch.Tensor,
             prototype_labels: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """L_SCL: z (B, 2, d) v2/v3 unit embeddings, y (B,), is_syn (B,) bool, prototypes (P, 2, d) with labels (P,) ->
    the loss and (S,) the noisy flags of the batch's synthetic images."""
    z_ref = torch.cat([z[~is_syn], prototypes])  # (R, 2, d): real rows and prototypes
    y_ref = torch.cat([y[~is_syn], prototype_labels])  # (R,)
    z_syn, y_syn = z[is_syn], y[is_syn]  # (S, 2, d), (S,)
    if cfg.label_correction:
        noisy = noisy_synthetic(z_syn.detach(), y_syn, z_ref.detach(), y_ref)
    else:
        noisy = torch.zeros_like(y_syn, dtype=torch.bool)
    z_syn, y_syn, syn_anchors = apply_strategy(z_syn, y_syn, noisy, cfg.strategy)
    anchors = torch.cat([torch.ones_like(y_ref, dtype=torch.bool), syn_anchors])
    return sup_con(torch.cat([z_ref, z_syn]), torch.cat([y_ref, y_syn]), anchors, cfg.tau), noisy


# ---------------------------------------------------------------------------------------------- prototype bank


@torch.no_grad()
def class_prototypes(bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """bank (N, 2, d), bank_labels (N,) (-1: empty) -> (P, 2, d) the per-class means of the filled entries (not
    re-normalised, as official) and (P,) their classes, for the P classes with at least one filled entry."""
    filled = bank_labels >= 0
    labels = bank_labels[filled]  # (F,)
    sums = bank.new_zeros(num_classes, bank[0].numel()).index_add_(0, labels, bank[filled].flatten(1))  # (C, 2d)
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    present = counts > 0
    means = sums[present] / counts[present, None]  # (P, 2d)
    return means.view(-1, *bank.shape[1:]), present.nonzero().flatten()


@torch.no_grad()
def fill_bank(model: SAU, z: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, is_syn: torch.Tensor) -> None:
    """Store every rank's real images' v2/v3 embeddings z (B, 2, d) at their pool positions idx (B,)."""
    real = all_gather_cat((~is_syn).to(torch.uint8)).bool()  # (N,): gathered as bytes (every backend has them)
    z, y, idx = all_gather_cat(z), all_gather_cat(y), all_gather_cat(idx)
    model.bank[idx[real]] = z[real].to(model.bank.dtype)
    model.bank_labels[idx[real]] = y[real]


# ---------------------------------------------------------------------------------------------- the step


@torch.no_grad()
def view1_accuracy(model: SAU, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The fc's accuracy on view 1, in eval mode (running BN statistics; the pass changes no state)."""
    was_training = model.training
    model.eval()
    acc = (model.encoder(x1).argmax(dim=1) == y).float().mean()
    model.train(was_training)
    return acc


def train_step(model: SAU, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x1, y, is_syn = batch["x1"], batch["y"], batch["is_syn"].bool()
    if cfg.classifier_loss == "mix":
        loss_mix = mix_loss(model, x1, y, cfg)  # the soft-label CE in fp32 on the fc's logits
    else:
        loss_mix = F.cross_entropy(model.encoder(x1).float(), y)  # the ablation: no mixup, no cutmix
    z = torch.stack([model.embed(batch["x2"]), model.embed(batch["x3"])], dim=1)  # (B, 2, out_dim), one pass each
    with torch.autocast(x1.device.type, enabled=False):  # SupCon at tau 0.1 and the cosine search in fp32
        prototypes, prototype_labels = class_prototypes(model.bank, model.bank_labels, model.encoder.head.out_features)
        loss_scl, noisy = scl_loss(z, y, is_syn, prototypes, prototype_labels, cfg)
    fill_bank(model, z.detach(), y, batch["idx"], is_syn)
    metrics = {"loss_mix": loss_mix.detach(), "loss_scl": loss_scl.detach(),
               "noisy_fraction": noisy.float().sum() / max(len(noisy), 1),
               "num_prototypes": torch.tensor(float(len(prototypes))), "acc": view1_accuracy(model, x1, y)}
    return cfg.lambda_mix * loss_mix + cfg.lambda_scl * loss_scl, metrics


# ---------------------------------------------------------------------------------------------- evaluation


def eval_step(model: SAU, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    logits = model.encoder(batch["x"]).float()  # (B, num_classes)
    y = batch["y"]
    correct = logits.argmax(dim=1) == y  # (B,)
    sums = {"acc": correct.sum(), "loss": F.cross_entropy(logits, y, reduction="sum"),
            "n": torch.tensor(y.numel(), device=y.device)}
    if logits.size(1) > 5:
        sums["acc5"] = (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
    if model.class_counts.numel():
        sums.update(shot_sums(correct, y, model.class_counts))
    return sums


SPEC = TrainerSpec(
    name="sau",
    paper="SAU: synthetic-aware and -unaware long-tailed recognition with generated data (ICONIP 2024)",
    Config=Config,
    TINY=TINY,
    views="sau",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    param_groups=param_groups,
    eval_summary=shot_summary,
    check=check,
)
