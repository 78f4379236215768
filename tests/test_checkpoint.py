"""Checkpoints round-trip model, training and RNG state; a half-written one is refused."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import checkpoint as ckpt_io


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
