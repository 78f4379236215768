"""Accuracy by shot group on long-tailed data: the many-shot (> 100 real training images), medium-shot (21-100) and
few-shot (<= 20) classes of the long-tail papers (the official SAU code's boundaries: a class of exactly 20 images is
few-shot). On a balanced test set the pooled accuracy of a group equals the mean of its per-class accuracies.

eval_step adds `shot_sums(...)` to its sums (`<group>_correct`, `<group>_n`); eval_summary returns
`shot_summary(means)`: `<group>_acc` for the groups that have test images.
"""

from __future__ import annotations

import math

import torch

GROUPS = {"many": (100, math.inf), "medium": (20, 100), "few": (-1, 20)}  # real train images n in (low, high]


def shot_groups(class_counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """(C,) real training images per class -> {many, medium, few: (C,) bool}."""
    return {name: (class_counts > low) & (class_counts <= high) for name, (low, high) in GROUPS.items()}


def shot_sums(correct: torch.Tensor, y: torch.Tensor, class_counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """correct (B,) bool, y (B,) labels -> per group: correct predictions and test images of the batch."""
    sums = {}
    for name, in_group in shot_groups(class_counts).items():
        member = in_group[y]  # (B,)
        sums[f"{name}_correct"], sums[f"{name}_n"] = (correct & member).sum(), member.sum()
    return sums


def shot_summary(means: dict[str, float]) -> dict[str, float]:
    """<group>_acc = <group>_correct / <group>_n (both averaged over the test set, so the ratio is the group's
    accuracy), for the groups that have test images."""
    return {f"{name}_acc": means[f"{name}_correct"] / means[f"{name}_n"]
            for name in GROUPS if means.get(f"{name}_n", 0) > 0}
