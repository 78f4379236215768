"""PRCL against supervised-only on the generated segmentation shapes with few labels, the same network, data,
schedule and EMA evaluation, several seeds, and the supervised ceiling with (nearly) every training image labeled.
Measures, does not assert.

    .venv/bin/python benchmarks/prcl_synthetic.py [--seeds 0 1 2] [--ceiling-seeds 0 1 2] [--split test]
                                                  [--threads 1] [--jobs 1]

Each row runs its shipped experiment file (experiments/prcl/shapes_cpu.yaml, shapes_cpu_supervised.yaml and
shapes_cpu_all_labels.yaml) through the orchestrator's step loop (no Ray, one rank, `--threads` torch threads), in
this process, or `--jobs N` runs at a time, each in its own process. `--split val` evaluates on held-out generated
images instead of the test images (for choosing hyperparameters; `--out` then names another file). Writes
benchmarks/results/prcl_synthetic.{md,json} and logs one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from budget import check_same_budget, mean_std, publish, seed_metrics, train_file

from orchestrator import spec as spec_mod

REPO = Path(__file__).resolve().parents[1]
CEILING = "supervised-only all labels"
FILES = {CEILING: REPO / "experiments" / "prcl" / "shapes_cpu_all_labels.yaml",
         "supervised-only": REPO / "experiments" / "prcl" / "shapes_cpu_supervised.yaml",
         "PRCL": REPO / "experiments" / "prcl" / "shapes_cpu.yaml"}
SAME_BUDGET = ("optim", "data.dataset", "data.synthetic_per_class", "data.image_size", "data.shapes_classes",
               "data.shapes_radius", "data.shapes_per_image", "data.shapes_textured", "data.unlabeled_ratio",
               "data.num_labeled", "config.backbone", "config.aspp_dim", "config.low_level_dim", "config.head_dim",
               "config.rep_dim", "config.lr", "config.uncertainty_lr")


def run_one(name: str, seed: int, split: str) -> dict[str, float]:
    metrics = train_file(FILES[name], seed, [f"data.eval_on={split}"])
    return {key: value for key, value in metrics.items() if key in ("miou", "seconds") or key.startswith("iou")}


def run_all(tasks: list[tuple[str, int]], split: str, jobs: int, threads: int) -> list[dict[str, float]]:
    """Every (row, seed) of `tasks`, `jobs` at a time in spawned processes of `threads` torch threads (in this
    process when `jobs` is 1); the results in the order of `tasks`."""
    if jobs == 1:
        return [report(task, run_one(*task, split)) for task in tasks]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, *task, split) for task in tasks]
        return [report(task, future.result()) for task, future in zip(tasks, futures)]


def report(task: tuple[str, int], result: dict[str, float]) -> dict[str, float]:
    print(*task, {k: round(v, 3) for k, v in result.items()}, flush=True)
    return result


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| method | labeled images | mIoU (mean ± std, per seed) | background IoU | seconds per run |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        labeled = spec_mod.load(FILES[name]).data.num_labeled
        lines.append(f"| {name} | {labeled} | {mean_std([r['miou'] for r in runs])} | "
                     f"{mean_std([r['iou000'] for r in runs], per_seed=False)} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ceiling-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the all-labels row")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prcl_synthetic"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget(FILES, SAME_BUDGET, exempt={"data.num_labeled": CEILING})
    seeds = {name: args.ceiling_seeds if name == CEILING else args.seeds for name in FILES}
    tasks = [(name, seed) for name in FILES for seed in seeds[name]]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in FILES}
    for (name, _), result in zip(tasks, run_all(tasks, args.split, args.jobs, args.threads)):
        results[name].append(result)
    markdown = table(results)
    print(markdown)
    publish(args.out, markdown, args.seeds, results, {"seeds": args.seeds, "ceiling_seeds": args.ceiling_seeds,
                                                      "split": args.split, "threads": args.threads,
                                                      "jobs": args.jobs},
            seed_metrics(results, "miou"))


if __name__ == "__main__":
    main()
