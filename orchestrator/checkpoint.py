"""Checkpoint files: written atomically, verified by content before they are loaded.

A checkpoint directory holds
    model.pt               the method's module state (networks, EMA teachers, queues and banks are buffers of it)
    train_state.pt         optimizer, LR scheduler, optimizer step and data position
    rng_rank{r}.pt         each rank's RNG states (python, numpy, torch, CUDA)
    manifest_rank{r}.json  written by each rank after its files: every file it wrote, its size and sha256
    manifest.json          written last by rank 0: the step, and how many ranks' manifests a complete one has

A DeepSpeed checkpoint holds DeepSpeed's own files (every rank writes its shards) instead of model.pt and
train_state.pt. Under Ray Train every rank writes into its own directory and Ray merges them into one, so each rank
lists only its own files. Every file is hashed right after it is written, read back from the page cache (faster
than hashing inside torch.save's stream; DeepSpeed's files are hashed the same way). sha256: with the CPU's SHA
extensions it hashes faster than blake2b (benchmarks/results/checkpoint_hash.md).

Every file is written to a temporary name and renamed. `verify` checks every rank's files against their manifests
(size, then content), so a half-written, truncated or damaged checkpoint is refused (`CorruptCheckpointError`) and
never loaded; orchestrator/run_checkpoints.py then falls back to an older one. Manifests written before content
hashes list sizes only, and only sizes are checked for them.

Files are read with `torch.load(weights_only=True)`: tensors, dicts, lists, tuples, numbers and strings only, so a
checkpoint (on shared storage, from another user) cannot run code when it is loaded; anything else is refused
with a `CheckpointError`. The RNG files hold numpy's state as a list of ints; those written before that held a
numpy array, which is allowed there (numpy's array constructor, `ndarray`, `dtype` and the uint32 dtype, nothing
else). DeepSpeed's files are read by DeepSpeed's own loader, which unpickles them in full (weights_only=False).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow.fs as pafs
import torch

MANIFEST = "manifest.json"
HASH = "sha256"
CHUNK = 4 * 2**20
# write errors that a retry meets again: the checkpoint is not retried, the run stops (CheckpointWriteError)
PERSISTENT_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# what numpy's MT19937 key (a uint32 array) needs in RNG files written before it was saved as a list: the array
# constructor that pickles name (numpy's private `_reconstruct`), the array and dtype classes, the uint32 dtype
LEGACY_RNG_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """A manifest is missing or unreadable, or a file is missing, has another size or other content than its
    manifest records: the checkpoint was not completely written or was damaged after it was."""


class CheckpointWriteError(RuntimeError):
    """Writing the checkpoint of `step` to `path` failed with a persistent error (`code`, e.g. ENOSPC): a retry
    would meet it again, so the run stops. `free` describes the free space there."""

    def __init__(self, step: int, path: str, code: str, detail: str, free: str):
        self.step, self.path, self.code, self.detail, self.free = step, path, code, detail, free
        super().__init__(f"{self.reason}: could not write {path}: [{code}] {detail} ({free}); the partial checkpoint "
                         "was removed and the run stopped, since a retry would meet the same error")

    @property
    def reason(self) -> str:
        """The short form, for the MLflow tag `stopped_reason`."""
        return f"checkpoint write failed at step {self.step} ({self.code})"

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles worker errors: rebuild from the fields
        return type(self), (self.step, self.path, self.code, self.detail, self.free)


def is_persistent(error: OSError) -> bool:
    return error.errno in PERSISTENT_WRITE_ERRORS


def write_failure(error: OSError, step: int, path: str) -> CheckpointWriteError:
    """The CheckpointWriteError of `error`, raised while writing to `path` (local or a URI)."""
    return CheckpointWriteError(step, path, errno.errorcode.get(error.errno, str(error.errno)),
                                os.strerror(error.errno), free_space(path))


def free_space(path: str) -> str:
    if "://" in path:
        return "free space unknown on that storage"
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {existing}"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_state(directory: Path, model_state: dict[str, Any], train_state: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's part: the model and training state. Returns their manifest entries."""
    return {"model.pt": _atomic_save(model_state, directory / "model.pt"),
            "train_state.pt": _atomic_save(train_state, directory / "train_state.pt")}


def save_main(directory: Path, model_state: dict[str, Any], train_state: dict[str, Any]) -> None:
    """A complete one-rank checkpoint of the model and training state (an RNG file written before it is listed
    too)."""
    written = save_state(directory, model_state, train_state)
    save_rank_manifest(directory, 0, 1, train_state["step"], written)


