"""CoNe vs plain cross-entropy on digits at the same budget, several seeds. Measures, does not assert.

    .venv/bin/python benchmarks/cone_digits.py [--seeds 0 1 2]

Each method runs its shipped experiment file (experiments/cone/digits.yaml; the baseline
experiments/supervised/digits_ce.yaml) through the orchestrator's step loop in this process (no Ray, one rank), so
the numbers are those of the files a researcher runs. The script refuses to compare files whose data or optim blocks
differ. Reports test accuracy (mean ± std and per seed) and seconds per run; writes
benchmarks/results/cone_digits.{md,json} and logs one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from budget import check_same_budget, publish, seed_metrics

from orchestrator import spec as spec_mod
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "cross-entropy": REPO / "experiments" / "supervised" / "digits_ce.yaml",
    "cone": REPO / "experiments" / "cone" / "digits.yaml",
}
SAME_BUDGET = ("optim", "data", "config.arch")


def run_one(method: str, seed: int) -> dict[str, float]:
    spec = spec_mod.load(FILES[method], [f"seed={seed}", "resources.workers=1", "eval.every=null",
                                         "checkpoint.every=1000000"])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"))
    return {"acc": metrics["eval/acc"], "seconds": time.perf_counter() - started}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| method | test accuracy (mean ± std) | seeds | per-seed | seconds per run |", "|---|---|---|---|---|"]
    for method, runs in results.items():
        accs = [r["acc"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {method} | {statistics.mean(accs):.3f} ± {std:.3f} | {len(accs)} | {per_seed} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cone_digits"))
    args = parser.parse_args()
    check_same_budget(FILES, SAME_BUDGET)

    results: dict[str, list[dict[str, float]]] = {m: [] for m in FILES}
    for seed in args.seeds:
        for method in FILES:
            results[method].append(run_one(method, seed))
            print(f"{method} seed {seed}: {results[method][-1]}", flush=True)
    markdown = table(results)
    publish(args.out, markdown, args.seeds, results, {"seeds": args.seeds, "dataset": "digits"}, seed_metrics(results, "acc"))
    print(markdown)


if __name__ == "__main__":
    main()
