"""Evaluating a learned representation: a linear probe and a kNN classifier on frozen features.

The standard protocols of the self-supervised papers (ReSSL, WCL, LEWEL; MoCo's kNN monitor), as a run of their
own that takes a pre-training run's checkpoint:

- **Linear probe.** The encoder is frozen (weights and batch-norm statistics: it stays in eval mode); only a fresh
  linear classifier on its pooled features is trained with cross-entropy, after a batch norm without affine
  parameters (MAE's linear probing, `feature_norm`), which makes one learning rate fit encoders whose feature scales
  differ by orders of magnitude (a random encoder's are tiny). `eval/acc` is its test accuracy.
- **kNN (offline).** Every training image's L2-normalised feature is stored in a bank as the probe trains (the
  encoder is frozen, so after one epoch the bank holds the whole training set). A test image's k nearest bank
  entries by cosine similarity s vote for their labels with weight exp(s / T) (Wu et al. 2018, the kNN monitor of
  InstDisc and MoCo: k = 200, T = 0.07). `eval/knn_acc` is its test accuracy; entries not yet filled do not vote.
  The bank holds features of the training view (crop + flip), not of the evaluation transform.

`init_from` names the checkpoint: a directory with model.pt (the orchestrator also accepts `mlflow:<run_id>` and
resolves it to that run's latest complete checkpoint, linking the two runs in MLflow). Empty, the encoder is
randomly initialised: the baseline a representation has to beat. The encoder's weights are the
state-dict entries under `encoder.encoder.` (the representation methods keep their online backbone at
`model.encoder`) or, for a supervised checkpoint, under `encoder.`.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_gather_cat


@dataclass
class Config:
    """A frozen encoder of architecture `arch` from `init_from`, probed linearly and by kNN."""

    arch: str = "resnet50"  # the pre-trained encoder's backbone (as in its own experiment file)
    init_from: str = ""  # the pre-training run's checkpoint directory, model.pt or mlflow:<run_id>; "" = random
    knn_k: int = 200  # neighbours that vote (Wu et al. 2018)
    knn_t: float = 0.07  # vote weight exp(cosine / knn_t)
    feature_norm: bool = True  # BatchNorm1d(affine=False) before the linear classifier (MAE); False: plain linear


TINY = Config(arch="small_cnn", knn_k=5)


class LinearProbe(nn.Module):
    """`encoder`: the frozen backbone, whose `head` is the trained linear classifier (after `norm`); a bank of
    normalised train features (num_train, D) and their labels (-1: not filled yet)."""

    def __init__(self, encoder: Classifier, num_train: int, feature_norm: bool):
        super().__init__()
        self.encoder = encoder
        for p in encoder.encoder.parameters():
            p.requires_grad_(False)
        self.norm = nn.BatchNorm1d(encoder.num_features, affine=False) if feature_norm else nn.Identity()
        self.register_buffer("bank", torch.zeros(num_train, encoder.num_features))
        self.register_buffer("bank_labels", torch.full((num_train,), -1, dtype=torch.long))

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.encoder.eval()  # frozen batch-norm statistics
        return self

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        with torch.no_grad():
            return self.encoder.features(x)

    def classify(self, h: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, num_classes)
        return self.encoder.head(self.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classify(self.frozen_features(x))


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    if cfg.init_from and not supervised.model_file(cfg.init_from).is_file():
        raise ConfigError("init_from", "the pre-training run's checkpoint directory (holding model.pt), a model.pt "
                          "file, or mlflow:<run_id>", cfg.init_from)


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of a checkpoint's model state, without their prefix."""
    prefix = "encoder.encoder." if any(k.startswith("encoder.encoder.") for k in state) else "encoder."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def build(cfg: Config, info: DataInfo) -> nn.Module:
    backbone = build_backbone(cfg.arch, info.in_channels, info.num_classes)
    if not cfg.init_from:
        return LinearProbe(backbone, info.num_train, cfg.feature_norm)
    state = torch.load(supervised.model_file(cfg.init_from), map_location="cpu", weights_only=True)
    try:
        backbone.encoder.load_state_dict(encoder_state(state))
    except RuntimeError as err:
        raise ValueError(f"init_from {cfg.init_from}: its encoder does not fit arch {cfg.arch!r}: {err}") from None
    return LinearProbe(backbone, info.num_train, cfg.feature_norm)


@torch.no_grad()
def fill_bank(model: LinearProbe, h: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
    """Store this step's features of every rank: h (B, D), y (B,), idx (B,) positions in the training set."""
    h, y, idx = all_gather_cat(h), all_gather_cat(y), all_gather_cat(idx)
    model.bank[idx] = F.normalize(h.float(), dim=1)
    model.bank_labels[idx] = y


def knn_predict(h: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
                t: float) -> torch.Tensor:
    """Weighted kNN votes: h (B, D), bank (N, D) normalised, bank_labels (N,) with -1 for empty -> (B, num_classes)."""
    similarity = F.normalize(h.float(), dim=1) @ bank.T  # (B, N)
    similarity = similarity.masked_fill(bank_labels[None] < 0, float("-inf"))
    top, index = similarity.topk(min(k, int((bank_labels >= 0).sum())), dim=1)  # (B, k)
    votes = F.one_hot(bank_labels[index], num_classes).float() * (top / t).exp()[..., None]  # (B, k, classes)
    return votes.sum(1)


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    h = model.frozen_features(batch["x"])  # (B, D)
    fill_bank(model, h, batch["y"], batch["idx"])
    logits = model.classify(h)  # (B, num_classes)
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"acc": (logits.argmax(1) == batch["y"]).float().mean().detach()}


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    sums = supervised.eval_step(model, batch, cfg)
    if (model.bank_labels >= 0).any():
        h = model.frozen_features(batch["x"])
        votes = knn_predict(h, model.bank, model.bank_labels, model.encoder.head.out_features, cfg.knn_k, cfg.knn_t)
        sums["knn_acc"] = (votes.argmax(1) == batch["y"]).sum()
    return sums


SPEC = TrainerSpec(
    name="linear_probe",
    paper="linear probe and kNN (Wu et al., CVPR 2018) on frozen features: the evaluation of ReSSL, WCL, LEWEL",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    check=check,
    path_fields=("init_from",),
)
