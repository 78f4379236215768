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

Files are read with `torch.load(weights_only=True)`: tensors, dicts, lists, tuples, numbers and strings only, so a
checkpoint (on shared storage, from another user) cannot run code when it is loaded; anything else is refused
with a `CheckpointError`. The RNG files hold numpy's state as a list of ints; those written before that held a
numpy array, which is allowed there (numpy's array constructor, `ndarray`, `dtype` and the uint32 dtype, nothing
else). DeepSpeed's files are read by DeepSpeed's own loader, which unpickles them in full (weights_only=False).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

MANIFEST = "manifest.json"
# what numpy's MT19937 key (a uint32 array) needs in RNG files written before it was saved as a list: the array
# constructor that pickles name (numpy's private `_reconstruct`), the array and dtype classes, the uint32 dtype
LEGACY_RNG_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
    """This rank's RNG states, as types that weights_only loads: numpy's key array becomes a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    _atomic_save(state, directory / f"rng_rank{rank}.pt")


def load(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(model_state, train_state, rng_state or None when this rank has none, e.g. after a change of world size)."""
    verify(directory)
    model_state = safe_load(directory / "model.pt")
    train_state = safe_load(directory / "train_state.pt")
    return model_state, train_state, load_rng(directory, rank)


def load_rng(directory: Path, rank: int) -> dict[str, Any] | None:
    rng_path = directory / f"rng_rank{rank}.pt"
    if not rng_path.is_file():
        return None
    with torch.serialization.safe_globals(LEGACY_RNG_GLOBALS):
        return safe_load(rng_path)


def safe_load(source: Path | IO[bytes], name: str | None = None) -> Any:
    """torch.load(weights_only=True) on the CPU; a file holding anything else (a class instance, a function: what
    could run code while unpickled) raises CheckpointError naming the file and the refused global."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"`{found.group(1)}`" if found else "an object other than tensors and plain containers"
        raise CheckpointError(f"{name or source}: refused to load {what}: checkpoints may hold only tensors, dicts, "
                              "lists, tuples, numbers and strings (torch.load weights_only=True)") from None


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
