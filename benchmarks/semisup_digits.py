"""Semi-supervised methods on digits with 2 labels per class: supervised-only vs FixMatch vs SimMatch vs
SimMatchV2, several seeds each, the same budget for every method. Measures, does not assert.

    .venv/bin/python benchmarks/semisup_digits.py --select [--select-seeds 0]   # choose on the validation split
    .venv/bin/python benchmarks/semisup_digits.py [--seeds 0 1 2] [--methods supervised fixmatch ...]

Each method runs its shipped experiment file (experiments/<method>/digits.yaml; the supervised-only baseline is
experiments/supervised/digits_2_labels.yaml) through the orchestrator's step loop in this process (no Ray, one
rank), so the numbers are those of the files a researcher runs. Every file holds 15 images per class out of the
training pool (data.val_per_class). `--select` scores each method's GRID on those validation images (data.eval_on
val) and writes benchmarks/results/semisup_digits_selection.{md,json}; the files carry the chosen values, and the
plain run reports the test set once. Both write their table and log one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from budget import check_same_budget, publish, publish_selection, seed_metrics, train_file

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "supervised": REPO / "experiments" / "supervised" / "digits_2_labels.yaml",
    "fixmatch": REPO / "experiments" / "fixmatch" / "digits.yaml",
    "simmatch": REPO / "experiments" / "simmatch" / "digits.yaml",
    "simmatchv2": REPO / "experiments" / "simmatchv2" / "digits.yaml",
}
SAME_BUDGET = ("optim", "data.dataset", "data.image_size", "data.labeled_per_class", "data.unlabeled_ratio",
               "data.val_per_class")
# what was chosen on the validation split: the EMA momentum of every method (the evaluation model of FixMatch and
# SimMatch, SimMatchV2's teacher, ramped to 1 at 0.99), SimMatchV2's threshold, SimMatch's bank normalisation
GRID = {
    "fixmatch": {"config.ema_momentum": [0.99, 0.999]},
    "simmatch": {"config.ema_momentum": [0.99, 0.999], "config.bank_norm": ["embedding", "usb"]},
    "simmatchv2": {"config.threshold": [0.7, 0.95], "config.ema_m": [0.99, 0.999]},
}


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
    parser.add_argument("--methods", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--select", action="store_true", help="score GRID on the validation split instead")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "semisup_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget({m: FILES[m] for m in args.methods}, SAME_BUDGET,
                      exempt={"data.unlabeled_ratio": "supervised"})  # the baseline reads no unlabeled data
    if args.select:
        publish_selection(args.out, {m: GRID[m] for m in args.methods if m in GRID}, args.select_seeds,
                          run_one)
        return

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
