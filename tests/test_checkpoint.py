"""Checkpoints round-trip model, training and RNG state; one that is half-written, truncated or damaged (same
size, other content) is refused, and so is one holding a pickled object (it is never run). A run falls back to its
newest checkpoint that verifies, keeps only verified ones, and stops for good on a disk-full write."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import checkpoint as ckpt_io
from orchestrator import spec as spec_mod
from orchestrator.launch import train_in_process
from orchestrator.method_run import STATE_FILE, MethodContext
from orchestrator.run_checkpoints import SNAPSHOT, RunCheckpoints, fallback_message, forget_missing
from orchestrator.storage import RunDir
from orchestrator.train_callbacks import NoRetryOnDeterministicErrors

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def write(directory: Path) -> dict:
    model_state = {"w": torch.arange(6.0).view(2, 3)}
    train_state = {"step": 7, "micro": 14, "optimizer": {"state": {}}, "scheduler": {}}
    ckpt_io.save_rng(directory, rank=0)
    ckpt_io.save_main(directory, model_state, train_state)
    return model_state


def test_round_trip_restores_every_rng(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    model_state = write(tmp_path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    loaded_model, train_state, rng = ckpt_io.load(tmp_path, rank=0)
    ckpt_io.restore_rng(rng)
    assert torch.equal(loaded_model["w"], model_state["w"]) and train_state["step"] == 7
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_rng_of_a_new_rank_is_none(tmp_path: Path) -> None:
    write(tmp_path)
    assert ckpt_io.load(tmp_path, rank=3)[2] is None


def test_checkpoint_without_manifest_is_refused(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / ckpt_io.MANIFEST).unlink()
    with pytest.raises(ckpt_io.CheckpointError, match="has no manifest.json: it was not completely written"):
        ckpt_io.load(tmp_path, rank=0)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path)
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt_io.CheckpointError, match=r"model\.pt should be \d+ bytes, found \d+"):
        ckpt_io.load(tmp_path, rank=0)


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling it calls _touch(marker): a harmless stand-in for code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_the_payload_runs_when_unpickled_in_full(tmp_path: Path) -> None:
    """The control for the tests below: loading without weights_only does run it."""
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("part", ["model", "train_state", "rng"])
def test_a_pickled_object_is_refused_not_run(tmp_path: Path, part: str) -> None:
    marker = tmp_path / "ran"
    model_state = {"w": torch.zeros(2), **({"evil": Payload(marker)} if part == "model" else {})}
    train_state = {"step": 1, "micro": 1, **({"evil": Payload(marker)} if part == "train_state" else {})}
    ckpt_io.save_main(tmp_path, model_state, train_state)  # a valid manifest: only the content is wrong
    ckpt_io.save_rng(tmp_path, rank=0)
    if part == "rng":
        ckpt_io._atomic_save({"python": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=r"refused to load `\S*_touch`: checkpoints may hold only"):
        ckpt_io.load(tmp_path, rank=0)
    assert not marker.exists()


def test_rng_files_from_before_plain_lists_still_load(tmp_path: Path) -> None:
    """Older RNG files hold numpy's key as an array: allowed in RNG files, and restored exactly."""
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save(old, tmp_path / "rng_rank0.pt")
    expected = np.random.rand(3)
    ckpt_io.restore_rng(ckpt_io.load_rng(tmp_path, rank=0))
    assert np.array_equal(np.random.rand(3), expected)


