"""Checkpoint files: written atomically, checked before they are loaded.

A checkpoint directory holds
    model.pt          the method's module state (networks, EMA teachers, queues and banks are buffers of it)
    train_state.pt    optimizer, LR scheduler, optimizer step and data position
    rng_rank{r}.pt    each rank's RNG states (python, numpy, torch, CUDA)
    manifest.json     written last by rank 0: the byte size of every file above that rank 0 wrote

A DeepSpeed checkpoint holds DeepSpeed's own files instead of model.pt and train_state.pt (every rank writes its
shards), the RNG files, and `manifest_rank{r}.json` from every rank (its files and their sizes); rank 0's
manifest.json then records how many ranks wrote, and each rank's manifest is checked too.

Every file is written to a temporary name and renamed, and a directory whose manifest is missing or disagrees
with the files is refused (`CheckpointError`), so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def save_main(directory: Path, model_state: dict[str, Any], train_state: dict[str, Any]) -> None:
    """Rank 0's part: the model and training state, then the manifest that vouches for them."""
    sizes = {
        "model.pt": _atomic_save(model_state, directory / "model.pt"),
        "train_state.pt": _atomic_save(train_state, directory / "train_state.pt"),
    }
    _atomic_write(directory / MANIFEST, json.dumps({"files": sizes, "step": train_state["step"]}).encode())


def save_rng(directory: Path, rank: int) -> None:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    _atomic_save(state, directory / f"rng_rank{rank}.pt")


def load(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(model_state, train_state, rng_state or None when this rank has none, e.g. after a change of world size)."""
    verify(directory)
    model_state = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
    train_state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=False)
    return model_state, train_state, load_rng(directory, rank)


def load_rng(directory: Path, rank: int) -> dict[str, Any] | None:
    rng_path = directory / f"rng_rank{rank}.pt"
    return torch.load(rng_path, map_location="cpu", weights_only=False) if rng_path.is_file() else None


def save_rank_manifest(directory: Path, rank: int, world: int, step: int) -> None:
    """After a rank has written its files (any layout, e.g. DeepSpeed's): list them with their sizes; rank 0
    also writes manifest.json with the number of ranks whose manifests a complete checkpoint has."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith("manifest") and not p.name.endswith(".tmp")}
    _atomic_write(directory / f"manifest_rank{rank}.json", json.dumps({"files": sizes}).encode())
    if rank == 0:
        _atomic_write(directory / MANIFEST, json.dumps({"files": {}, "step": step, "ranks": world}).encode())


def verify(directory: Path) -> dict[str, Any]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST}: it was not completely written")
    manifest = json.loads(manifest_path.read_text())
    _check_sizes(directory, manifest["files"])
    for rank in range(manifest.get("ranks", 0)):
        rank_manifest = directory / f"manifest_rank{rank}.json"
        if not rank_manifest.is_file():
            raise CheckpointError(f"checkpoint {directory} has no {rank_manifest.name}: rank {rank} did not finish")
        _check_sizes(directory, json.loads(rank_manifest.read_text())["files"])
    return manifest


def _check_sizes(directory: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "missing"
            raise CheckpointError(f"checkpoint {directory}: {name} should be {size} bytes, found {found}")


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
