"""A NaN or Inf loss stops the step loop with a clear error before any checkpoint of the broken state; ranks agree
on the step; Ray Train is told not to retry it. No Ray cluster needed."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import pytest
import torch

from orchestrator import checkpoint as ckpt_io
from orchestrator import spec as spec_mod
from orchestrator.data.sources import DataFileError
from orchestrator.divergence import LossGuard, NonFiniteLossError, local_weights
from orchestrator.launch import train_in_process
from orchestrator.train_callbacks import NoRetryOnDeterministicErrors
from trainers import supervised

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def quickstart(*overrides: str) -> spec_mod.ExperimentSpec:
    return spec_mod.load(QUICKSTART, ["resources.workers=1", "optim.steps=40", "eval.every=null", *overrides])


def patch_method(monkeypatch: pytest.MonkeyPatch, **fields) -> None:
    """The supervised method with some of its functions replaced (trainers.get reads the module's SPEC)."""
    monkeypatch.setattr(supervised, "SPEC", dataclasses.replace(supervised.SPEC, **fields))


def nan_at(bad_step: int):
    """supervised's train_step whose loss is NaN on optimizer step `bad_step` (1-based, as logged)."""

    def train_step(model, batch, cfg, step):
        loss, metrics = supervised.train_step(model, batch, cfg, step)
        return (loss * math.nan if step + 1 == bad_step else loss), metrics

    return train_step


def kept_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint_")) for p in root.glob("checkpoint_*"))


def assert_finite_checkpoints(root: Path) -> None:
    for directory in root.glob("checkpoint_*"):
        model_state, _, _ = ckpt_io.load(directory, rank=0)
        assert all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())


def test_nan_loss_stops_before_the_next_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NaN at step 13, checkpoints every 5, log lines every 10: the check before the checkpoint at 15 stops it."""
    patch_method(monkeypatch, train_step=nan_at(13))
    spec = quickstart("checkpoint.every=5", "log_every=10")
    with pytest.raises(NonFiniteLossError) as caught:
        train_in_process(spec, torch.device("cpu"), checkpoint_root=tmp_path)
    error, last = caught.value, tmp_path / "checkpoint_000000010"
    assert (error.what, error.step, error.last_checkpoint) == ("loss", 13, (10, str(last)))
    message = str(error)
    assert message.startswith("non-finite loss at step 13 (method 'supervised', run 'quickstart-digits')")
    assert f"the last verified checkpoint is step 10 at {last}" in message and "without writing a checkpoint" in message
    assert kept_steps(tmp_path) == [5, 10]
    assert_finite_checkpoints(tmp_path)


def test_broken_weights_are_not_checkpointed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The update of step 10 breaks the weights while the loss of step 10 was finite: the checkpoint at 10 is
    refused by the check of the weights before it."""

    def poison(model, cfg, step):
        if step == 10:
            next(model.parameters()).data.fill_(math.inf)

    patch_method(monkeypatch, on_step_end=poison)
    with pytest.raises(NonFiniteLossError, match=r"^non-finite weights at step 10 .*verified checkpoint is step 5"):
        train_in_process(quickstart("checkpoint.every=5", "log_every=5"), torch.device("cpu"), checkpoint_root=tmp_path)
    assert kept_steps(tmp_path) == [5]


def test_a_metric_the_method_lists_is_watched_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def train_step(model, batch, cfg, step):
        loss, metrics = supervised.train_step(model, batch, cfg, step)
        return loss, {**metrics, "loss_aux": math.inf if step >= 2 else 0.0}  # a Python float, not a tensor

    patch_method(monkeypatch, train_step=train_step, finite_metrics=("loss_aux",))
    with pytest.raises(NonFiniteLossError, match="^non-finite loss_aux at step 3 .*no checkpoint was written before"):
        train_in_process(quickstart("checkpoint.every=100", "log_every=5"), torch.device("cpu"))


def test_the_errors_survive_pickling_and_only_they_are_not_retried() -> None:
    """Ray pickles a worker's error to the controller, where the callback re-raises a NaN stop or an unreadable
    dataset file (a controller error, which Ray Train does not retry); other errors are left to
    FailureConfig.max_failures."""
    error = NonFiniteLossError("loss", 7, "supervised", "run", (5, "/runs/run/checkpoint_000000005"))
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.reason == "non-finite loss at step 7"
    callback = NoRetryOnDeterministicErrors()
    callback.after_exception(None, {0: ValueError("a crash")})
    with pytest.raises(NonFiniteLossError):
        callback.after_exception(None, {0: ValueError("collateral"), 1: copy})
    unreadable = pickle.loads(pickle.dumps(DataFileError("/data/train/dog/1.png", "not a readable image")))
    with pytest.raises(DataFileError, match="unreadable dataset file /data/train/dog/1.png: not a readable image"):
        callback.after_exception(None, {1: unreadable})


def _two_ranks(rank: int, init_file: str, results: str) -> None:
    """Rank 1's loss is NaN at step 3, rank 0's never; rank 0's weights break at step 5."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = LossGuard(("loss",), torch.device("cpu"), world=2)
    for step in range(1, 5):
        guard.watch({"loss": torch.tensor(math.nan if rank == 1 and step >= 3 else 1.0)}, step)
    weights = [torch.tensor([math.inf if rank == 0 else 1.0])]
    found = [guard.first_bad(4), LossGuard(("loss",), torch.device("cpu"), world=2).first_bad(5, weights)]
    torch.save(found, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_first_bad_step(tmp_path: Path) -> None:
    """With DDP each rank sees its own loss: one all-reduce (MIN) at the check makes every rank stop at once."""
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "found")), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"found.{rank}") == [("loss", 3), ("weights", 5)]


def _zero3_rank(rank: int, init_file: str, results: str) -> None:
    """A real ZeRO-3 partition over 2 ranks of a 3-element weight: rank 1 holds 1 element and 1 of padding, which
    DeepSpeed leaves unwritten; it is set to NaN here, as stale memory may be."""
    import os

    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
        model = torch.nn.Linear(1, 3, bias=False)
    shard = model.weight.ds_tensor
    if rank == 1:
        shard.data[-1] = math.nan
    torch.save([shard.numel(), [w.tolist() for w in local_weights(model)]], f"{results}.{rank}")
    torch.distributed.destroy_process_group()


def test_zero3_padding_is_not_read_as_a_weight(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_zero3_rank, args=(str(tmp_path / "init"), str(tmp_path / "found")), nprocs=2)
    (size0, weights0), (size1, weights1) = (torch.load(tmp_path / f"found.{rank}") for rank in range(2))
    assert size0 == size1 == 2  # partitions of ceil(3 / 2): rank 1's second element is padding
    assert len(weights0[0]) == 2 and len(weights1[0]) == 1 and all(map(math.isfinite, weights0[0] + weights1[0]))
