"""PRCL against supervised-only on the generated segmentation shapes with few labels (20 labeled images of 2000),
the same network, data, schedule and EMA evaluation, several seeds. Measures, does not assert.

    .venv/bin/python benchmarks/prcl_synthetic.py [--seeds 0 1 2] [--steps 600]

Each row runs its shipped experiment file (experiments/prcl/shapes_cpu.yaml and shapes_cpu_supervised.yaml)
through the orchestrator's step loop in this process (no Ray, one rank). Writes
benchmarks/results/prcl_synthetic.{md,json} and logs one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from budget import check_same_budget, mean_std, publish, seed_metrics

from orchestrator import spec as spec_mod
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
FILES = {"supervised-only": REPO / "experiments" / "prcl" / "shapes_cpu_supervised.yaml",
         "PRCL": REPO / "experiments" / "prcl" / "shapes_cpu.yaml"}
SAME_BUDGET = ("optim", "data", "config.backbone", "config.aspp_dim", "config.head_dim")


def run_one(name: str, seed: int, steps: int) -> dict[str, float]:
    spec = spec_mod.load(FILES[name], [f"seed={seed}", "resources.workers=1", "eval.every=null",
                                       f"optim.steps={steps}", f"config.ramp_steps={steps}",
                                       "checkpoint.every=1000000"])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"))
    return {"miou": metrics["eval/miou"], "background_iou": metrics["eval/iou000"],
            "seconds": time.perf_counter() - started}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| method | mIoU (mean ± std, per seed) | background IoU | seconds per run |", "|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {mean_std([r['miou'] for r in runs])} | "
                     f"{mean_std([r['background_iou'] for r in runs], per_seed=False)} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prcl_synthetic"))
    args = parser.parse_args()
    check_same_budget(FILES, SAME_BUDGET)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in FILES}
    for seed in args.seeds:
        for name in FILES:
            results[name].append(run_one(name, seed, args.steps))
            print(name, seed, results[name][-1], flush=True)
    markdown = table(results)
    print(markdown)
    publish(args.out, markdown, args.seeds, results, {"seeds": args.seeds, "steps": args.steps},
            seed_metrics(results, "miou"))


if __name__ == "__main__":
    main()
