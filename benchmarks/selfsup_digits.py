"""Self-supervised representations on digits: ReSSL, WCL and LEWEL pre-trained with the same budget, judged by a
linear probe and kNN on the frozen encoder, against a randomly initialised encoder of the same architecture, several
seeds. Measures, does not assert.

    .venv/bin/python benchmarks/selfsup_digits.py --select [--select-seeds 0]   # choose on the validation split
    .venv/bin/python benchmarks/selfsup_digits.py [--seeds 0 1 2] [--methods ressl ressl_extended wcl lewel] [--add]

Each method runs its shipped file (experiments/<method>/digits.yaml; the extended ReSSL
experiments/ressl/digits_extended.yaml) through the orchestrator's step loop in this process (no Ray, one rank); its
last checkpoint is then evaluated by the shipped probe file
(experiments/linear_probe/digits.yaml, `init_from` set to that checkpoint), and the random baseline is the same
probe file with `init_from` empty and the same seed. Writes benchmarks/results/selfsup_digits.{md,json}; with --add,
the methods' rows join the rows already in the JSON file (same seeds) instead of a new table. Every file holds 15
images per class out of training (data.val_per_class); `--select` pre-trains each point of a method's GRID and
scores it by the linear probe on those validation images (benchmarks/results/selfsup_digits_selection.{md,json};
the extended ReSSL's alone: `--select --methods ressl_extended --out benchmarks/results/selfsup_digits_extended`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from budget import check_same_budget, mean_std, publish_selection

from orchestrator import spec as spec_mod
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
FILES = {
    "ressl": EXPERIMENTS / "ressl" / "digits.yaml",
    "ressl_extended": EXPERIMENTS / "ressl" / "digits_extended.yaml",
    "wcl": EXPERIMENTS / "wcl" / "digits.yaml",
    "lewel": EXPERIMENTS / "lewel" / "digits.yaml",
}
PROBE = REPO / "experiments" / "linear_probe" / "digits.yaml"
SAME_BUDGET = ("optim.steps", "optim.batch_size", "data.dataset", "data.image_size", "config.arch")
ONE_PROCESS = ["resources.workers=1", "eval.every=null"]
# chosen on the validation split: ReSSL's teacher momentum, WCL's learning rate, LEWEL's EMAN target, the extended
# ReSSL's InfoNCE warm-up and predictor width (neither given by its paper)
GRID = {
    "ressl": {"config.momentum": [0.9, 0.99]},
    "ressl_extended": {"config.infonce_warmup_steps": [100, 200, 400], "config.predictor_hidden": [512, 4096]},
    "wcl": {"optim.lr": [0.05, 0.1]},
    "lewel": {"config.eman": [False, True]},
}


def pretrain(method: str, seed: int, root: Path, extra: list[str] = ()) -> tuple[Path, float]:
    """The method's digits file, seeded; returns its final checkpoint and the seconds it took."""
    spec = spec_mod.load(FILES[method], [f"seed={seed}", *ONE_PROCESS, *extra])
    started = time.perf_counter()
    train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    return root / f"checkpoint_{spec.optim.steps:09d}", time.perf_counter() - started


def probe(init_from: str, seed: int, extra: list[str] = ()) -> dict[str, float]:
    spec = spec_mod.load(PROBE, [f"seed={seed}", f'config.init_from="{init_from}"', *ONE_PROCESS,
                                 "checkpoint.every=1000000", *extra])
    metrics = train_in_process(spec, torch.device("cpu"))
    return {"linear": metrics["eval/acc"], "knn": metrics["eval/knn_acc"], "loss": metrics["eval/loss"]}


def pretrain_and_probe(method: str, seed: int, extra: list[str] = ()) -> dict[str, float]:
    """Pre-train with `extra` overrides, then probe; "data.eval_on=val" in `extra` goes to the probe only (the
    pre-training's own evaluation is its online classifier). "acc" is the linear probe's accuracy."""
    probe_extra = [o for o in extra if o.startswith("data.eval_on")]
    with tempfile.TemporaryDirectory() as root:
        checkpoint, seconds = pretrain(method, seed, Path(root), [o for o in extra if o not in probe_extra])
        result = {**probe(str(checkpoint), seed, probe_extra), "seconds": seconds}
    return result | {"acc": result["linear"]}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| encoder | linear probe (mean ± std, per seed) | kNN k=20 (mean ± std, per seed) | pre-training s |",
             "|---|---|---|---|"]
    for name, runs in results.items():
        seconds = statistics.mean(r.get("seconds", 0.0) for r in runs)
        lines.append(f"| {name} | {mean_std([r['linear'] for r in runs])} | {mean_std([r['knn'] for r in runs])} | "
                     f"{seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--add", action="store_true", help="add the methods' rows to the existing results")
    parser.add_argument("--select", action="store_true", help="score GRID on the validation split instead")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "selfsup_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget({**FILES, "probe": PROBE}, ("data.val_per_class",))
    check_same_budget(FILES, SAME_BUDGET)
    if args.select:
        grids = {m: GRID[m] for m in args.methods if m in GRID}
        publish_selection(args.out, grids, args.select_seeds, pretrain_and_probe)
        return

    results: dict[str, list[dict[str, float]]] = {"random init": []}
    if args.add:
        saved = json.loads(Path(f"{args.out}.json").read_text())
        if saved["seeds"] != args.seeds:
            raise SystemExit(f"--add: the saved results are for seeds {saved['seeds']}, not {args.seeds}")
        results = saved["results"]
    results.update({m: [] for m in args.methods})
    for seed in args.seeds:
        if not args.add:
            results["random init"].append(probe("", seed))
        for method in args.methods:
            results[method].append(pretrain_and_probe(method, seed))
            print(f"seed {seed} {method}: {results[method][-1]}", flush=True)
    text = table(results)
    print(text)
    Path(f"{args.out}.md").write_text(text + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