def save_rng(directory: Path, rank: int) -> dict[str, Any]:
    """This rank's RNG states, as types that weights_only loads: numpy's key array becomes a list of ints. Returns
    the file's manifest entry."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    file = f"rng_rank{rank}.pt"
    return {file: _atomic_save(state, directory / file)}


def load(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """verify, then read."""
    verify(directory)
    return read(directory, rank)


def read(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(model_state, train_state, rng_state or None when this rank has none, e.g. after a change of world size) of
    a checkpoint already verified."""
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


def save_rank_manifest(directory: Path, rank: int, world: int, step: int,
                       written: dict[str, Any] | None = None) -> None:
    """After a rank has written its files (any layout, e.g. DeepSpeed's): list each with its size and sha256
    (`written`: entries hashed when this module wrote them; other files are read back to hash them). Rank 0 then writes
    manifest.json: the step and the number of ranks whose manifests a complete checkpoint has."""
    written = written or {}
    files = {name: written.get(name) or _entry(directory / name) for name in _rank_files(directory)}
    _atomic_write(directory / f"manifest_rank{rank}.json", json.dumps({"files": files, "step": step}).encode())
    if rank == 0:
        _atomic_write(directory / MANIFEST, json.dumps({"step": step, "ranks": world, "hash": HASH}).encode())


def _rank_files(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith("manifest") and not p.name.endswith(".tmp")]


def _entry(path: Path) -> dict[str, Any]:
    digest = hashlib.new(HASH)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, HASH: digest.hexdigest()}


def read_manifest(directory: Path | str, fs: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Rank 0's manifest.json (the step, the number of ranks), without checking the files."""
    return _read_manifest(fs or pafs.LocalFileSystem(), str(directory), MANIFEST, "it was not completely written")


def verify(directory: Path | str, fs: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Check every file of every rank against its manifest (size, then content); raises CorruptCheckpointError
    naming the first that differs. Returns rank 0's manifest. `fs`: a pyarrow filesystem (local by default)."""
    fs, root = fs or pafs.LocalFileSystem(), str(directory)
    manifest = _read_manifest(fs, root, MANIFEST, "it was not completely written")
    _check_files(fs, root, manifest.get("files", {}))  # manifests from before rank manifests listed rank 0's here
    for rank in range(manifest.get("ranks", 0)):
        rank_manifest = _read_manifest(fs, root, f"manifest_rank{rank}.json", f"rank {rank} did not finish")
        _check_files(fs, root, rank_manifest["files"])
    return manifest


def _read_manifest(fs: pafs.FileSystem, root: str, name: str, why_missing: str) -> dict[str, Any]:
    if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.File:
        raise CorruptCheckpointError(f"checkpoint {root} has no {name}: {why_missing}")
    with fs.open_input_stream(f"{root}/{name}") as stream:
        text = stream.read()
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CorruptCheckpointError(f"checkpoint {root}: {name} is damaged (not a JSON manifest)")
    return manifest


def _check_files(fs: pafs.FileSystem, root: str, files: dict[str, Any]) -> None:
    for name, entry in files.items():
        size = entry if isinstance(entry, int) else entry["size"]  # an int: written before content hashes
        info = fs.get_file_info(f"{root}/{name}")
        if info.type != pafs.FileType.File:
            raise CorruptCheckpointError(f"checkpoint {root}: {name} is missing")
        if info.size != size:
            raise CorruptCheckpointError(f"checkpoint {root}: {name} should be {size} bytes, found {info.size}")
        if isinstance(entry, dict) and _digest(fs, f"{root}/{name}") != entry[HASH]:
            raise CorruptCheckpointError(f"checkpoint {root}: {name} has the size its manifest records but not the "
                                         f"content ({HASH} differs): it was damaged after it was written")


def _digest(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.new(HASH)
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save to a temporary name, hashed, then renamed; returns the file's manifest entry. Saved through a
    Python file, so a full disk raises OSError(ENOSPC) (torch.save to a path raises a RuntimeError without errno);
    hashed by reading the file back from the page cache, which measured faster than hashing inside a stream that
    torch.save writes through (200 MB: 0.41-0.51 s against 0.91-0.99 s)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        torch.save(obj, file)
    entry = _entry(tmp)
    os.replace(tmp, path)
    return entry


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
