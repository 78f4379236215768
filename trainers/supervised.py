"""Supervised baseline: a backbone trained with cross-entropy; the reference the other methods compare against.

Config -> recipe: `arch` is the backbone (WRN-28-2 for CIFAR-10 as in FixMatch's supervised numbers, ResNet-50
for ImageNet); `label_smoothing` is epsilon of label-smoothed cross-entropy (0 = plain CE). The optimizer and
schedule come from the experiment's `optim:` block.

Long-tailed data: `class_weighting` re-weights the cross-entropy by class, from the real training counts n_c:
"inverse" w_c ∝ 1 / n_c, "effective_number" w_c ∝ (1 - beta) / (1 - beta^n_c) (Cui et al., CVPR 2019, beta
0.9999), both scaled so that the weights sum to the number of classes; the re-weighting baseline of SAU's tables.

Fine-tuning a pre-trained encoder: `init_from` names an orchestrator checkpoint directory (it holds model.pt, the
method module's state_dict) or a model.pt file. A greenmim or simmim state (recognised by its `encoder.patch_embed.`
keys) has its Swin encoder converted by trainers.greenmim.timm_swin_state_dict and loaded strictly into the timm
backbone: `arch` must then be a timm Swin of the same sizes (e.g. swin_base_patch4_window7_224 after the paper's
Swin-B pre-training); the classification head stays freshly initialised. Any other state (a supervised checkpoint) is
loaded strictly into the whole classifier. With `init_from` empty the backbone is randomly initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.backbones import Classifier, build_backbone, check_arch
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.long_tail import shot_summary, shot_sums


@dataclass
class Config:
    """Paper defaults: CIFAR-10 supervised reference (WRN-28-2, plain cross-entropy)."""

    arch: str = "wrn28_2"  # wrn28_2, wrn28_8, small_cnn, or a timm model name
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    init_from: str = ""  # checkpoint directory or model.pt to start from ("" = random init; see the module docstring)
    class_weighting: Literal["none", "inverse", "effective_number"] = "none"
    cb_beta: float = 0.9999  # effective_number's beta
    shot_accuracy: bool = False  # also report many/medium/few-shot accuracy (long-tailed data; _common/long_tail.py)


TINY = Config(arch="small_cnn")


def build(cfg: Config, info: DataInfo) -> nn.Module:
    model = build_backbone(cfg.arch, info.in_channels, info.num_classes, cfg.drop_rate)
    if cfg.init_from:
        load_init(model, cfg)
    if cfg.class_weighting != "none":
        if len(info.class_counts) != info.num_classes:
            raise ValueError(f"config.class_weighting {cfg.class_weighting!r} needs the training set's class counts")
        weights = class_weights(info.class_counts, cfg.class_weighting, cfg.cb_beta)
        model.register_buffer("class_weights", weights, persistent=False)  # rebuilt from the data: not in model.pt
    if cfg.shot_accuracy:
        model.register_buffer("class_counts", torch.tensor(info.class_counts, dtype=torch.long), persistent=False)
    return model


def class_weights(counts: tuple[int, ...], rule: str, beta: float) -> torch.Tensor:
    """(num_classes,) cross-entropy weights from the per-class training counts, summing to num_classes."""
    n = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    weights = 1 / n if rule == "inverse" else (1 - beta) / (1 - beta**n)
    return (weights * len(counts) / weights.sum()).float()


def model_file(init_from: str) -> Path:
    """The model.pt that `init_from` names: a checkpoint directory holding it, or the file itself."""
    path = Path(init_from)
    return path / "model.pt" if path.is_dir() else path


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    if not 0 < cfg.cb_beta < 1:
        raise ConfigError("cb_beta", "a value in (0, 1)", cfg.cb_beta)
    if cfg.init_from and not model_file(cfg.init_from).is_file():
        raise ConfigError("init_from", "a checkpoint directory holding model.pt, or a model.pt file", cfg.init_from)


def load_init(model: Classifier, cfg: Config) -> None:
    """Load cfg.init_from into model: a greenmim/simmim Swin encoder into the timm backbone, else the whole state."""
    state = torch.load(model_file(cfg.init_from), map_location="cpu", weights_only=True)
    if "encoder.patch_embed.proj.weight" not in state:
        model.load_state_dict(state)
        return
    from timm.models.swin_transformer import SwinTransformer

    from trainers.greenmim import timm_swin_state_dict

    swin = getattr(model.encoder, "model", None)  # the timm model inside a timm backbone
    if not isinstance(swin, SwinTransformer):
        raise ValueError(f"init_from {cfg.init_from} holds a Swin encoder: arch must be a timm Swin, not {cfg.arch!r}")
    try:
        swin.load_state_dict(timm_swin_state_dict(state))
    except RuntimeError as err:
        raise ValueError(f"init_from {cfg.init_from}: its Swin encoder does not fit arch {cfg.arch!r}: {err}") from None


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(batch["x"])  # (B, num_classes)
    weight = getattr(model, "class_weights", None)
    loss = F.cross_entropy(logits, batch["y"], weight=weight, label_smoothing=cfg.label_smoothing)
    acc = (logits.argmax(1) == batch["y"]).float().mean()
    return loss, {"acc": acc.detach()}


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    logits = model(batch["x"]).float()  # (B, num_classes)
    y = batch["y"]
    sums = {
        "acc": (logits.argmax(1) == y).sum(),
        "loss": F.cross_entropy(logits, y, reduction="sum"),
        "n": torch.tensor(y.numel(), device=y.device),
    }
    if logits.size(1) > 5:
        sums["acc5"] = (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    if (counts := getattr(model, "class_counts", None)) is not None:
        sums.update(shot_sums(logits.argmax(1) == y, y, counts))
    return sums


SPEC = TrainerSpec(
    name="supervised",
    paper="baseline (cross-entropy)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    eval_summary=shot_summary,
    check=check,
    path_fields=("init_from",),
)
