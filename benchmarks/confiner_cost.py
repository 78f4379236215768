"""ConFiner's cost against its temporal expert's own sampling, in the same process: network evaluations (NFE) and
wall-clock seconds per video, for a short video (one clip) and a long one (ConFiner-Long's windows). Measures,
does not assert.

    .venv/bin/python benchmarks/confiner_cost.py [--control DIR --spatial DIR --temporal DIR] [--size 32]
        [--frames 16] [--videos 3] [--device cpu]

The experts default to the tiny random ones (trainers/video/tiny.py), whose outputs are noise: the numbers are the
sampler's cost structure, not video quality. On a GPU node, pass the cluster's expert directories
(experiments/confiner/cluster.yaml) and --device cuda --dtype float16. The baseline is the temporal expert's
guided DDIM from noise in `--baseline-steps` steps over the same windows (the chain's own setting, as in
experiments/confiner/cluster.yaml: 4 control steps, the last 5 of 10 DDIM steps, temporal and spatial alternating).
Writes benchmarks/results/confiner_cost.{md,json} and a run in the MLflow experiment `benchmarks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from budget import mean_std, publish

from trainers import confiner

RESULTS = Path(__file__).resolve().parent / "results" / "confiner_cost"
PROMPTS = ["a red ball rolls across the table", "waves on a beach at sunset", "a cat walks in the snow",
           "a train passes a bridge", "leaves fall in a park"]


def settings(args: argparse.Namespace) -> dict[str, confiner.Config]:
    base = confiner.Config(control=args.control, spatial=args.spatial, temporal=args.temporal, height=args.size,
                           width=args.size, frames=args.frames, segment_frames=args.frames, overlap=args.frames // 2,
                           baseline_steps=args.baseline_steps, dtype=args.dtype)
    return {"short": base, "long": dataclasses.replace(base, frames=3 * args.frames)}


def timed(sample, prompt: str, seed: int, device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    _, nfe = sample(prompt, seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, nfe


def measure(cfg: confiner.Config, videos: int, device: torch.device) -> dict:
    chain = confiner.Chain(cfg, device)
    timed(chain.confiner, PROMPTS[0], 0, device)  # warm-up: first calls allocate
    rows: dict[str, list[float]] = {"confiner_s": [], "baseline_s": [], "time_ratio": []}
    per_role: dict[str, int] = {}
    for v in range(videos):
        prompt = PROMPTS[v % len(PROMPTS)]
        seconds, nfe = timed(chain.confiner, prompt, v + 1, device)
        per_role = {role: e.nfe for role, e in chain.experts.items()}
        base_seconds, base_nfe = timed(chain.baseline, prompt, v + 1, device)
        rows["confiner_s"].append(seconds)
        rows["baseline_s"].append(base_seconds)
        rows["time_ratio"].append(seconds / base_seconds)
    return {**rows, "nfe": nfe, "baseline_nfe": base_nfe, "nfe_ratio": nfe / base_nfe, "nfe_per_role": per_role,
            "frames": cfg.frames, "windows_per_step": [len(chain.layout.starts(k)) for k in range(2)]}


def table(results: dict[str, dict]) -> str:
    header = ("| video | frames | ConFiner NFE (control / spatial / temporal) | baseline NFE | NFE ratio | ConFiner s | "
              "baseline s | time ratio |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        roles = " / ".join(str(r["nfe_per_role"][role]) for role in ("control", "spatial", "temporal"))
        lines.append(f"| {name} | {r['frames']} | {r['nfe']} ({roles}) | {r['baseline_nfe']} | {r['nfe_ratio']:.3f} | "
                     f"{mean_std(r['confiner_s'], 3, False)} | {mean_std(r['baseline_s'], 3, False)} | "
                     f"{mean_std(r['time_ratio'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", default="tiny://animatediff")
    parser.add_argument("--spatial", default="tiny://text_to_image")
    parser.add_argument("--temporal", default="tiny://text_to_video")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=16, help="an expert's clip; the long video is 3 clips")
    parser.add_argument("--baseline-steps", type=int, default=50)
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for name, cfg in settings(args).items():
        results[name] = measure(cfg, args.videos, device)
        print(name, results[name], flush=True)
    markdown = table(results)
    print(markdown)
    metrics = {f"{name}/{key}": statistics.mean(r["time_ratio"]) if key == "time_ratio" else r[key]
               for name, r in results.items() for key in ("nfe_ratio", "time_ratio")}
    publish(RESULTS, markdown, list(range(1, args.videos + 1)), results, vars(args), metrics)


if __name__ == "__main__":
    main()
