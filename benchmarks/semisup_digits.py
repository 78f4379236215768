"""Semi-supervised methods on digits with 2 labels per class: supervised-only vs FixMatch vs SimMatch vs
SimMatchV2, several seeds each, the same budget for every method. Measures, does not assert.

    .venv/bin/python benchmarks/semisup_digits.py [--seeds 0 1 2] [--methods supervised fixmatch ...]

Each method runs its shipped experiment file (experiments/<method>/digits.yaml; the supervised-only baseline is
experiments/supervised/digits_2_labels.yaml) through the orchestrator's step loop in this process (no Ray, one
rank), so the numbers are those of the files a researcher runs. Writes benchmarks/results/semisup_digits.{md,json}
and logs one MLflow run (experiment `benchmarks`).
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
    "supervised": REPO / "experiments" / "supervised" / "digits_2_labels.yaml",
    "fixmatch": REPO / "experiments" / "fixmatch" / "digits.yaml",
    "simmatch": REPO / "experiments" / "simmatch" / "digits.yaml",
    "simmatchv2": REPO / "experiments" / "simmatchv2" / "digits.yaml",
}
SAME_BUDGET = ("optim", "data.dataset", "data.image_size", "data.labeled_per_class", "data.unlabeled_ratio")


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
    parser.add_argument("--methods", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "semisup_digits"))
    args = parser.parse_args()
    check_same_budget({m: FILES[m] for m in args.methods}, SAME_BUDGET,
                      exempt={"data.unlabeled_ratio": "supervised"})  # the baseline reads no unlabeled data

    results = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            results[method].append(run_one(method, seed))
            print(f"{method} seed {seed}: {results[method][-1]}", flush=True)
    markdown = table(results)
    publish(args.out, markdown, args.seeds, results, {"seeds": args.seeds, "labels_per_class": 2, "dataset": "digits"}, seed_metrics(results, "acc"))
    print(markdown)


if __name__ == "__main__":
    main()