def test_method_state_is_plain_data_only(tmp_path: Path) -> None:
    """A state weights_only cannot read is refused when saved; a crafted state file is refused, not run."""
    marker = tmp_path / "ran"
    ctx = MethodContext(RunDir(str(tmp_path), "run"), logger=None)
    with pytest.raises(ckpt_io.CheckpointError, match="the method state to save: refused to load"):
        ctx.save({"history": [Payload(marker)]})
    assert not marker.exists() and ctx.load() is None
    ctx.save({"history": [1, 2.5, "a"], "weights": torch.ones(2), "best": ("arch", 0.9)})
    assert ctx.load()["best"] == ("arch", 0.9)
    buffer = io.BytesIO()
    torch.save({"history": Payload(marker)}, buffer)
    (tmp_path / "run" / STATE_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(ckpt_io.CheckpointError, match=f"{STATE_FILE}: refused to load"):
        ctx.load()
    assert not marker.exists()


def two_ranks(directory: Path, step: int = 7) -> None:
    """A checkpoint as two DDP ranks write it under Ray Train: each rank into its own directory, then merged."""
    for rank in (1, 0):
        with tempfile.TemporaryDirectory() as part:
            written = ckpt_io.save_rng(Path(part), rank)
            if rank == 0:
                state = {"w": torch.randn(64, 64)}  # 16 KiB
                written.update(ckpt_io.save_state(Path(part), state, {"step": step, "micro": 2 * step}))
            ckpt_io.save_rank_manifest(Path(part), rank, 2, step, written)
            shutil.copytree(part, directory, dirs_exist_ok=True)


def overwrite_middle(path: Path) -> None:
    """4 KiB of 0xFF in the middle of the file: the same size, other content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_every_rank_lists_its_files_with_size_and_hash(tmp_path: Path) -> None:
    two_ranks(tmp_path)
    assert ckpt_io.verify(tmp_path) == {"step": 7, "ranks": 2, "hash": "sha256"}
    rank1 = json.loads((tmp_path / "manifest_rank1.json").read_text())["files"]
    assert set(rank1) == {"rng_rank1.pt"}
    assert rank1["rng_rank1.pt"]["size"] == (tmp_path / "rng_rank1.pt").stat().st_size
    rank0 = json.loads((tmp_path / "manifest_rank0.json").read_text())["files"]
    assert set(rank0) == {"model.pt", "train_state.pt", "rng_rank0.pt"}
    assert rank0["model.pt"]["sha256"] == ckpt_io._entry(tmp_path / "model.pt")["sha256"]  # hashed while written


@pytest.mark.parametrize(("fault", "message"), [
    (lambda d: overwrite_middle(d / "model.pt"), r"model\.pt has the size its manifest records but not the content"),
    (lambda d: truncate(d / "model.pt"), r"model\.pt should be \d+ bytes, found \d+"),
    (lambda d: truncate(d / "rng_rank1.pt"), r"rng_rank1\.pt should be \d+ bytes, found \d+"),
    (lambda d: (d / "manifest_rank1.json").unlink(), "has no manifest_rank1.json: rank 1 did not finish"),
    (lambda d: (d / "manifest_rank0.json").write_text("{\"files\": "), "manifest_rank0.json is damaged"),
], ids=["same-size-damage", "truncated-model", "truncated-rng-rank1", "missing-rank-manifest", "damaged-manifest"])
def test_a_damaged_checkpoint_is_refused(tmp_path: Path, fault, message: str) -> None:
    two_ranks(tmp_path)
    fault(tmp_path)
    with pytest.raises(ckpt_io.CorruptCheckpointError, match=message):
        ckpt_io.load(tmp_path, rank=0)


def run_with_checkpoints(root: Path, steps: list[int]) -> None:
    for step in steps:
        two_ranks(root / f"checkpoint_{step:09d}", step)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_run_falls_back_to_its_newest_verified_checkpoint_and_sets_the_bad_ones_aside(tmp_path: Path) -> None:
    run_with_checkpoints(tmp_path, [10, 20, 30, 40])
    overwrite_middle(tmp_path / "checkpoint_000000040" / "model.pt")
    truncate(tmp_path / "checkpoint_000000030" / "rng_rank1.pt")
    name, set_aside = RunCheckpoints(str(tmp_path), keep=2).newest_verified()
    assert name == "checkpoint_000000020"
    assert names(tmp_path) == ["checkpoint_000000010", "checkpoint_000000020", "checkpoint_000000030.corrupt",
                               "checkpoint_000000040.corrupt"]
    message = fallback_message(set_aside, f"{tmp_path}/{name}")
    assert message.startswith("checkpoint_000000040 did not verify (checkpoint ")
    assert "model.pt has the size its manifest records but not the content" in message
    assert "rng_rank1.pt should be" in message and "set aside as checkpoint_000000030.corrupt" in message
    assert message.endswith(f"resuming from {tmp_path}/checkpoint_000000020, the newest that verifies")
    run_with_checkpoints(tmp_path, [40])  # written again after the resume: the one set aside stays
    overwrite_middle(tmp_path / "checkpoint_000000040" / "model.pt")
    assert RunCheckpoints(str(tmp_path), keep=2).newest_verified()[1][0].moved_to == "checkpoint_000000040.corrupt2"


def test_keep_counts_only_verified_checkpoints_and_nothing_goes_while_the_newest_is_unverified(tmp_path: Path) -> None:
    run_with_checkpoints(tmp_path, [10, 20, 30, 40])
    overwrite_middle(tmp_path / "checkpoint_000000040" / "model.pt")
    assert RunCheckpoints(str(tmp_path), keep=1).prune() == []
    assert names(tmp_path) == [f"checkpoint_{s:09d}" for s in (10, 20, 30, 40)]

    run_with_checkpoints(tmp_path, [50])
    assert RunCheckpoints(str(tmp_path), keep=2).prune() == ["checkpoint_000000020", "checkpoint_000000010"]
    assert names(tmp_path) == [f"checkpoint_{s:09d}" for s in (30, 40, 50)]  # 40 did not count


def test_ray_forgets_the_checkpoints_set_aside_or_deleted(tmp_path: Path) -> None:
    """Ray Train refuses to resume from a snapshot that names a missing folder: those entries are dropped, and its
    newest is then the newest left. Read back with Ray's own snapshot model."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    run_with_checkpoints(tmp_path, [10, 20, 30])
    results = [{"checkpoint_dir_name": f"checkpoint_{s:09d}", "metrics": {"step": s}} for s in (10, 20, 30)]
    state = _CheckpointManagerState(checkpoint_results=results, checkpoint_report_indices=[0, 1, 2],
                                    latest_checkpoint_result=results[-1], pending_training_results=[],
                                    pending_validation_specs=[], current_report_index=3,
                                    validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
                                    failed_validation_checkpoint_dir_names=[])
    (tmp_path / SNAPSHOT).write_text(state.json())
    shutil.rmtree(tmp_path / "checkpoint_000000010")
    (tmp_path / "checkpoint_000000030").rename(tmp_path / "checkpoint_000000030.corrupt")
    forget_missing(str(tmp_path))
    restored = _CheckpointManagerState.parse_raw((tmp_path / SNAPSHOT).read_text())
    assert [r.checkpoint_dir_name for r in restored.checkpoint_results] == ["checkpoint_000000020"]
    assert restored.checkpoint_report_indices == [1]
    assert restored.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_000000020"


def test_a_full_disk_while_writing_is_a_persistent_error_naming_the_free_space(tmp_path: Path) -> None:
    """A real ENOSPC: the file being written is /dev/full."""
    (tmp_path / "model.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        ckpt_io.save_state(tmp_path, {"w": torch.zeros(10_000)}, {"step": 1})
    assert caught.value.errno == errno.ENOSPC and ckpt_io.is_persistent(caught.value)
    assert not ckpt_io.is_persistent(OSError(errno.ECONNRESET, "reset"))
    error = ckpt_io.write_failure(caught.value, 140, str(tmp_path / "run" / "checkpoint_000000140"))
    assert str(error).startswith(f"checkpoint write failed at step 140 (ENOSPC): could not write {tmp_path}/run/")
    assert "No space left on device (" in str(error) and "free of" in str(error) and "the run stopped" in str(error)


def test_a_checkpoint_write_error_is_not_retried() -> None:
    error = ckpt_io.CheckpointWriteError(140, "/runs/r/checkpoint_000000140", "ENOSPC", "No space left on device",
                                         "0.0 MiB free of 20.0 MiB")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.reason == "checkpoint write failed at step 140 (ENOSPC)"
    with pytest.raises(ckpt_io.CheckpointWriteError):
        NoRetryOnDeterministicErrors().after_exception(None, {1: copy})


def test_a_full_disk_stops_the_step_loop_and_removes_the_partial_checkpoint(tmp_path: Path) -> None:
    """In-process (one rank, no Ray): the checkpoint of step 10 meets a full disk where it is kept."""
    spec = spec_mod.load(QUICKSTART, ["resources.workers=1", "optim.steps=12", "eval.every=null",
                                      "checkpoint.every=5", "log_every=5"])
    trap = tmp_path / "checkpoint_000000010"
    trap.mkdir()
    os.symlink("/dev/full", trap / "model.pt")
    with pytest.raises(ckpt_io.CheckpointWriteError) as caught:
        train_in_process(spec, torch.device("cpu"), checkpoint_root=tmp_path)
    assert (caught.value.step, caught.value.code, caught.value.path) == (10, "ENOSPC", str(trap))
    assert names(tmp_path) == ["checkpoint_000000005"] and ckpt_io.verify(tmp_path / "checkpoint_000000005")
