"""How well a weight-sharing supernet ranks architectures: Kendall tau and top-k hit rate of supernet-predicted
accuracy against stand-alone accuracy (benchmarks/ground_truth.py), for one-shot vs K-shot NAS on macro_digits
and the plain vs ViTAS-shared superformer on vit_digits (each v2 mechanism also alone), several seeds.

    python benchmarks/ranking.py                       # every row, seeds 0 1 2
    python benchmarks/ranking.py --rows kshot_k4 --seeds 0

Each row trains its shipped experiment file's supernet (same steps, batch and data for the rows of one space:
checked first) through the orchestrator's step loop in this process, then evaluates every network of the
ground-truth table with path_eval's procedure (BN recalibrated per path on `calib_batches` training batches, then
the test set). Reported per row: Kendall tau-b and Spearman rho of predicted vs stand-alone mean accuracy, top-k hit
rate (the fraction of the true top-k networks among the predicted top-k, k = 10% of the space), the true rank of the
predicted best, and the seconds to train and to evaluate. Writes benchmarks/results/ranking.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from budget import check_same_budget, mean_std
from ground_truth import RESULTS, read
from scipy import stats

from orchestrator import spec as spec_mod
from orchestrator.data import build_data
from orchestrator.launch import train_in_process
from trainers.nas.supernet import load_supernet
from trainers.path_eval import Config as PathEval
from trainers.path_eval import build_supernet, evaluate

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# row -> (space, experiment file, overrides)
ROWS = {
    "one_shot": ("macro_digits", EXPERIMENTS / "kshot_nas" / "digits_k1.yaml", []),
    "kshot_k2": ("macro_digits", EXPERIMENTS / "kshot_nas" / "digits.yaml", ["config.k=2", "optim.weight_decay=2.5e-4"]),
    "kshot_k4": ("macro_digits", EXPERIMENTS / "kshot_nas" / "digits.yaml", ["config.k=4"]),
    "kshot_k2_independent": ("macro_digits", EXPERIMENTS / "kshot_nas" / "digits.yaml",
                             ["config.k=2", "optim.weight_decay=2.5e-4", "config.atom_init=independent"]),
    "kshot_k4_independent": ("macro_digits", EXPERIMENTS / "kshot_nas" / "digits.yaml",
                             ["config.k=4", "config.atom_init=independent"]),
    "vit_one_shot": ("vit_digits", EXPERIMENTS / "vitas" / "digits_baseline.yaml", []),
    "vitas": ("vit_digits", EXPERIMENTS / "vitas" / "digits.yaml", []),
    "vitas_cyclic_only": ("vit_digits", EXPERIMENTS / "vitas" / "digits.yaml", ["config.identity_shifting=false"]),
    "vitas_shifting_only": ("vit_digits", EXPERIMENTS / "vitas" / "digits.yaml", ["config.channel_sharing=left"]),
}
SAME_BUDGET = ("optim.steps", "optim.batch_size", "data.dataset", "data.image_size", "config.space")
CALIB_BATCHES, BATCH = 20, 64  # path_eval's defaults, as the search files use
ONE_PROCESS = ["resources.workers=1", "eval.every=null"]


def train_supernet(row: str, seed: int, root: Path) -> tuple[Path, float]:
    _, file, overrides = ROWS[row]
    spec = spec_mod.load(file, [f"seed={seed}", *ONE_PROCESS, *overrides])
    shutil.rmtree(root, ignore_errors=True)  # a checkpoint of an earlier invocation
    started = time.perf_counter()
    train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    return root / f"checkpoint_{spec.optim.steps:09d}" / "model.pt", time.perf_counter() - started


def predict(row: str, model_file: Path, codes: list[str], seed: int) -> dict[str, float]:
    """{code: the supernet path's test accuracy after BN recalibration}."""
    _, file, overrides = ROWS[row]
    spec = spec_mod.load(file, [f"seed={seed}", *overrides])
    data = build_data(spec.data, seed=spec.seed, views="plain")
    model = load_supernet(model_file, lambda m, c: build_supernet(m, c, data.info))
    how = PathEval(calib_batches=CALIB_BATCHES, batch_size=BATCH)
    return {code: evaluate(model, code, data, how, torch.device("cpu"))[0] for code in codes}


def hit_rate(truth: dict[str, float], predicted: dict[str, float], k: int) -> float:
    top = set(sorted(truth, key=truth.get, reverse=True)[:k])
    return len(top & set(sorted(predicted, key=predicted.get, reverse=True)[:k])) / k


def scores(truth: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    codes = sorted(truth)
    t, p = [truth[c] for c in codes], [predicted[c] for c in codes]
    best = max(predicted, key=predicted.get)
    return {"kendall_tau": float(stats.kendalltau(t, p).statistic), "spearman": float(stats.spearmanr(t, p).statistic),
            "top10pct_hit": hit_rate(truth, predicted, max(1, round(0.1 * len(codes)))),
            "true_rank_of_best": 1 + sum(v > truth[best] for v in truth.values())}


def run_row(row: str, seed: int, scratch: Path) -> dict[str, float]:
    space = ROWS[row][0]
    truth = read(RESULTS / f"ground_truth_{space}.parquet")
    model_file, train_s = train_supernet(row, seed, scratch / f"{row}-{seed}")
    started = time.perf_counter()
    predicted = predict(row, model_file, sorted(truth), seed)
    return {**scores(truth, predicted), "train_s": train_s, "eval_s": time.perf_counter() - started}


def markdown(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| row | space | Kendall tau | Spearman | top-10% hit | true rank of predicted best | train s | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    for row, runs in results.items():
        ranks = ", ".join(str(int(r["true_rank_of_best"])) for r in runs)
        lines.append(f"| {row} | {ROWS[row][0]} | {mean_std([r['kendall_tau'] for r in runs])} | "
                     f"{mean_std([r['spearman'] for r in runs])} | {mean_std([r['top10pct_hit'] for r in runs])} | {ranks} | "
                     f"{statistics.mean(r['train_s'] for r in runs):.0f} | "
                     f"{statistics.mean(r['eval_s'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ranking"))
    parser.add_argument("--add", action="store_true", help="merge into the existing results instead of replacing")
    args = parser.parse_args()
    for space in {ROWS[r][0] for r in args.rows}:
        check_same_budget({r: ROWS[r][1] for r in ROWS if ROWS[r][0] == space}, SAME_BUDGET)
    out = RESULTS / "ranking.json"
    results = json.loads(out.read_text()) if args.add and out.exists() else {}
    for row in args.rows:
        results[row] = [run_row(row, seed, args.scratch) for seed in args.seeds]
        print(row, results[row], flush=True)
    out.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (RESULTS / "ranking.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
