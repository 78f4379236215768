"""What verifying checkpoints by content costs: hash throughput (sha256, blake2b) on this CPU, and for a few
checkpoint sizes the cost of a hashed write (torch.save, then the file's sha256 read back from the page cache) and of verifying (reading back and hashing), each against the
time torch.save takes to write the checkpoint. Measures, does not assert.

    .venv/bin/python benchmarks/checkpoint_hash.py [--sizes-mb 100 1000] [--repeats 3]

Writes benchmarks/results/checkpoint_hash.{md,json}. The write is torch.save into the page cache (no fsync, no
upload to storage_path), the fastest a checkpoint is ever written, so the fractions are upper bounds; the files
read back by verify are in the page cache too, so verify measures hashing more than disk reads. Write times vary
with the kernel's writeback of dirty pages: medians of interleaved runs, os.sync() before each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from orchestrator import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHUNK = 4 * 2**20


def timed(work: Callable[[], object]) -> float:
    """Seconds of `work`, after os.sync(): dirty pages of the previous write are not flushed inside it."""
    os.sync()
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def hash_seconds(data: bytes, name: str) -> float:
    view = memoryview(data)
    digest = hashlib.new(name)
    started = time.perf_counter()
    for i in range(0, len(view), CHUNK):
        digest.update(view[i:i + CHUNK])
    return time.perf_counter() - started


def throughput(repeats: int) -> dict[str, float]:
    """Seconds per GB (10^9 bytes) of each hash over 256 MiB in memory."""
    data = os.urandom(256 * 2**20)
    return {name: min(hash_seconds(data, name) for _ in range(repeats)) / len(data) * 1e9
            for name in ("sha256", "blake2b")}


def small_cnn_state() -> dict[str, torch.Tensor]:
    """The quickstart's model with its SGD momentum buffers: what its checkpoint holds."""
    from orchestrator import spec as spec_mod
    from orchestrator.launch import Setup

    spec = spec_mod.load(REPO / "experiments" / "quickstart.yaml", ["resources.workers=1"])
    setup = Setup.build(spec, torch.device("cpu"))
    momentum = {f"momentum.{k}": torch.randn_like(v) for k, v in setup.model.state_dict().items()
                if v.is_floating_point()}
    return {**setup.model.state_dict(), **momentum}


def sized_state(megabytes: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of 25 MB each adding up to `megabytes`."""
    per_tensor = 25 * 10**6 // 4
    count = max(1, megabytes // 25)
    return {f"layer{i}.weight": torch.randn(per_tensor) for i in range(count)}


def measure(label: str, state: dict[str, torch.Tensor], repeats: int, scratch: Path) -> dict[str, float]:
    plain, hashed = scratch / "plain", scratch / "hashed"
    for directory in (plain, hashed):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
    written: dict = {}
    writes, hashed_writes = [], []
    for _ in range(repeats):  # interleaved, so that both see the same state of the page cache
        writes.append(timed(lambda: torch.save(state, plain / "model.pt")))
        hashed_writes.append(timed(lambda: written.update(ckpt_io.save_state(hashed, state, {"step": 0}))))
    write_s, hashed_write_s = statistics.median(writes), statistics.median(hashed_writes)
    ckpt_io.save_rank_manifest(hashed, 0, 1, 0, written)
    verify_s = statistics.median(timed(lambda: ckpt_io.verify(hashed)) for _ in range(repeats))
    data = (plain / "model.pt").read_bytes()
    hash_s = {name: min(hash_seconds(data, name) for _ in range(repeats)) for name in ("sha256", "blake2b")}
    return {
        "checkpoint": label, "bytes": len(data), "write_s": write_s, "write_hashing_s": hashed_write_s,
        "hashed_write_overhead": (hashed_write_s - write_s) / write_s,
        "verify_s": verify_s, "verify_fraction": verify_s / write_s,
        "sha256_s": hash_s["sha256"], "sha256_fraction": hash_s["sha256"] / write_s,
        "blake2b_s": hash_s["blake2b"], "blake2b_fraction": hash_s["blake2b"] / write_s,
    }


def markdown(rates: dict[str, float], rows: list[dict[str, float]]) -> str:
    lines = [
        "# Checkpoint hashing cost", "",
        (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}. "
         "Hash throughput: best of the repeats; checkpoints: medians (os.sync() before each). `write` is torch.save "
         "into the page cache (no fsync, no upload to storage): the fractions are upper bounds. A hashed "
         "write is torch.save, then the sha256 of the file read back from the page cache."), "",
        "| hash | s per GB (in memory) |", "|---|---|",
        *[f"| {name} | {seconds:.3f} |" for name, seconds in rates.items()], "",
        ("| checkpoint | MB | write s | hashed write s | overhead | verify (read + sha256) s | "
         "verify / write | sha256 alone / write | blake2b alone / write |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['bytes'] / 1e6:.1f} | {r['write_s']:.3f} | {r['write_hashing_s']:.3f} "
                     f"| {r['hashed_write_overhead']:+.0%} | {r['verify_s']:.3f} | {r['verify_fraction']:.0%} "
                     f"| {r['sha256_fraction']:.0%} | {r['blake2b_fraction']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rates = throughput(args.repeats)
    print({k: f"{v:.3f} s/GB" for k, v in rates.items()})
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cases = [("small_cnn (quickstart)", small_cnn_state)] + [
            (f"{mb} MB", lambda mb=mb: sized_state(mb)) for mb in args.sizes_mb]
        for label, build in cases:
            rows.append(measure(label, build(), args.repeats, Path(scratch)))
            print(rows[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_hash.json").write_text(json.dumps({"seconds_per_gb": rates, "checkpoints": rows}, indent=1))
    (RESULTS / "checkpoint_hash.md").write_text(markdown(rates, rows))
    print(markdown(rates, rows))


if __name__ == "__main__":
    main()
