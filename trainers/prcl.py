"""PRCL: Probabilistic Representation Contrastive Learning for semi-supervised semantic segmentation (Xie et al.,
AAAI 2023).

Spec: ../shared/papers/methods_ssl.md section 7. Official code: github.com/Haoyu-Xie/PRCL, prcl_sig.py (loop),
generalframeworks/networks/ddp_model.py (Model_with_un: teacher, pseudo-labels), networks/uncer_head.py,
networks/deeplabv3/deeplabv3.py (DeepLabv3Plus_with_un), loss/loss.py (Prcl_Loss, Attention_Threshold_Loss, MLS),
dataset_helpers/VOC.py (batch_transform, generate_class_mask), config/VOC_prcl_config_662.yaml.

A DeepLabv3+ student maps an image to the 304-d decoder feature f, class logits, a representation mu (256-d) and,
through a separate uncertainty head, a variance sigma^2 in (0, 1) per dimension: each pixel is N(mu, diag sigma^2).
A mean teacher (the EMA of the DeepLabv3+, not of the uncertainty head) labels the raw unlabeled image u; image,
pseudo-label and confidence are then rescaled and cropped, ClassMixed within the batch, colour-jittered, blurred and
flipped together, and the student learns on the result.

    MLS(a, b)  = -1/2 mean_d [(mu_a - mu_b)^2 / (s2_a + s2_b) + log(s2_a + s2_b)]       mu L2-normalised first
    s2_c       = 1 / sum_{i in c} 1 / s2_i,   mu_c = sum_{i in c} (s2_c / s2_i) mu_i        prototype of class c
    L_sup      = CE(student(x), y)
    L_unsup    = mean over non-ignored pixels of w_b CE(student(A(u))_p, yhat_p),
                 w_b = share of image b's pixels with confidence >= 0.97
    L_prcl     = 1/|P| sum_{c in P} mean_{anchors a} CE([MLS(a, proto_c), MLS(a, n_1..n_K)] / temp, 0)
    L          = L_sup + L_unsup + lambda_c L_prcl,   lambda_c = exp(-5 (t / T)^2) for t < T, then 0

P are the classes among the valid pixels (labeled pixels, unlabeled pixels with confidence >= 0.7), taken at the
decoder's resolution with labels downsampled by nearest. The anchors of c are num_queries pixels drawn with
replacement from c's "hard" pixels (student probability of c below 0.8; a class with none adds nothing but still
counts in |P|). Each anchor gets num_negatives negatives: a class j != c drawn with probability
softmax_j(MLS(proto_c, proto_j) / temp), then a pixel of j uniformly. Prototypes and negatives carry no gradient
(official `torch.no_grad()`); gradients reach mu and sigma^2 through the anchors.

Paper symbol / official key -> Config field:
    backbone (ResNet-101, ImageNet-pretrained, output stride 16)    backbone, pretrained
    ASPP dilations 6/12/18, 256 channels; 48-d low-level projection   aspp_dilations, aspp_dim, low_level_dim
    classifier / representation heads (3x3 conv 256, 1x1 conv)       head_dim, rep_dim (mu and sigma^2: 256)
    EMA alpha 0.99                                                     ema_decay
    scale_size (0.5, 1.5) (VOC; CityScapes 0.5-2.0)                    scale_range
    colour jitter p 0.8, blur p 0.5 with sigma 0.15-1.15, flip p 0.5  jitter_p, blur_p, blur_sigma, flip_p
    un_threshold 0.97, weak_threshold 0.7, strong_threshold 0.8        unsup_threshold, weak_threshold, hard_threshold
    temp 100, num_queries 256, num_negatives 512                       temp, num_queries, num_negatives
    Ramp_Scheduler max_epoch 200 (ramp_mult -5)                        ramp_steps (the run's length in steps)
    lr 3.2e-3 and uncer_lr 5e-5                                        lr, uncertainty_lr (the experiment's optim.lr
                                                                       must equal lr; only the ratio is used here)
The optimizer is the experiment's (official: SGD Nesterov, momentum 0.9, wd 5e-4 on every parameter, PolyLR 0.9).

Batches (the "segmentation" view): x (B, 3, H, W), y (B, H, W) with 255 = ignore, u (B, mu, 3, H, W) or
(B_u, 3, H, W) raw normalised unlabeled crops, and optionally u_valid (same layout, False on padding), where the
pseudo-label is 255 and the confidence 0.

Step indexing: train_step(step) gets the optimizer steps done so far, so lambda_c uses t = step. on_step_end(step)
gets the steps done after the update and applies the official EMA update number t = step - 1, decay
min(1 - 1/(t + 1), ema_decay): the first update copies the student (decay 0).

Evaluation: the EMA teacher (official `test(model.ema_model)`), whole images, logits upsampled to the label size;
eval_step sums per-class intersections and unions (ignore 255 excluded), eval_summary turns them into iouNNN and
miou over the classes with a non-empty union; eval_figure draws image, ground truth and prediction side by side.

`unsup_weight: 0, prcl_weight: 0` is the supervised-only baseline on the same network, data and schedule (its EMA
teacher evaluated the same way).

Deviations from the official code, with reasons:
1. ClassMix mixes within this rank's batch (official: across all GPUs); prototypes do use every rank's pixels (their
   per-class sums are all-reduced, the same precision-weighted mean as gathering the pixels).
2. Augmentations run on tensors, seeded by torch's global RNG (official: PIL per image). Hue is a rotation of the
   chroma in YIQ space (an approximation of PIL's HSV hue shift); the blur is a separable 9-tap Gaussian with
   replicated borders; the rescale pads with 0 in normalised space (the mean colour; official: reflect), label 255
   and confidence 0 where the rescaled image is smaller than the crop; jitter applies brightness, contrast,
   saturation, hue in this fixed order (torchvision: random order).
3. The uncertainty head's layers are 1x1 convs under torch's weight_norm (official: F.normalize of the weight rows,
   no gain); the gain is per output channel and the BatchNorm that follows divides it out.
4. L_unsup averages over the non-ignored pixels (official: over pixels with loss > 0, which differs only where the
   CE is exactly 0) and is 0, not NaN, when every pixel is ignored.
5. When fewer than two classes are present L_prcl is 0 * (sum mu + sum sigma^2) (official: a constant 0, with this
   trick commented out "for DDP"): every parameter stays in the graph, as DDP requires.
6. The evaluation uses info.num_classes (official `test()` hard-codes 21).
7. lambda_c is recomputed at every optimizer step from t / T with T = ramp_steps; the official RampdownScheduler
   steps once per epoch (`sche_d.step()` after each epoch's loop; the loop reads `sche_d.value` at every iteration),
   so there lambda_c is the constant exp(-5 (e / 200)^2) throughout epoch e = 0..199 (from 1 to 0.0071; its 0 from
   epoch 200 on is never reached). The orchestrator is step-based and a method does not know the steps per epoch;
   with ramp_steps = 200 x steps per epoch the two agree at the first step of every epoch, and within epoch e this
   one lies between the official values of epochs e and e + 1 (last step: exp(-5 (1 - 1/T)^2) ~ 0.0067).
   Likewise the official PolyLR (power 0.9, floor 1e-6) steps once per epoch; `optim.schedule: poly` steps per
   optimizer step, without the floor.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.dist import all_reduce_mean, world_size
from trainers._common.ema import make_teacher

IGNORE = 255  # label of pixels without a class (VOC boundaries, padding)
FIGURE_ROWS = 4  # images in the evaluation figure
LOG_FLOOR = math.log(1e-6)  # official `log(exp(x) + 1e-6)` before the sigmoid: sigma^2 >= sigmoid(log 1e-6)
LUMA = (0.299, 0.587, 0.114)  # RGB -> grey (ITU-R 601-2, as PIL and torchvision)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass
class Config:
    """The official VOC recipe (config/VOC_prcl_config_662.yaml): DeepLabv3+ ResNet-101 OS16, 256-d mu and sigma^2,
    EMA 0.99, thresholds 0.97 / 0.7 / 0.8, temp 100, 256 anchors x 512 negatives, lambda_c ramped down over the run."""

    backbone: str = "resnet101"  # any timm ResNet with features_only and output_stride
    pretrained: bool = False  # ImageNet weights through timm (paper: pretrained; needs network or a local cache)
    aspp_dim: int = 256
    aspp_dilations: tuple[int, int, int] = (6, 12, 18)
    low_level_dim: int = 48  # decoder feature: low_level_dim + aspp_dim = 304
    head_dim: int = 256  # hidden width of the classifier and representation heads
    rep_dim: int = 256  # D of mu and sigma^2
    ema_decay: float = 0.99
    scale_range: tuple[float, float] = (0.5, 1.5)  # rescale of the unlabeled batch (VOC; CityScapes 0.5-2.0)
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    flip_p: float = 0.5
    unsup_threshold: float = 0.97  # confidence counted in an image's L_unsup weight
    weak_threshold: float = 0.7  # confidence of an unlabeled pixel that enters L_prcl
    hard_threshold: float = 0.8  # anchors: pixels whose student probability of their class is below this
    temp: float = 100.0
    num_queries: int = 256  # anchors per class
    num_negatives: int = 512  # negatives per anchor
    ramp_steps: int = 200_000  # T of lambda_c: 200 epochs of ~1000 steps (prcl_sig.py: 2000 labeled crops at batch 2)
    lr: float = 3.2e-3  # the network's lr: set optim.lr to it
    uncertainty_lr: float = 5e-5  # the uncertainty head's lr ("very sensitive", README)
    unsup_weight: float = 1.0  # weight of L_unsup (0, with prcl_weight 0: the supervised-only baseline)
    prcl_weight: float = 1.0  # weight of lambda_c L_prcl


TINY = Config(backbone="resnet18", aspp_dim=32, low_level_dim=8, head_dim=32, rep_dim=16, num_queries=8,
              num_negatives=16, ramp_steps=100)


# ---------------------------------------------------------------------------------------------- model


def conv_bn_relu(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ASPP(nn.Module):
    """1x1, three dilated 3x3 and an image-pooling branch, concatenated and projected (ReCo's aspp.py, no dropout)."""

    def __init__(self, c_in: int, dim: int, dilations: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(c_in, dim, 1)] + [conv_bn_relu(c_in, dim, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(c_in, dim, 1))
        self.project = conv_bn_relu((len(dilations) + 2) * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, h, w) -> (B, dim, h, w)
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


def head(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """3x3 conv-BN-ReLU, 1x1 conv: the official classifier and representation heads."""
    return nn.Sequential(conv_bn_relu(c_in, hidden, 3), nn.Conv2d(hidden, c_out, 1))


class DeepLabV3Plus(nn.Module):
    """ResNet (OS 16) -> ASPP; decoder feature = [48-d projection of layer1, ASPP upsampled to layer1's size]."""

    def __init__(self, cfg: Config, in_channels: int, num_classes: int):
        super().__init__()
        self.backbone = timm.create_model(cfg.backbone, features_only=True, output_stride=16, out_indices=(1, 4),
                                          pretrained=cfg.pretrained, in_chans=in_channels)
        low, high = self.backbone.feature_info.channels()
        self.aspp = ASPP(high, cfg.aspp_dim, cfg.aspp_dilations)
        self.project = conv_bn_relu(low, cfg.low_level_dim, 1)
        self.classifier = head(cfg.low_level_dim + cfg.aspp_dim, cfg.head_dim, num_classes)
        self.representation = head(cfg.low_level_dim + cfg.aspp_dim, cfg.head_dim, cfg.rep_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, K, H/4, W/4), mu (B, D, H/4, W/4), decoder feature (B, 304, H/4, W/4)."""
        low, high = self.backbone(x)
        low = self.project(low)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        feature = torch.cat([low, high], dim=1)
        return self.classifier(feature), self.representation(feature), feature


class UncertaintyHead(nn.Module):
    """sigma^2 = sigmoid(softplus-floored(gamma * BN'(W2 ReLU(BN(W1 f))) + beta)), W weight-normalised, BN' affine-free."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.fc1 = weight_norm(nn.Conv2d(c_in, dim, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(dim)
        self.fc2 = weight_norm(nn.Conv2d(dim, dim, 1, bias=False))
        self.bn2 = nn.BatchNorm2d(dim, affine=False)
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:  # (B, 304, h, w) -> sigma^2 (B, D, h, w) in (0, 1)
        x = self.bn2(self.fc2(F.relu(self.bn1(self.fc1(feature)))))
        x = self.gamma * x + self.beta
        return torch.sigmoid(torch.logaddexp(x, torch.full_like(x, LOG_FLOOR)))


class PRCL(nn.Module):
    """The student DeepLabv3+, its uncertainty head, the EMA teacher (evaluated) and the data normalisation."""

    def __init__(self, cfg: Config, info: DataInfo):
        super().__init__()
        self.num_classes = info.num_classes
        self.student = DeepLabV3Plus(cfg, info.in_channels, info.num_classes)
        self.uncertainty = UncertaintyHead(cfg.low_level_dim + cfg.aspp_dim, cfg.rep_dim)
        self.teacher = make_teacher(self.student)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at the input size (B, K, H, W): the evaluated model."""
        return upsample(self.teacher(x)[0], x.shape[-2:])


def build(cfg: Config, info: DataInfo) -> nn.Module:
    if info.in_channels != 3 or len(info.mean) != 3 or len(info.std) != 3:
        raise ValueError("prcl needs RGB images with DataInfo.mean and std (its colour jitter works in RGB)")
    return PRCL(cfg, info)


def check(cfg: Config) -> None:
    for field in ("aspp_dim", "low_level_dim", "head_dim", "rep_dim", "num_queries", "num_negatives", "ramp_steps"):
        if getattr(cfg, field) < 1:
            raise ConfigError(field, "a positive integer", getattr(cfg, field))
    for field in ("ema_decay", "jitter_p", "blur_p", "flip_p", "unsup_threshold", "weak_threshold", "hard_threshold"):
        if not 0.0 <= getattr(cfg, field) <= 1.0:
            raise ConfigError(field, "a value in [0, 1]", getattr(cfg, field))
    for field in ("scale_range", "blur_sigma"):
        low, high = getattr(cfg, field)
        if not 0.0 < low <= high:
            raise ConfigError(field, "a range (low, high) with 0 < low <= high", getattr(cfg, field))
    for field in ("unsup_weight", "prcl_weight"):
        if getattr(cfg, field) < 0:
            raise ConfigError(field, "a weight >= 0", getattr(cfg, field))
    for field in ("temp", "lr", "uncertainty_lr"):
        if getattr(cfg, field) <= 0:
            raise ConfigError(field, "a positive value", getattr(cfg, field))


def param_groups(model: PRCL, cfg: Config) -> list[dict[str, Any]]:
    """Official: weight decay on every parameter; the uncertainty head at uncertainty_lr (its own optimizer there)."""
    return [{"params": list(model.student.parameters())},
            {"params": list(model.uncertainty.parameters()), "lr_scale": cfg.uncertainty_lr / cfg.lr}]


def upsample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------- augmentation


def rescale_crop(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, scale_range: tuple[float, float]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: resize by s ~ U(scale_range) (image bilinear, label and confidence nearest), pad to at least H x W
    (image 0, label IGNORE, confidence 0), crop H x W at a random place. (B, C, H, W), (B, H, W), (B, H, W)."""
    H, W = image.shape[-2:]
    out = []
    for b in range(len(image)):
        s = float(torch.empty(()).uniform_(*scale_range))
        size = (int(H * s), int(W * s))
        img = F.interpolate(image[b:b + 1], size=size, mode="bilinear", align_corners=False)
        lab_conf = F.interpolate(torch.stack([label[b].to(conf.dtype), conf[b]])[None], size=size, mode="nearest")
        pad = (0, max(W - size[1], 0), 0, max(H - size[0], 0))
        img = F.pad(img, pad)
        lab = F.pad(lab_conf[:, :1], pad, value=IGNORE)
        cf = F.pad(lab_conf[:, 1:], pad)
        top = int(torch.randint(img.shape[-2] - H + 1, ()))
        left = int(torch.randint(img.shape[-1] - W + 1, ()))
        out.append([t[0, ..., top:top + H, left:left + W] for t in (img, lab, cf)])
    img, lab, cf = (torch.stack(parts) for parts in zip(*out))
    return img, lab[:, 0].long(), cf[:, 0]


def class_mix(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix: image i keeps the pixels of half (rounded down) of the values in its label map (IGNORE counts as
    one, as official) and takes every other pixel from image i + 1 (mod B). Returns the mixed tensors."""
    masks = []
    for b in range(len(label)):
        values = label[b].unique()
        chosen = values[torch.randperm(len(values))[: len(values) // 2].to(values.device)]
        masks.append(torch.isin(label[b], chosen))
    mask = torch.stack(masks)  # (B, H, W): pixels kept from image i
    return (torch.where(mask[:, None], image, image.roll(-1, 0)), torch.where(mask, label, label.roll(-1, 0)),
            torch.where(mask, conf, conf.roll(-1, 0)))


def luma(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, 1, H, W)
    return torch.einsum("c,bchw->bhw", x.new_tensor(LUMA), x)[:, None]


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def hue_rotate(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate each image's chroma (I, Q in YIQ) by 2 pi hue (B,): (B, 3, H, W) -> (B, 3, H, W)."""
    to_yiq = x.new_tensor(RGB_TO_YIQ)
    cos, sin = torch.cos(2 * math.pi * hue), torch.sin(2 * math.pi * hue)
    rotation = torch.zeros(len(hue), 3, 3, dtype=x.dtype, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)


def colour_jitter(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, p: float) -> torch.Tensor:
    """With probability p per image: brightness, contrast, saturation x U(0.75, 1.25), hue + U(-0.25, 0.25), on the
    un-normalised image in [0, 1]; returns the re-normalised image (B, 3, H, W)."""
    B = len(image)
    factors = torch.empty(3, B).uniform_(0.75, 1.25).to(image.device).view(3, B, 1, 1, 1)
    hue = torch.empty(B).uniform_(-0.25, 0.25).to(image.device)
    apply = (torch.rand(B) < p).to(image.device).view(B, 1, 1, 1)
    x = (image * std + mean).clamp(0, 1)
    x = (x * factors[0]).clamp(0, 1)
    x = blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factors[1])
    x = blend(x, luma(x), factors[2])
    x = hue_rotate(x, hue)
    return torch.where(apply, (x - mean) / std, image)


def gaussian_blur(image: torch.Tensor, sigma_range: tuple[float, float], p: float) -> torch.Tensor:
    """With probability p per image: a separable Gaussian of sigma ~ U(sigma_range), replicated borders."""
    B, C, H, W = image.shape
    sigma = torch.empty(B, 1).uniform_(*sigma_range)
    half = math.ceil(3 * sigma_range[1])
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(image).repeat_interleave(C, 0)  # (B*C, 2 half + 1)
    x = image.reshape(1, B * C, H, W)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=B * C)
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel[:, None, :, None], groups=B * C)
    apply = (torch.rand(B) < p).to(image.device).view(B, 1, 1, 1)
    return torch.where(apply, x.view(B, C, H, W), image)


def hflip(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, p: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flip = (torch.rand(len(image)) < p).to(image.device)
    return tuple(torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t) for t in (image, label, conf))


@torch.no_grad()
def strong_view(model: PRCL, u: torch.Tensor, u_valid: torch.Tensor, cfg: Config
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's pseudo-labels on the raw u (B, 3, H, W), then the joint augmentation: image (B, 3, H, W),
    pseudo-label (B, H, W) int64 and confidence (B, H, W), IGNORE and 0 on padding (u_valid False, or added here)."""
    logits = upsample(model.teacher(u)[0], u.shape[-2:]).float()
    conf, label = torch.softmax(logits, dim=1).max(dim=1)
    conf, label = conf * u_valid, torch.where(u_valid, label, torch.full_like(label, IGNORE))
    u, label, conf = rescale_crop(u, label, conf, cfg.scale_range)
    u, label, conf = class_mix(u, label, conf)
    u = colour_jitter(u, model.mean, model.std, cfg.jitter_p)
    u = gaussian_blur(u, cfg.blur_sigma, cfg.blur_p)
    return hflip(u, label, conf, cfg.flip_p)


# ---------------------------------------------------------------------------------------------- losses


def image_weights(label: torch.Tensor, conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """w_b = (# pixels of b with confidence >= threshold) / (# non-ignored pixels of b): (B, H, W) x 2 -> (B,)."""
    confident = (conf >= threshold) & (label != IGNORE)
    return confident.flatten(1).sum(1) / (label != IGNORE).flatten(1).sum(1).clamp(min=1)


def unsup_loss(logits: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean over the non-ignored pixels of w_b CE: logits (B, K, H, W), label, conf (B, H, W) -> ()."""
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")  # (B, H, W), 0 where ignored
    weighted = image_weights(label, conf, threshold)[:, None, None] * ce
    return weighted.sum() / (label != IGNORE).sum().clamp(min=1)


def mls(mu_a: torch.Tensor, mu_b: torch.Tensor, s2_a: torch.Tensor, s2_b: torch.Tensor) -> torch.Tensor:
    """Mutual likelihood score over the last dim (broadcasting): (..., D) x 4 -> (...)."""
    mu_a, mu_b = F.normalize(mu_a, dim=-1), F.normalize(mu_b, dim=-1)
    s2 = s2_a + s2_b
    return -0.5 * ((mu_a - mu_b) ** 2 / s2 + s2.log()).mean(dim=-1)


@torch.no_grad()
def prototypes(mu: torch.Tensor, s2: torch.Tensor, label: torch.Tensor, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c over its pixels i on every rank: s2_c = 1 / sum 1/s2_i, mu_c = sum (s2_c / s2_i) mu_i.
    mu, s2 (N, D), label (N,) -> mu_c, s2_c (num_classes, D); rows of absent classes are not finite."""
    onehot = F.one_hot(label, num_classes).to(s2.dtype).T  # (C, N)
    sums = all_reduce_mean(torch.stack([onehot @ (1 / s2), onehot @ (mu / s2)])) * world_size()  # (2, C, D)
    precision, weighted = sums
    return weighted / precision, 1 / precision


def sample_anchors(label: torch.Tensor, prob: torch.Tensor, c: int, threshold: float, num: int) -> torch.Tensor:
    """num pixel indices drawn with replacement among class c's pixels with prob < threshold; empty if none."""
    hard = ((label == c) & (prob < threshold)).nonzero().squeeze(1)
    if len(hard) == 0:
        return hard
    return hard[torch.randint(len(hard), (num,), device=hard.device)]


def sample_negatives(label: torch.Tensor, present: torch.Tensor, i: int, proto_mu: torch.Tensor,
                     proto_s2: torch.Tensor, shape: tuple[int, int], temp: float) -> torch.Tensor:
    """Pixel indices (Q, K) of negatives for class present[i]: a class j != present[i] of `present` with probability
    softmax_j(MLS(proto_c, proto_j) / temp), then one of j's pixels uniformly."""
    c, others = present[i], torch.cat([present[:i], present[i + 1:]])
    scores = mls(proto_mu[c][None], proto_mu[others], proto_s2[c][None], proto_s2[others])  # (P - 1,)
    drawn = torch.multinomial(torch.softmax(scores / temp, dim=0), shape[0] * shape[1], replacement=True)
    order = label.argsort(stable=True)  # pixels grouped by class, classes ascending
    counts = (label[:, None] == present[None]).sum(0)  # (P,)
    starts = counts.cumsum(0) - counts
    others_counts, others_starts = torch.cat([counts[:i], counts[i + 1:]]), torch.cat([starts[:i], starts[i + 1:]])
    count = others_counts[drawn]
    within = torch.minimum((torch.rand(len(drawn), device=label.device) * count).long(), count - 1)
    return order[others_starts[drawn] + within].view(shape)


def anchor_loss(a_mu: torch.Tensor, a_s2: torch.Tensor, key_mu: torch.Tensor, key_s2: torch.Tensor, temp: float
                ) -> torch.Tensor:
    """CE(MLS(anchor, keys) / temp, 0): anchors (Q, D), keys (Q, 1 + K, D) with the positive first -> ()."""
    logits = mls(a_mu[:, None], key_mu, a_s2[:, None], key_s2) / temp  # (Q, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def prcl_loss(mu: torch.Tensor, s2: torch.Tensor, label: torch.Tensor, prob: torch.Tensor, num_classes: int,
              cfg: Config) -> torch.Tensor:
    """L_prcl over the valid pixels: mu, s2 (N, D), label (N,), prob (N,) the student's probability of label."""
    proto_mu, proto_s2 = prototypes(mu.detach(), s2.detach(), label, num_classes)  # a collective: before any return
    total = 0.0 * (mu.sum() + s2.sum())  # keeps both heads in the graph when no class contributes
    present = label.unique()
    if len(present) < 2:
        return total
    shape = (cfg.num_queries, cfg.num_negatives)
    for i, c in enumerate(present.tolist()):
        anchors = sample_anchors(label, prob, c, cfg.hard_threshold, cfg.num_queries)
        if len(anchors) == 0:
            continue
        negatives = sample_negatives(label, present, i, proto_mu, proto_s2, shape, cfg.temp)  # (Q, K)
        key_mu = torch.cat([proto_mu[c].expand(shape[0], 1, -1), mu.detach()[negatives]], dim=1)
        key_s2 = torch.cat([proto_s2[c].expand(shape[0], 1, -1), s2.detach()[negatives]], dim=1)
        total = total + anchor_loss(mu[anchors], s2[anchors], key_mu, key_s2, cfg.temp)
    return total / len(present)


def contrast_pixels(logits: torch.Tensor, mu: torch.Tensor, s2: torch.Tensor, label: torch.Tensor,
                    conf: torch.Tensor, weak_threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The valid pixels at the decoder's resolution (labels and confidences downsampled by nearest): not ignored and
    confidence >= weak_threshold. logits (B, K, h, w), mu, s2 (B, D, h, w), label, conf (B, H, W) ->
    mu (N, D), s2 (N, D), label (N,), the student's probability of that label (N,), detached."""
    small = F.interpolate(torch.stack([label.to(conf.dtype), conf], dim=1), size=mu.shape[-2:], mode="nearest")
    label, conf = small[:, 0].long(), small[:, 1]
    valid = (label != IGNORE) & (conf >= weak_threshold)  # (B, h, w)
    label = torch.where(valid, label, torch.zeros_like(label))
    prob = torch.softmax(logits.detach().float(), dim=1).gather(1, label[:, None])[:, 0]  # (B, h, w)
    return mu.permute(0, 2, 3, 1)[valid], s2.permute(0, 2, 3, 1)[valid], label[valid], prob[valid]


def ramp_down(step: int, ramp_steps: int) -> float:
    """lambda_c = exp(-5 (t / T)^2) for t < T, 0 from T on (official RampdownScheduler, min_value 0)."""
    return math.exp(-5.0 * (step / ramp_steps) ** 2) if step < ramp_steps else 0.0


# ---------------------------------------------------------------------------------------------- the step


def train_step(model: PRCL, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch["x"], batch["y"]  # (B, 3, H, W), (B, H, W)
    u = batch["u"].flatten(0, -4)  # (B_u, 3, H, W); the segmentation view's (B, mu, 3, H, W) flattened
    u_valid = batch["u_valid"].flatten(0, -3) if "u_valid" in batch else torch.ones_like(u[:, 0], dtype=torch.bool)
    u_aug, y_u, conf_u = strong_view(model, u, u_valid, cfg)
    logits_l, mu_l, feature_l = model.student(x)  # separate passes: BatchNorm sees each batch alone (official)
    logits_u, mu_u, feature_u = model.student(u_aug)
    s2 = model.uncertainty(torch.cat([feature_l, feature_u]))  # (B + B_u, D, h, w)
    with torch.autocast(x.device.type, enabled=False):
        loss_sup = F.cross_entropy(upsample(logits_l.float(), x.shape[-2:]), y, ignore_index=IGNORE)
        loss_unsup = unsup_loss(upsample(logits_u.float(), u.shape[-2:]), y_u, conf_u, cfg.unsup_threshold)
        pixels = contrast_pixels(torch.cat([logits_l, logits_u]), torch.cat([mu_l, mu_u]).float(), s2.float(),
                                 torch.cat([y, y_u]), torch.cat([torch.ones_like(y, dtype=conf_u.dtype), conf_u]),
                                 cfg.weak_threshold)
        loss_prcl = prcl_loss(*pixels, model.num_classes, cfg)
    lambda_c = ramp_down(step, cfg.ramp_steps)
    loss = loss_sup + cfg.unsup_weight * loss_unsup + cfg.prcl_weight * lambda_c * loss_prcl
    metrics = {
        "loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), "loss_prcl": loss_prcl.detach(),
        "lambda_c": torch.tensor(lambda_c, device=x.device),
        "confident_frac": image_weights(y_u, conf_u, cfg.unsup_threshold).mean(),
        "sigma2": s2.detach().mean(),
    }
    return loss, metrics


def ema_decay(t: int, max_decay: float) -> float:
    """Decay of the official EMA update number t (0, 1, ...): min(1 - 1 / (t + 1), max_decay)."""
    return min(1.0 - 1.0 / (t + 1), max_decay)


@torch.no_grad()
def on_step_end(model: PRCL, cfg: Config, step: int) -> None:
    """teacher <- d teacher + (1 - d) student over parameters only; the teacher's BN statistics are its own (from its
    train-mode passes on the raw unlabeled images), as official."""
    decay = ema_decay(step - 1, cfg.ema_decay)
    for t, s in zip(model.teacher.parameters(), model.student.parameters()):
        t.lerp_(s.detach(), 1.0 - decay)


# ---------------------------------------------------------------------------------------------- evaluation


def confusion_sums(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per class pixel intersection and union of pred and y (B, H, W), pixels labeled IGNORE left out."""
    valid = y != IGNORE
    pred, y = pred[valid], y[valid]
    inter = torch.bincount(y[pred == y], minlength=num_classes).double()
    union = torch.bincount(pred, minlength=num_classes).double() + torch.bincount(y, minlength=num_classes) - inter
    sums = {f"_inter{c:03d}": inter[c] for c in range(num_classes)}
    sums.update({f"_union{c:03d}": union[c] for c in range(num_classes)})
    return sums


@torch.no_grad()
def eval_step(model: PRCL, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Intersection and union sums of the EMA teacher's whole-image predictions, plus the count n."""
    x, y = batch["x"], batch["y"]
    pred = upsample(model.teacher(x)[0].float(), y.shape[-2:]).argmax(dim=1)  # (B, H, W)
    return {**confusion_sums(pred, y, model.num_classes), "n": torch.tensor(float(len(y)), device=y.device)}


def eval_summary(means: dict[str, float]) -> dict[str, float]:
    """iouNNN = _interNNN / _unionNNN (means over batches: the ratio of the sums) and miou over classes with a union."""
    classes = sorted(key[len("_inter"):] for key in means if key.startswith("_inter"))
    ious = {f"iou{c}": means[f"_inter{c}"] / means[f"_union{c}"] for c in classes if means[f"_union{c}"] > 0}
    return {**ious, "miou": sum(ious.values()) / max(len(ious), 1)}


def palette(num_classes: int) -> np.ndarray:
    """The VOC colour map (class bits spread over R, G, B), extended to any class count; IGNORE is white."""
    colours = np.zeros((256, 3), np.uint8)
    for c in range(num_classes):
        for bit in range(8):
            for channel in range(3):
                colours[c, channel] |= ((c >> (3 * bit + channel)) & 1) << (7 - bit)
    colours[IGNORE] = 255
    return colours


@torch.no_grad()
def eval_figure(model: PRCL, batch: Batch, cfg: Config) -> bytes:
    """Up to FIGURE_ROWS images of the batch, one row each: the image, the ground truth, the teacher's prediction."""
    x, y = batch["x"][:FIGURE_ROWS], batch["y"][:FIGURE_ROWS]
    pred = upsample(model.teacher(x)[0].float(), y.shape[-2:]).argmax(dim=1)  # (B, H, W)
    image = ((x.float() * model.std + model.mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    colours = palette(model.num_classes)
    rows = [np.concatenate([i, colours[t], colours[p]], axis=1) for i, t, p in
            zip(image, y.cpu().numpy(), pred.cpu().numpy())]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()


SPEC = TrainerSpec(
    name="prcl",
    paper="PRCL: Probabilistic Representation Contrastive Learning for Semi-Supervised Semantic Segmentation "
          "(Xie et al., AAAI 2023)",
    Config=Config,
    TINY=TINY,
    views="segmentation",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    param_groups=param_groups,
    eval_summary=eval_summary,
    eval_figure=eval_figure,
    check=check,
)
