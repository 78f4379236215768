"""Supervised baseline: a backbone trained with cross-entropy; the reference the other methods compare against.

Config -> recipe: `arch` is the backbone (WRN-28-2 for CIFAR-10 as in FixMatch's supervised numbers, ResNet-50
for ImageNet); `label_smoothing` is epsilon of label-smoothed cross-entropy (0 = plain CE). The optimizer and
schedule come from the experiment's `optim:` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.backbones import build_backbone
from trainers._common.contract import Batch, DataInfo, TrainerSpec


@dataclass
class Config:
    """Paper defaults: CIFAR-10 supervised reference (WRN-28-2, plain cross-entropy)."""

    arch: str = "wrn28_2"  # wrn28_2, wrn28_8, small_cnn, or a timm model name
    label_smoothing: float = 0.0
    drop_rate: float = 0.0


TINY = Config(arch="small_cnn")


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return build_backbone(cfg.arch, info.in_channels, info.num_classes, cfg.drop_rate)


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(batch["x"])  # (B, num_classes)
    loss = F.cross_entropy(logits, batch["y"], label_smoothing=cfg.label_smoothing)
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
)
