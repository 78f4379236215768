"""Datasets that give each family of methods its item format (supervised, semi-supervised, self-supervised).

Items are dicts of tensors; every image is float32 normalised; `idx` is the image's position in the pool the
dataset draws from (for memory banks). Every train dataset has `set_epoch(epoch)`: call it before creating the
epoch's loader iterator (workers copy the dataset then). Per-item randomness is torch's, seeded by the launcher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from orchestrator.data.sources import Images

Transform = Callable[[torch.Tensor], torch.Tensor]  # uint8 (C,H,W) -> float32 (C,S,S)
# uint8 image (3,H,W), uint8 mask (H,W) -> float32 (3,S,S), int64 (S,S): the same geometry applied to both
PairedTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
IGNORE = 255  # segmentation masks: a pixel without a label (boundaries, void classes, padding)


@dataclass(frozen=True)
class Pool:
    """The images at `indices` of `images` (a source's train or test set) and their labels (-1: unlabeled)."""

    images: Images
    indices: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, j: int) -> torch.Tensor:
        return self.images[int(self.indices[j])]


@dataclass(frozen=True)
class MaskPool:
    """The images at `indices` of `images` with their segmentation masks (`masks[i]`: uint8 (H,W) of class ids
    and 255), for segmentation's labeled and test sets."""

    images: Images
    masks: Images  # a store of uint8 (H,W) masks, indexed as `images`
    indices: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.indices)

    def pair(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.indices[j])
        return self.images[i], self.masks[i]


def _scalar(value: int | np.integer) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.int64)


class PlainView(Dataset):
    """{"x": (C,S,S), "y", "idx"}: one augmented image (weak for training, the eval transform for testing)."""

    def __init__(self, pool: Pool, transform: Transform):
        self.pool, self.transform = pool, transform

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        return {"x": self.transform(self.pool.image(j)), "y": _scalar(self.pool.labels[j]), "idx": _scalar(j)}

    def set_epoch(self, epoch: int) -> None:
        """Nothing here depends on the epoch."""


class LabeledWithUnlabeled(Dataset):
    """The pairing of the semi-supervised views: ceil(n_ulb / mu) items cover the unlabeled pool once per epoch,
    each with `mu` unlabeled samples and one labeled sample (the labeled set cycles); `set_epoch` re-draws both
    orders from (seed, epoch)."""

    labeled: Pool | MaskPool
    unlabeled: Pool
    mu: int
    seed: int

    def __len__(self) -> int:
        return math.ceil(len(self.unlabeled) / self.mu)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        self.ulb_perm = rng.permutation(len(self.unlabeled))  # (n_ulb,)
        self.lb_perm = rng.permutation(len(self.labeled))  # (n_lb,)

    def draw(self, i: int) -> tuple[int, np.ndarray]:
        """Item i's labeled index and its mu unlabeled indices (mu,)."""
        lb = self.lb_perm[i % len(self.lb_perm)]
        return lb, self.ulb_perm[np.arange(i * self.mu, (i + 1) * self.mu) % len(self.ulb_perm)]


