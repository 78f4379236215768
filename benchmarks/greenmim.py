"""GreenMIM against the dense SimMIM baseline on the same Swin, mask ratio 0.75: time per training step
(forward + backward + AdamW) and peak memory as ratios, and the optimal grouping against the official fixed group
size. Measures, does not assert.

    .venv/bin/python benchmarks/greenmim.py [--batch 4] [--steps 5] [--model swin_b]

Each variant trains in a fresh process (so its peak memory is its own) through the methods' own build, param_groups
and train_step and the orchestrator's optimizer (orchestrator.optim.build_optimizer: fused AdamW): greenmim with
group_size "optimal" (the paper's search), greenmim with "fixed" (the released code's min(M^2, max w)), and simmim
with its mask ratio set to 0.75. Memory is the peak CUDA allocation on a GPU; on the CPU
the process's peak RSS above its size after building the model. The activation part is the peak above what stays
between steps (model, gradients, optimizer state). The grouping part reports, over random 0.75 masks of 32-px
units, the padding fraction of the groups and the cost the kernel executes, 4 N C^2 + n_g 2 g^2 C
(lab_kernels.grouping.grouping_cost), at every Swin stage for both group sizes.
Writes benchmarks/results/greenmim.{md,json} and logs one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # the paper's Swin-B (window 7) and a Swin-T of the same family, both at 224 px
    "swin_b": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "swin_t": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
}
VARIANTS = {"greenmim": ("greenmim", {"group_size": "optimal"}),
            "greenmim_fixed": ("greenmim", {"group_size": "fixed"}),
            "simmim": ("simmim", {"mask_ratio": 0.75})}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def time_variant(variant: str, model: str, batch: int, steps: int, threads: int, out: Any) -> None:
    """In a fresh process: build, warm up one step, time `steps` steps; put the result on `out`."""
    import trainers
    from orchestrator.optim import build_optimizer
    from orchestrator.spec import OptimSpec
    from trainers._common.contract import DataInfo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method, overrides = VARIANTS[variant]
    spec = trainers.get(method)
    cfg = dataclasses.replace(spec.Config(), **MODELS[model], **overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = current_rss_mb()
    net = spec.build(cfg, DataInfo(num_classes=1000, image_size=224, in_channels=3, num_train=0, num_labeled=0))
    net = net.to(device)
    optim = OptimSpec(name="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, steps=steps + 1, batch_size=batch)
    optimizer = build_optimizer(spec.param_groups(net, cfg), optim)  # as the orchestrator builds it: fused AdamW
    images = torch.randn(batch, 3, 224, 224, device=device)

    def step(number: int) -> None:
        loss, _ = spec.train_step(net, {"x": images}, cfg, number)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)  # creates the gradients and the optimizer state
    steady = current_rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for number in range(1, steps + 1):
        started = time.perf_counter()
        step(number)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    out.put({"variant": variant, "device": str(device), "seconds_per_step": statistics.median(seconds),
             "memory_mb": peak - (0 if device.type == "cuda" else before), "activation_mb": peak - steady,
             "params_m": sum(p.numel() for p in net.parameters()) / 1e6})


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=time_variant, args=(variant, args.model, args.batch, args.steps, args.threads,
                                                         queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def grouping_overhead(model: str, masks: int) -> list[dict[str, Any]]:
    """Padding and cost of fixed vs optimal groups at each stage, over random 0.75 unit masks (W-MSA and SW-MSA)."""
    from lab_kernels.group_window_attention import window_ids
    from lab_kernels.grouping import (
        fixed_group_size,
        group_windows,
        grouping_cost,
        optimal_group_size,
        padding_fraction,
    )
    from trainers.greenmim import random_unit_mask, upsample_mask

    rows = []
    dims = [MODELS[model]["embed_dim"] * 2**i for i in range(4)]
    for stage, (grid, dim) in enumerate(zip((56, 28, 14, 7), dims)):
        fixed_pad, optimal_pad, cost_ratio, attention_ratio, groups = [], [], [], [], []
        for seed in range(masks):
            unit_mask = random_unit_mask(7, 0.75, torch.Generator().manual_seed(seed))
            coords = (~upsample_mask(unit_mask, grid // 7)).nonzero()
            window, shift = (7, 3 * (seed % 2)) if grid > 7 else (7, 0)
            ids = window_ids(coords, window, shift, (grid, grid))
            sizes = torch.unique(ids, return_counts=True)[1].tolist()
            fixed, optimal = fixed_group_size(sizes, window * window), optimal_group_size(sizes, dim)
            fixed_pad.append(padding_fraction(fixed, sizes))
            optimal_pad.append(padding_fraction(optimal, sizes))
            cost_ratio.append(grouping_cost(fixed, sizes, dim) / grouping_cost(optimal, sizes, dim))
            projections = 4 * sum(sizes) * dim**2  # QKV and output projections of the visible tokens: any g
            attention_ratio.append((grouping_cost(optimal, sizes, dim) - projections)
                                   / (grouping_cost(fixed, sizes, dim) - projections))
            groups.append((len(group_windows(fixed, sizes)), len(group_windows(optimal, sizes))))
        rows.append({"stage": stage + 1, "grid": grid, "dim": dim,
                     "padding_fixed": statistics.mean(fixed_pad), "padding_optimal": statistics.mean(optimal_pad),
                     "cost_fixed_over_optimal": statistics.mean(cost_ratio),
                     "attention_optimal_over_fixed": statistics.mean(attention_ratio),
                     "attention_optimal_over_fixed_max": max(attention_ratio),
                     "groups_fixed": statistics.mean(g[0] for g in groups),
                     "groups_optimal": statistics.mean(g[1] for g in groups)})
    return rows


def markdown(results: dict[str, dict[str, Any]], grouping: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = results["simmim"]
    device = base["device"]
    lines = [f"GreenMIM vs SimMIM, {args.model} at 224 px, mask ratio 0.75, batch {args.batch}, {device}"
             f"{f', {args.threads} threads' if device == 'cpu' else ''}, median of {args.steps} steps:", "",
             "| variant | s / step | speed-up vs SimMIM | peak memory (MB) | vs SimMIM | activations (MB) "
             "| vs SimMIM |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds_per_step']:.3f} | {base['seconds_per_step'] / r['seconds_per_step']:.2f}x"
                     f" | {r['memory_mb']:.0f} | {r['memory_mb'] / base['memory_mb'] - 1:+.0%} | "
                     f"{r['activation_mb']:.0f} | {r['activation_mb'] / base['activation_mb'] - 1:+.0%} |")
    lines += ["", "Peak memory: the model, its gradients, AdamW's state and the activations (on the CPU, the peak RSS "
              "above the process's size before building the model); activations: the peak above what stays between "
              "steps (model, gradients, optimizer state)."]
    lines += ["", "Paper (Swin-B, GPU): 2.7x faster, -70% memory.", "",
              f"Grouping over {args.masks} random masks per stage (0.75 of 32-px units; W-MSA and SW-MSA alternate):",
              "", "| stage | grid | C | padding fixed | padding optimal | groups fixed | groups optimal | "
              "executed cost fixed / optimal | attention optimal / fixed (mean, max) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in grouping:
        lines.append(f"| {r['stage']} | {r['grid']} | {r['dim']} | {r['padding_fixed']:.3f} | "
                     f"{r['padding_optimal']:.3f} | {r['groups_fixed']:.1f} | {r['groups_optimal']:.1f} | "
                     f"{r['cost_fixed_over_optimal']:.3f} | {r['attention_optimal_over_fixed']:.3f}, "
                     f"{r['attention_optimal_over_fixed_max']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_b", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=4, help="per step (on a GPU, e.g. SimMIM's 128 per GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--masks", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "greenmim"))
    args = parser.parse_args()
    random.seed(0)
    results = {}
    for name in [v for v in args.variants if v != "simmim"] + ["simmim"]:
        results[name] = run_variant(name, args)
        print(json.dumps(results[name]), flush=True)
    grouping = grouping_overhead(args.model, args.masks)
    text = markdown(results, grouping, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "steps": results, "grouping": grouping},
                                                   indent=2))
    log_to_mlflow(results, text, args)


def log_to_mlflow(results: dict[str, dict[str, Any]], text: str, args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="greenmim"):
        mlflow.log_params({"model": args.model, "batch": args.batch, "steps": args.steps, "threads": args.threads})
        for name, r in results.items():
            mlflow.log_metric(f"{name}/seconds_per_step", r["seconds_per_step"])
            mlflow.log_metric(f"{name}/memory_mb", r["memory_mb"])
            mlflow.log_metric(f"{name}/activation_mb", r["activation_mb"])
        mlflow.log_text(text, "greenmim.md")


if __name__ == "__main__":
    main()
