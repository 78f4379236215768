"""Deterministic splits of a source's train set: validation hold-out, long tail, labeled subset, unlabeled pool.

All indices refer to the source's train set; a source's extra unlabeled images (STL-10's unlabeled_X.bin) follow
it, at indices N_train + j. Every draw comes from numpy's Generator(PCG64(seed)), never the global RNG; the
validation images come from a stream of their own (PCG64([seed, VAL_STREAM])), so they are the same whatever the
other keys are, and the other draws are unchanged when there is no validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_LISTED_UNLABELED = 200_000
VAL_STREAM = 1


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # (n_train,) the (long-tailed) train set, sorted
    labeled: np.ndarray  # (n_lb,) sorted; equal to `train` when there is no labeled subset
    unlabeled: np.ndarray | None  # (n_ulb,) train set then extras; None when every image is labeled
    val: np.ndarray  # (n_val,) sorted, held out of every pool above; empty without a validation split


def make_split(
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    *,
    imbalance_factor: float | None = None,
    labeled_per_class: int | None = None,
    labeled_fraction: float | None = None,
    num_extra: int = 0,
    val_per_class: int | None = None,
) -> Split:
    """The validation images first (if any: `val_per_class` of each class, balanced like a test set), then the long
    tail (if any) of what is left, then the labeled subset (if any) drawn from what the tail kept."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, val = np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    if val_per_class is not None:
        val_rng = np.random.Generator(np.random.PCG64([seed, VAL_STREAM]))
        val = labeled_subset(labels, train, num_classes, val_rng, per_class=val_per_class, keep_one=True,
                             key="data.val_per_class")
        train = np.setdiff1d(train, val)
    if imbalance_factor is not None:
        train = long_tail(labels, train, num_classes, imbalance_factor, rng)
    if labeled_per_class is None and labeled_fraction is None:
        return Split(train, train, None, val)
    labeled = labeled_subset(labels, train, num_classes, rng, per_class=labeled_per_class, fraction=labeled_fraction)
    unlabeled = np.concatenate([train, len(labels) + np.arange(num_extra)])
    return Split(train, labeled, unlabeled, val)


def long_tail(labels: np.ndarray, pool: np.ndarray, num_classes: int, imbalance_factor: float,
              rng: np.random.Generator) -> np.ndarray:
    """The indices of `pool` that keep n_c = floor(n_max * IF ** (-c / (C - 1))) images of class c (at least 1, at
    most all), n_max the largest class count of the pool."""
    n_max = np.bincount(labels[pool], minlength=num_classes).max()
    kept = []
    for c in range(num_classes):
        exponent = -c / (num_classes - 1) if num_classes > 1 else 0.0
        n_c = max(1, math.floor(n_max * imbalance_factor**exponent + 1e-9))  # 1e-9: float round-off, not policy
        kept.append(rng.permutation(pool[labels[pool] == c])[:n_c])
    return np.sort(np.concatenate(kept))


def labeled_subset(
    labels: np.ndarray,
    pool: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    keep_one: bool = False,
    key: str = "data.labeled_per_class",
) -> np.ndarray:
    """Exactly `per_class` images of each class of `pool`, or round(fraction * n_c) (at least 1) of each. With
    `keep_one`, at least one image of each class must stay outside the subset (`key` names the setting in errors)."""
    chosen = []
    for c in range(num_classes):
        members = pool[labels[pool] == c]
        if per_class is not None and len(members) < per_class + keep_one:
            raise ValueError(f"{key}={per_class}: class {c} has only {len(members)} train images"
                             + (" (at least one must stay for training)" if keep_one else ""))
        k = per_class if per_class is not None else max(1, round(fraction * len(members)))
        chosen.append(rng.permutation(members)[: min(k, len(members))])
    return np.sort(np.concatenate(chosen))


def split_artifact(
    split: Split, labels: np.ndarray, num_classes: int, dataset: str, seed: int, num_test: int
) -> dict[str, Any]:
    """The JSON-serialisable record of a split, logged as `split.json`."""
    unlabeled = np.zeros(0, dtype=np.int64) if split.unlabeled is None else split.unlabeled
    return {
        "dataset": dataset,
        "seed": seed,
        "labeled_indices": split.labeled.tolist(),
        "unlabeled_indices": len(unlabeled) if len(unlabeled) > MAX_LISTED_UNLABELED else unlabeled.tolist(),
        "val_indices": split.val.tolist(),
        "class_counts_train": _class_counts(labels[split.train], num_classes),
        "class_counts_labeled": _class_counts(labels[split.labeled], num_classes),
        "num_test": num_test,
    }


def _class_counts(labels: np.ndarray, num_classes: int) -> dict[str, int]:
    return {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=num_classes))}
