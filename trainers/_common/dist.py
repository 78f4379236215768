"""Collectives that are no-ops in a single process, so method code reads the same with and without DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (world * N, ...) in rank order; the input itself without a process group.

    Every rank must pass the same shape. The result carries no gradient (use it for banks, queues, statistics).
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (a new tensor); `x` itself without a process group."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
