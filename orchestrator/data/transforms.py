"""Augmentation pipelines: uint8 image (C,H,W) -> float32 (C,S,S) normalised with the source's mean and std.

All randomness is torch's (torchvision.transforms.v2 and `Cutout`), so the launcher's worker seeding applies.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from orchestrator.data.sources import Source


def evaluation(source: Source, size: int) -> v2.Compose:
    """Deterministic: resize / center crop only."""
    return v2.Compose([*_fit(source, size), *_normalize(source)])


def weak(source: Source, size: int) -> v2.Compose:
    """The standard weak augmentation: reflect-padded random crop + flip (ImageNet-style: resized crop + flip)."""
    return v2.Compose([*_weak_ops(source, size), *_normalize(source)])


def strong(source: Source, size: int) -> v2.Compose:
    """FixMatch's strong augmentation: weak + RandAugment(2, 10) on uint8 + Cutout after normalising."""
    randaugment = v2.RandAugment(num_ops=2, magnitude=10)
    return v2.Compose([*_weak_ops(source, size), randaugment, *_normalize(source), Cutout(max(1, size // 2))])


def autoaugment(source: Source, size: int) -> v2.Compose:
    """SAU's second CIFAR view: weak + AutoAugment (the CIFAR-10 policy) on uint8 + Cutout. The official Cutout
    is a fixed 16 px square on 32 px images; this one draws its side up to size // 2, as FixMatch's does."""
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return v2.Compose([*_weak_ops(source, size), policy, *_normalize(source), Cutout(max(1, size // 2))])


def resized_crop(source: Source, size: int, scale: tuple[float, float]) -> v2.Compose:
    """Random resized crop + flip only: ReSSL's weak teacher view (scale 0.2-1)."""
    ops: list = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if source.hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose([*ops, *_normalize(source)])


def contrastive(
    source: Source, size: int, scale: tuple[float, float], saturation: float = 0.4, solarize: float = 0.0,
    blur: float = 0.5,
) -> v2.Compose:
    """SimCLR/BYOL/DINO-style view: resized crop, flip, colour jitter, grayscale, blur (for size >= 96).

    `saturation` is the jitter's saturation strength; `solarize` the probability of solarizing (RGB only);
    `blur` the probability of the Gaussian blur. SimMatchV2's strong crops use saturation 0.2 and solarize 0.1
    (its DINO-style `get_dino_aug`); BYOL's two views use blur 1.0 / 0.1 and solarize 0 / 0.2.
    """
    ops: list = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if source.hflip:
        ops.append(v2.RandomHorizontalFlip())
    rgb = source.in_channels == 3
    jitter = v2.ColorJitter(0.4, 0.4, saturation, 0.1) if rgb else v2.ColorJitter(0.4, 0.4)  # hue/saturation: RGB
    ops.append(v2.RandomApply([jitter], p=0.8))
    if rgb:
        ops.append(v2.RandomGrayscale(p=0.2))
    if size >= 96:
        kernel = int(0.1 * size) // 2 * 2 + 1  # odd, about 10% of the image (SimCLR)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
    if rgb and solarize > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize))  # on uint8, as PIL's ImageOps.solarize
    return v2.Compose([*ops, *_normalize(source)])


class Cutout:
    """Zero one random square of side 1..max_side (clipped at the borders) of a normalised image (C,H,W).

    Zero after normalising is the dataset's mean colour, as FixMatch's grey fill is.
    """

    def __init__(self, max_side: int):
        self.max_side = max_side

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        side = int(torch.randint(1, self.max_side + 1, ()))
        top = int(torch.randint(height, ())) - side // 2  # a centre anywhere in the image
        left = int(torch.randint(width, ())) - side // 2
        x = x.clone()
        x[..., max(0, top) : top + side, max(0, left) : left + side] = 0
        return x


def _fit(source: Source, size: int) -> list:
    """Deterministic ops that bring any image of the source to (size, size)."""
    if source.crop == "fixed":
        return [] if size == source.default_size else [v2.Resize((size, size), antialias=True)]
    if source.crop == "center":
        return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]


def _weak_ops(source: Source, size: int) -> list:
    if source.crop == "imagenet":
        ops = [v2.RandomResizedCrop(size, antialias=True)]
    else:
        ops = [*_fit(source, size), v2.RandomCrop(size, padding=size // 8, padding_mode="reflect")]
    return (ops + [v2.RandomHorizontalFlip()]) if source.hflip else ops


def _normalize(source: Source) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(source.mean, source.std)]
