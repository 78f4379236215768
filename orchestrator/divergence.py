"""Stopping a run whose loss turns NaN or Inf, before a checkpoint of the broken state is written.

`LossGuard.watch` runs after every optimizer step and keeps, on the device, the first step at which the loss (or
a train metric the method lists in `TrainerSpec.finite_metrics`) was not finite: a few tiny kernels, no host sync.
`LossGuard.first_bad` reads it only where the step loop syncs anyway (each log line, each evaluation or
checkpoint report, the end), and before a checkpoint it also checks this rank's weights (parameters, ZeRO-3
shards, buffers), since the update of step k can break the weights while the loss of step k was still finite.
With several ranks (DDP or DeepSpeed) one all-reduce (MIN) of a few int64 makes every rank stop at the same
step: a rank's loss can go NaN a step before another's. So the run stops at most `log_every` steps after the
loss broke, and never writes a checkpoint after it.

A NaN is deterministic: retrying from the last checkpoint would meet it again.
`orchestrator.train_callbacks.NoRetryOnDeterministicErrors` turns
`NonFiniteLossError` (and an unreadable dataset file's `DataFileError`, and a checkpoint write's persistent I/O
error, `CheckpointWriteError`) into a Ray Train controller error, which Ray Train v2's failure policy does not retry
(it retries worker errors up to `FailureConfig.max_failures`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

NONE = torch.iinfo(torch.int64).max  # "no bad step yet"
WEIGHTS = "weights"


class NonFiniteLossError(RuntimeError):
    """The run stopped at `step` because `what` (e.g. "loss") was NaN or Inf; `last_checkpoint` is the newest
    checkpoint written before it that verified by content, as (step, path), or None."""

    def __init__(self, what: str, step: int, method: str, run: str, last_checkpoint: tuple[int, str] | None):
        self.what, self.step, self.method, self.run, self.last_checkpoint = what, step, method, run, last_checkpoint
        if last_checkpoint is None:
            where = "no checkpoint was written before it (running it again starts from step 0)"
        else:
            where = (f"the last verified checkpoint is step {last_checkpoint[0]} at {last_checkpoint[1]} (the same "
                     "command resumes from it; a changed `optim` or `config` needs a new `name`)")
        super().__init__(f"{self.reason} (method {method!r}, run {run!r}): the run stopped without writing a "
                         f"checkpoint of this state; {where}")

    @property
    def reason(self) -> str:
        """The short form, for the MLflow tag `stopped_reason`."""
        return f"non-finite {self.what} at step {self.step}"

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles worker errors: rebuild from the fields, not the message
        return type(self), (self.what, self.step, self.method, self.run, self.last_checkpoint)


class LossGuard:
    """The first non-finite step of each watched metric, kept on the device until a sync point reads it."""

    def __init__(self, keys: Sequence[str], device: torch.device, world: int):
        self.keys, self.device, self.world = tuple(keys), device, world
        self.first = torch.full((len(self.keys),), NONE, dtype=torch.int64, device=device)

    def watch(self, metrics: dict[str, Any], step: int) -> None:
        """After each optimizer step: no host sync (the values are device tensors; Python floats are copied)."""
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=self.device).reshape(())
                              for k in self.keys])
        self.first = torch.where(torch.isfinite(values), self.first, self.first.clamp(max=step))

    def first_bad(self, step: int, weights: Iterable[torch.Tensor] | None = None) -> tuple[str, int] | None:
        """(what, step) of the earliest non-finite value over all ranks, or None. A collective: every rank calls
        it at the same steps. `weights`: also check these tensors, as of `step`."""
        weights_bad = torch.full((1,), NONE, dtype=torch.int64, device=self.device)
        if weights is not None and not _all_finite(weights, self.device):
            weights_bad.fill_(step)
        flags = torch.cat([self.first, weights_bad])
        if self.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        found = flags.tolist()
        earliest = min(found)
        if earliest == NONE:
            return None
        names = [name for name, first in zip((*self.keys, WEIGHTS), found) if first == earliest]
        return ", ".join(names), earliest


def _all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    checks = [torch.isfinite(t).all().to(device) for t in tensors if t.numel()]
    return bool(torch.stack(checks).all()) if checks else True


def local_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's copy of the weights: the parameters (under ZeRO-3 the rank's shard, the parameter itself being
    an empty placeholder) and the buffers (EMA teachers, queues, batch-norm statistics)."""
    return [zero3_shard(p) if hasattr(p, "ds_tensor") else p.detach() for p in model.parameters()] + \
        list(model.buffers())


def zero3_shard(p: torch.nn.Parameter) -> torch.Tensor:
    """A ZeRO-3 parameter's elements held by this rank: its partition `ds_tensor` without the padding that makes
    the partitions equal (DeepSpeed allocates it with torch.empty and never writes it, so it may hold any bits,
    NaN included: checking it stopped runs at random)."""
    shard = p.ds_tensor.detach()
    rank = torch.distributed.get_rank(group=p.ds_process_group)
    return shard[:max(0, min(shard.numel(), p.ds_numel - rank * shard.numel()))]
