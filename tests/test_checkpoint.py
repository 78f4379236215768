"""Checkpoints round-trip model, training and RNG state; a half-written one is refused, and so is one holding a
pickled object (it is never run)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import checkpoint as ckpt_io
from orchestrator.method_run import STATE_FILE, MethodContext
from orchestrator.storage import RunDir


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