class WeakStrongView(LabeledWithUnlabeled):
    """One labeled image and mu unlabeled ones (FixMatch / USB batches):

    {"x_lb": (C,S,S) weak, "y_lb", "idx_lb", "x_ulb_w": (mu,C,S,S) weak, "x_ulb_s": (mu,C,S,S) strong, "idx_ulb": (mu,)}

    An epoch of ceil(n_ulb / mu) items covers the unlabeled pool once: item i takes positions perm[i*mu:(i+1)*mu]
    (wrapping) of a permutation of the pool, and the labeled image lb_perm[i % n_lb]. `set_epoch` re-draws both
    permutations from (seed, epoch). idx_lb indexes the labeled set, idx_ulb the unlabeled pool.

    With a `local` transform (the "weak_strong_multicrop" views, SimMatchV2) each unlabeled image also gets
    `num_local` extra strong crops of a smaller size: "x_ulb_local": (mu, k, C, s, s); local_shape = (C, s, s).
    """

    def __init__(self, labeled: Pool, unlabeled: Pool, weak: Transform, strong: Transform, mu: int, seed: int,
                 local: Transform | None = None, num_local: int = 0, local_shape: tuple = ()):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.weak, self.strong = weak, strong
        self.mu, self.seed = mu, seed
        self.local, self.num_local, self.local_shape = local, num_local, local_shape
        self.set_epoch(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lb, ulb = self.draw(i)
        images = [self.unlabeled.image(j) for j in ulb]
        item = {
            "x_lb": self.weak(self.labeled.image(lb)),
            "y_lb": _scalar(self.labeled.labels[lb]),
            "idx_lb": _scalar(lb),
            "x_ulb_w": torch.stack([self.weak(image) for image in images]),
            "x_ulb_s": torch.stack([self.strong(image) for image in images]),
            "idx_ulb": torch.from_numpy(ulb.astype(np.int64)),
        }
        if self.local is not None:
            item["x_ulb_local"] = torch.stack([self._local_crops(image) for image in images])  # (mu, k, C, s, s)
        return item

    def _local_crops(self, image: torch.Tensor) -> torch.Tensor:
        crops = [self.local(image) for _ in range(self.num_local)]
        return torch.stack(crops) if crops else torch.zeros((0, *self.local_shape))


class TwoCropView(Dataset):
    """{"x1": (C,S,S), "x2": (C,S,S), "y", "idx"}: two views of one image (SimCLR, MoCo, BYOL, WCL, LEWEL).

    `view2` defaults to `view1` (two draws of one pipeline); asymmetric pairs give each side its own pipeline:
    "weak_contrastive" (ReSSL: x1 the teacher's weak crop, x2 the student's contrastive view) and "byol_two_crop".
    With `local`, `num_local` extra small crops follow: "x_local": (k,C,s,s) (ReSSL's multi-crop students).
    """

    def __init__(self, pool: Pool, view1: Transform, view2: Transform | None = None, local: Transform | None = None,
                 num_local: int = 0, local_shape: tuple = ()):
        self.pool, self.view1, self.view2 = pool, view1, view2 or view1
        self.local, self.num_local, self.local_shape = local, num_local, local_shape

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        image = self.pool.image(j)
        item = {"x1": self.view1(image), "x2": self.view2(image), "y": _scalar(self.pool.labels[j]),
                "idx": _scalar(j)}
        if self.local is not None:
            crops = [self.local(image) for _ in range(self.num_local)]
            item["x_local"] = torch.stack(crops) if crops else torch.zeros((0, *self.local_shape))
        return item

    def set_epoch(self, epoch: int) -> None:
        """Nothing here depends on the epoch."""


class SauView(Dataset):
    """{"x1", "x2", "x3": (C,S,S), "y", "is_syn", "idx"}: three views of one real or generated image (SAU):
    x1 the synthetic-unaware branch's crop + flip, x2 x1 + AutoAugment + Cutout, x3 a SimCLR-style view.
    `is_syn` (bool) marks generated images."""

    def __init__(self, pool: Pool, views: tuple[Transform, Transform, Transform], is_syn: np.ndarray):
        self.pool, self.views, self.is_syn = pool, views, is_syn

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        image = self.pool.image(j)
        item = {f"x{k + 1}": view(image) for k, view in enumerate(self.views)}
        return {**item, "y": _scalar(self.pool.labels[j]), "is_syn": torch.tensor(bool(self.is_syn[j])),
                "idx": _scalar(j)}

    def set_epoch(self, epoch: int) -> None:
        """Nothing here depends on the epoch."""


class MultiCropView(Dataset):
    """{"x_global": (2,C,S,S), "x_local": (k,C,s,s), "y", "idx"}: SwAV/DINO multi-crop of one image."""

    def __init__(self, pool: Pool, global_view: Transform, local_view: Transform, num_local: int, local_shape: tuple):
        self.pool, self.global_view, self.local_view = pool, global_view, local_view
        self.num_local, self.local_shape = num_local, local_shape  # local_shape: (C,s,s), for k = 0

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        image = self.pool.image(j)
        local = [self.local_view(image) for _ in range(self.num_local)]
        return {
            "x_global": torch.stack([self.global_view(image), self.global_view(image)]),
            "x_local": torch.stack(local) if local else torch.zeros((0, *self.local_shape)),
            "y": _scalar(self.pool.labels[j]),
            "idx": _scalar(j),
        }

    def set_epoch(self, epoch: int) -> None:
        """Nothing here depends on the epoch."""


class SegmentationView(LabeledWithUnlabeled):
    """One labeled crop and mu unlabeled ones (semi-supervised segmentation: PRCL, U2PL, ...):

    {"x": (3,S,S), "y": (S,S) int64 (255: no label), "idx": (),
     "u": (mu,3,S,S), "u_valid": (mu,S,S) bool, "idx_u": (mu,)}

    Every crop has the same paired geometric augmentation (rescale, pad, crop, flip) and normalisation; the
    unlabeled crops get nothing more: the method draws its own strong augmentation. "u_valid" is False on the
    padding of an unlabeled crop (its image there is 0, the mean colour). The epoch and the pairing follow
    `WeakStrongView`: ceil(n_ulb / mu) items cover the unlabeled pool once; `set_epoch` re-draws from
    (seed, epoch). idx indexes the labeled set, idx_u the unlabeled pool.
    """

    def __init__(self, labeled: MaskPool, unlabeled: Pool, transform: PairedTransform, mu: int, seed: int):
        self.labeled, self.unlabeled, self.transform = labeled, unlabeled, transform
        self.mu, self.seed = mu, seed
        self.set_epoch(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lb, ulb = self.draw(i)
        x, y = self.transform(*self.labeled.pair(lb))
        crops = [self._unlabeled_crop(j) for j in ulb]
        return {
            "x": x,
            "y": y,
            "idx": _scalar(lb),
            "u": torch.stack([u for u, _ in crops]),
            "u_valid": torch.stack([valid for _, valid in crops]),
            "idx_u": torch.from_numpy(ulb.astype(np.int64)),
        }

    def _unlabeled_crop(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3,S,S) crop and (S,S) bool not-padding, through the labeled crops' transform with an all-0 mask."""
        image = self.unlabeled.image(j)
        u, y = self.transform(image, torch.zeros(image.shape[-2:], dtype=torch.uint8))
        return u, y != IGNORE


class SegmentationTestView(Dataset):
    """{"x": (3,H,W), "y": (H,W) int64 (255: no label), "idx": ()}: whole images and masks at one size."""

    def __init__(self, pool: MaskPool, transform: PairedTransform):
        self.pool, self.transform = pool, transform

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        x, y = self.transform(*self.pool.pair(j))
        return {"x": x, "y": y, "idx": _scalar(j)}

    def set_epoch(self, epoch: int) -> None:
        """Nothing here depends on the epoch."""
