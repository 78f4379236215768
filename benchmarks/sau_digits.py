"""SAU on digits-LT (imbalance factor 100) against cross-entropy, class re-weighting, and cross-entropy on the same
real + generated pool, several seeds, the same optimizer budget for every row. Measures, does not assert.

    .venv/bin/python benchmarks/sau_digits.py [--seeds 0 1 2]

The chain the shipped files describe, run in this process (no Ray, one rank):
1. experiments/ddpm/digits.yaml trains the class-conditional DDPM on the balanced digits (once, seed 0);
2. experiments/generate/digits.yaml generates 140 images per digit from its last checkpoint (the generate method,
   with a context that writes to a temporary run directory);
3. per seed, each row's file trains on digits-LT; the files that read `data.generated` get the folder of step 2.
The generator's class fidelity is measured too: a classifier trained on the balanced digits
(experiments/supervised/digits_teacher.yaml, DiffKD's teacher) labels the generated images as a training run sees
them; its agreement with the requested class is reported with the classifier's own test accuracy.
--generator CHECKPOINT skips step 1 and generates from that ddpm checkpoint instead (its training time is then not
measured). Writes benchmarks/results/sau_digits.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from budget import mean_std

from orchestrator import spec as spec_mod
from orchestrator.data import generated, transforms
from orchestrator.data.sources import load_source
from orchestrator.launch import train_in_process
from orchestrator.method_run import MethodContext
from orchestrator.storage import RunDir
from trainers import generate
from trainers._common.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
ROWS = {
    "cross-entropy": EXPERIMENTS / "supervised" / "digits_lt100_ce.yaml",
    "re-weighting (effective number)": EXPERIMENTS / "supervised" / "digits_lt100_reweight.yaml",
    "cross-entropy on real + generated": EXPERIMENTS / "supervised" / "digits_lt100_ce_generated.yaml",
    "SAU": EXPERIMENTS / "sau" / "digits_lt100.yaml",
}
ONE_PROCESS = ["resources.workers=1", "eval.every=null", "checkpoint.every=1000000"]
GROUPS = ("many", "medium", "few")


def train_generator(root: Path) -> tuple[Path, float]:
    spec = spec_mod.load(EXPERIMENTS / "ddpm" / "digits.yaml", ["seed=0", "resources.workers=1", "eval.every=null"])
    started = time.perf_counter()
    train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    return root / f"checkpoint_{spec.optim.steps:09d}", time.perf_counter() - started


def generate_images(checkpoint: Path, root: Path) -> tuple[Path, float]:
    spec = spec_mod.load(EXPERIMENTS / "generate" / "digits.yaml", [f'config.pipeline="{checkpoint}"'])
    started = time.perf_counter()
    generate.run(spec.method_config(), MethodContext(RunDir(str(root), spec.name), logger=None))
    return root / spec.name / "generated", time.perf_counter() - started


def fidelity(folder: Path, root: Path) -> dict[str, float]:
    """The share of generated images that a classifier trained on the balanced digits puts in their class."""
    spec = spec_mod.load(EXPERIMENTS / "supervised" / "digits_teacher.yaml", ["seed=0", *ONE_PROCESS])
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    model = build_backbone(spec.method_config().arch, 1, 10)
    model.load_state_dict(torch.load(root / f"checkpoint_{spec.optim.steps:09d}" / "model.pt", weights_only=True))
    source = load_source(spec.data)
    made = generated.load(folder, source, spec.data.image_size)
    evaluate = transforms.evaluation(source, spec.data.image_size)
    images = torch.stack([evaluate(made.images[i]) for i in range(len(made.labels))])
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1).numpy()
    return {"fidelity": float((predicted == made.labels).mean()), "judge_test_acc": metrics["eval/acc"],
            "images": float(len(made.labels))}


def run_row(file: Path, seed: int, folder: Path) -> dict[str, float]:
    overrides = [f"seed={seed}", *ONE_PROCESS]
    if spec_mod.load(file).data.generated:
        overrides.append(f'data.generated="{folder}"')
    spec = spec_mod.load(file, overrides)
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"))
    row = {"acc": metrics["eval/acc"], "seconds": time.perf_counter() - started}
    row.update({g: metrics[f"eval/{g}_acc"] for g in GROUPS if f"eval/{g}_acc" in metrics})
    return row


def check_same_budget() -> None:
    dumps = {name: spec_mod.load(file).model_dump() for name, file in ROWS.items()}
    for key in ("optim", "seed"):
        if len({json.dumps(d[key], sort_keys=True) for d in dumps.values()}) > 1:
            raise SystemExit(f"not the same budget: {key} differs: { {n: d[key] for n, d in dumps.items()} }")
    data = {json.dumps({k: v for k, v in d["data"].items() if k != "generated"}, sort_keys=True)
            for d in dumps.values()}
    if len(data) > 1:
        raise SystemExit(f"not the same data: {data}")


def table(results: dict[str, list[dict[str, float]]], chain: dict[str, float | None]) -> str:
    lines = ["| method | test acc (per seed) | many | medium | few | s per run |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        accs = ", ".join(f"{r['acc']:.3f}" for r in runs)
        groups = " | ".join(mean_std([r[g] for r in runs], per_seed=False) if g in runs[0] else "-" for g in GROUPS)
        lines.append(f"| {name} | {mean_std([r['acc'] for r in runs], per_seed=False)} ({accs}) | {groups} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    lines.append("")
    seconds = chain["ddpm_seconds"]
    trained = "from a given checkpoint" if seconds is None else f"trained in {seconds:.0f} s"
    lines.append(f"Generator: DDPM {trained}; {chain['images']:.0f} images generated in {chain['generate_seconds']:.0f} "
                 f"s; class fidelity {chain['fidelity']:.3f} (a classifier trained on the balanced digits, test "
                 f"accuracy {chain['judge_test_acc']:.3f}, labels the generated images).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generator", help="a ddpm checkpoint directory to generate from (skips training one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sau_digits"))
    args = parser.parse_args()
    check_same_budget()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.generator:
            checkpoint, ddpm_seconds = Path(args.generator), None
        else:
            checkpoint, ddpm_seconds = train_generator(root / "ddpm")
        folder, generate_seconds = generate_images(checkpoint, root)
        chain = {"ddpm_seconds": ddpm_seconds, "generate_seconds": generate_seconds, **fidelity(folder, root / "judge")}
        print(f"generator: {chain}", flush=True)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
        for seed in args.seeds:
            for name, file in ROWS.items():
                results[name].append(run_row(file, seed, folder))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    text = table(results, chain)
    print(text)
    Path(f"{args.out}.md").write_text(text + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"seeds": args.seeds, "chain": chain, "results": results},
                                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
