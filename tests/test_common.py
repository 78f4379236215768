"""Shared method pieces: EMA teacher and the single-process collectives."""

from __future__ import annotations

import torch
from torch import nn

from trainers._common.dist import all_gather_cat, all_reduce_mean, world_size
from trainers._common.ema import ema_update, make_teacher


def test_ema_update_moves_parameters_and_copies_buffers() -> None:
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student[0].weight.add_(1.0)
    student[1].running_mean.fill_(3.0)
    before = teacher[0].weight.clone()
    ema_update(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0].weight, 0.9 * before + 0.1 * student[0].weight)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 3.0))


def test_collectives_are_identity_without_a_process_group() -> None:
    x = torch.randn(3, 4)
    assert world_size() == 1
    assert all_gather_cat(x) is x and all_reduce_mean(x) is x
