"""CoNe vs plain cross-entropy on digits at the same budget, several seeds. Measures, does not assert.

    .venv/bin/python benchmarks/cone_digits.py --select [--select-seeds 0 1]   # choose on the validation split
    .venv/bin/python benchmarks/cone_digits.py [--seeds 0 1 2]

Each method runs its shipped experiment file (experiments/cone/digits.yaml; the baseline
experiments/supervised/digits_ce.yaml) through the orchestrator's step loop in this process (no Ray, one rank), so
the numbers are those of the files a researcher runs. The script refuses to compare files whose data or optim blocks
differ. Both files hold 15 images per class out of the training set (data.val_per_class): `--select` scores CoNe's
GRID on them (data.eval_on val; benchmarks/results/cone_digits_selection.{md,json}), the file carries the chosen
value, and the plain run reports test accuracy once (mean ± std and per seed) and seconds per run; both write
benchmarks/results/ and log one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from budget import check_same_budget, publish, publish_selection, seed_metrics, train_file

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "cross-entropy": REPO / "experiments" / "supervised" / "digits_ce.yaml",
    "cone": REPO / "experiments" / "cone" / "digits.yaml",
}
SAME_BUDGET = ("optim", "data", "config.arch")
GRID = {"cone": {"config.base_momentum": [0.9, 0.99, 0.996]}}  # the key encoder's EMA (official 0.996)


def run_one(method: str, seed: int, extra: list[str] = ()) -> dict[str, float]:
    result = train_file(FILES[method], seed, extra)
    return {"acc": result["acc"], "loss": result["loss"], "seconds": result["seconds"]}


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
    parser.add_argument("--select", action="store_true", help="score GRID on the validation split instead")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cone_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget(FILES, SAME_BUDGET)
    if args.select:
        publish_selection(args.out, GRID, args.select_seeds, run_one)
        return

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
