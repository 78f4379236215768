"""Ground truth for the weight-sharing searches: every network of a small space trained stand-alone by the
orchestrator, one exhaustive-search sweep per seed, on a local Ray instance; written as a Parquet table.

    python benchmarks/ground_truth.py macro_digits --seeds 0 1 2
    python benchmarks/ground_truth.py vit_digits --seeds 0 1 2 --local

Runs experiments/ground_truth/<space>.yaml (method supervised, `searcher: exhaustive`) as sweeps named
`<name>-seed<k>` under --storage (a sweep that already finished is read back, not retrained: the sweep resumes).
With --local every network is trained by the same step loop in this process instead (`train_in_process`: no Ray,
no MLflow; the same accuracies, bit for bit, about 6x faster on a 2-core machine where a Ray Train trial spends
~30 s starting; finished networks are kept in --storage/<name>-seed<k>.json, so a rerun continues). Writes
benchmarks/results/ground_truth_<space>.parquet, one row per network:

    arch (code), acc (list: eval/acc per seed, in --seeds order), mean_acc, std_acc, mflops, params_m

benchmarks/ranking.py reads the table (or a user's own table of the same columns).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import spec as spec_mod
from trainers.nas import parse_arch_value

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COLUMNS = ("arch", "acc", "mean_acc", "std_acc", "mflops", "params_m")


def sweep_seed(space: str, seed: int, storage: Path) -> dict[str, float]:
    """{code: eval/acc} of every network, trained with `seed` (also kept in --storage/<name>-seed<k>.json)."""
    from orchestrator.tune import sweep

    base = spec_mod.load(REPO / "experiments" / "ground_truth" / f"{space}.yaml")
    spec = spec_mod.load(REPO / "experiments" / "ground_truth" / f"{space}.yaml",
                         [f"seed={seed}", f"name={base.name}-seed{seed}", f"storage_path={storage}"])
    outcome = sweep(spec, str(REPO / "experiments" / "ground_truth" / f"{space}.yaml"))
    results = {}
    for row in outcome.rows:
        if row.get("eval/acc") is not None:
            results[parse_arch_value(row["config.arch"])[1]] = float(row["eval/acc"])
    (storage / f"{base.name}-seed{seed}.json").write_text(json.dumps(results))
    return results


def train_seed_locally(space: str, seed: int, storage: Path) -> dict[str, float]:
    """{code: eval/acc} of every network, trained with `seed` in this process (resumable)."""
    import torch

    from orchestrator.launch import train_in_process
    from orchestrator.nas_search import ExhaustiveSearch
    from trainers.nas import get_space

    file = REPO / "experiments" / "ground_truth" / f"{space}.yaml"
    base = spec_mod.load(file)
    done_file = storage / f"{base.name}-seed{seed}.json"
    results = json.loads(done_file.read_text()) if done_file.exists() else {}
    searcher = ExhaustiveSearch(get_space(space), "config.arch")
    while isinstance(suggestion := searcher.suggest("next"), dict):
        arch = suggestion["config.arch"]
        code = parse_arch_value(arch)[1]
        if code not in results:
            spec = spec_mod.load(file, ["tune=null", f"seed={seed}", f"config.arch={arch}", "checkpoint.every=1000000"])
            results[code] = train_in_process(spec, torch.device("cpu"))["eval/acc"]
            storage.mkdir(parents=True, exist_ok=True)
            done_file.write_text(json.dumps(results))
            print(seed, code, round(results[code], 4), flush=True)
    return results


def table(space_name: str, per_seed: list[dict[str, float]]) -> pa.Table:
    """One row per network that every seed trained."""
    from trainers.nas import get_space

    space = get_space(space_name)
    codes = sorted(set.intersection(*(set(r) for r in per_seed)))
    accs = [[r[c] for r in per_seed] for c in codes]
    return pa.table({
        "arch": codes,
        "acc": accs,
        "mean_acc": [statistics.mean(a) for a in accs],
        "std_acc": [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs],
        "mflops": [space.flops(c) for c in codes],
        "params_m": [space.params(c) for c in codes],
    })


def read(path: str | Path) -> dict[str, float]:
    """{code: mean_acc} of a ground-truth table; ValueError names a missing column."""
    data = pq.read_table(path)
    missing = [c for c in ("arch", "mean_acc") if c not in data.column_names]
    if missing:
        raise ValueError(f"{path}: a ground-truth table needs the columns arch and mean_acc; missing {missing}")
    return dict(zip(data.column("arch").to_pylist(), data.column("mean_acc").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", choices=["macro_digits", "vit_digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storage", type=Path, default=Path("~/ray_results/ground-truth").expanduser())
    parser.add_argument("--num-cpus", type=int, default=4, help="the local Ray's CPUs (trials overlap their start)")
    parser.add_argument("--local", action="store_true", help="train in this process, not as Ray Tune trials")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.local:
        per_seed = [train_seed_locally(args.space, seed, args.storage) for seed in args.seeds]
    else:
        from orchestrator.ray_session import init_ray

        init_ray(num_cpus=args.num_cpus)  # as `orchestrator sweep` starts it (the dashboard frees stopped trials)
        per_seed = [sweep_seed(args.space, seed, args.storage) for seed in args.seeds]
    result = table(args.space, per_seed)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ground_truth_{args.space}.parquet"
    pq.write_table(result, out)
    accs = result.column("mean_acc").to_pylist()
    print(f"{out}: {result.num_rows} networks x {len(args.seeds)} seeds in {time.perf_counter() - started:.0f} s; "
          f"mean accuracy {min(accs):.4f} .. {max(accs):.4f}")


if __name__ == "__main__":
    main()
