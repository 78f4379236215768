"""Exponential moving average (mean teacher) of a network."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` that follows it through `ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s for parameters; buffers (BN statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """m_t = 1 - (1 - base)(cos(pi t / T) + 1) / 2: base at t = 0, 1 at t >= T (BYOL's schedule)."""
    progress = min(step, total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
