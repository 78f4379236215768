"""Backbones shared by the methods: WRN-28-k and a small CNN for 32 px inputs, and any timm model by name.

Every backbone is a `Classifier`: `features(x) -> (B, D)` pooled features, `head` the linear classifier, and
`forward(x) = head(features(x))`, so methods that need features, projections or logits all use one interface.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.contract import ConfigError


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.encoder, self.num_features = encoder, num_features
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))


class _WideBlock(nn.Module):
    """Pre-activation basic block of WRN as in the FixMatch code: BN momentum 0.001, LeakyReLU(0.1)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=0.001)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=0.001)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(x), 0.1)
        if self.shortcut is not None and self.activate_before_residual:
            x = out
        y = self.conv2(F.leaky_relu(self.bn2(self.conv1(out)), 0.1))
        return y + (x if self.shortcut is None else self.shortcut(out if self.activate_before_residual else x))


def wide_resnet(depth: int, widen: int, in_channels: int, num_classes: int, drop_rate: float = 0.0) -> Classifier:
    """WRN-depth-widen for 32 px inputs: (B, C, 32, 32) -> 64*widen features."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
    for group, stride in zip(range(3), (1, 2, 2)):
        for i in range(n):
            c_in = widths[group] if i == 0 else widths[group + 1]
            layers.append(_WideBlock(c_in, widths[group + 1], stride if i == 0 else 1, group == 0 and i == 0))
    layers += [nn.BatchNorm2d(widths[3], momentum=0.001), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Dropout(drop_rate)]
    model = Classifier(nn.Sequential(*layers), widths[3], num_classes)
    _init_like_fixmatch(model)
    return model


def _init_like_fixmatch(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


def small_cnn(in_channels: int, num_classes: int, width: int = 32) -> Classifier:
    """Three conv-BN-ReLU stages for small images (8-32 px): (B, C, H, W) -> 4*width features."""
    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    encoder = nn.Sequential(*stage(in_channels, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(encoder, 4 * width, num_classes)


class _TimmEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def timm_backbone(name: str, in_channels: int, num_classes: int, drop_rate: float = 0.0) -> Classifier:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, drop_rate=drop_rate)
    return Classifier(_TimmEncoder(model), model.num_features, num_classes)


def build_backbone(arch: str, in_channels: int, num_classes: int, drop_rate: float = 0.0) -> Classifier:
    """`wrn28_2`, `wrn28_8`, `wrn<depth>_<widen>`, `small_cnn`, a member of a NAS search space written
    `<space>:<code>` (e.g. `nas_bench_macro:22212220`, see trainers/nas), or any timm model name (`resnet50`)."""
    if ":" in arch:
        from trainers.nas import parse_arch_value

        space, code = parse_arch_value(arch)
        return space.build(code, num_classes, in_channels)
    if arch == "small_cnn":
        return small_cnn(in_channels, num_classes)
    if arch.startswith("wrn"):
        depth, widen = (int(v) for v in arch.removeprefix("wrn").split("_"))
        return wide_resnet(depth, widen, in_channels, num_classes, drop_rate)
    return timm_backbone(arch, in_channels, num_classes, drop_rate)


def feature_map(backbone: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The backbone's spatial map before global pooling: (B, C, H, W) -> (B, D, h, w); average-pooled it is
    `backbone.features(x)` (in eval mode, or without dropout).

    Sequential encoders (small_cnn, WRN, the NAS-Bench and Channel-Bench spaces) run every layer before their
    AdaptiveAvgPool2d, which only Flatten, Dropout or Identity may follow. timm backbones return `forward_features`,
    which must be an NCHW map of `num_features` channels (ResNets; not ViTs, nor Swin's NHWC maps). A timm head that
    normalises after pooling (ConvNeXt) makes the pooled map differ from `features()`.
    """
    encoder = backbone.encoder
    if isinstance(encoder, _TimmEncoder):
        return _timm_feature_map(encoder.model, x)
    if isinstance(encoder, nn.Sequential):
        return encoder[:_pool_index(encoder)](x)
    raise ValueError(f"feature_map: no spatial map for encoder {type(encoder).__name__}")


def _pool_index(encoder: nn.Sequential) -> int:
    """Position of the encoder's global AdaptiveAvgPool2d, checked to be followed by shape-only layers."""
    pools = [i for i, layer in enumerate(encoder) if isinstance(layer, nn.AdaptiveAvgPool2d)]
    shape_only = (nn.Flatten, nn.Dropout, nn.Identity)
    if not pools or not all(isinstance(layer, shape_only) for layer in encoder[pools[-1] + 1:]):
        raise ValueError("feature_map: the encoder must end in AdaptiveAvgPool2d followed only by Flatten/Dropout/"
                         "Identity, so that its spatial map pools to its features")
    return pools[-1]


def _timm_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    if getattr(model, "output_fmt", "NCHW") != "NCHW" or out.ndim != 4 or out.size(1) != model.num_features:
        raise ValueError(f"feature_map: timm model {type(model).__name__} gives features of shape "
                         f"{tuple(out.shape)}, not an NCHW map of {model.num_features} channels (use a CNN such "
                         "as resnet50)")
    return out


def check_arch(arch: str) -> None:
    """ConfigError on `arch` unless `build_backbone` knows it; checked without building anything."""
    if ":" in arch:
        from trainers.nas import InvalidArchitecture, parse_arch_value

        try:
            parse_arch_value(arch)
        except (KeyError, InvalidArchitecture) as err:
            raise ConfigError("arch", f"an architecture <space>:<code> of a known search space ({err.args[0]})",
                              arch) from None
        return
    wrn = re.fullmatch(r"wrn(\d+)_(\d+)", arch)
    if wrn and (int(wrn[1]) < 10 or int(wrn[2]) < 1):
        raise ConfigError("arch", "wrn<depth>_<widen> with depth >= 10 (3 groups of (depth - 4) // 6 blocks) and "
                          "widen >= 1", arch)
    if arch != "small_cnn" and not wrn:
        import timm

        if not timm.is_model(arch):
            raise ConfigError("arch", "small_cnn, wrn<depth>_<widen>, <space>:<code> (trainers/nas) or a timm "
                              "model name", arch)


def check_config_arch(cfg: Any) -> None:
    """`TrainerSpec.check` of the methods whose Config names its backbone in `arch`."""
    check_arch(cfg.arch)
