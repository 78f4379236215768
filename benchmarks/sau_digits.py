"""SAU on digits-LT (imbalance factor 100) with noisy generated labels, against cross-entropy on the real images and on
the same real + generated pool, with SAU's branches ablated; several seeds, the same optimizer budget for every row.
Measures, does not assert.

    .venv/bin/python benchmarks/sau_digits.py [--seeds 0 1 2] [--threads 1] [--generator CHECKPOINT]

The chain the shipped files describe, run in this process (no Ray, one rank):
1. experiments/ddpm/digits.yaml trains the class-conditional DDPM on the balanced digits (once, seed 0);
2. experiments/generate/digits_low_guidance.yaml generates 140 images per digit from its last checkpoint at
   classifier-free guidance 0.5 (the generate method, with a context that writes to a temporary run directory), so
   that a good share of them do not show their requested digit: label noise for SAU's correction to remove;
3. per seed, each row trains on digits-LT; the rows that read `data.generated` get the folder of step 2.
The generated labels' noise is measured: a classifier trained on the balanced digits
(experiments/supervised/digits_teacher.yaml, DiffKD's teacher) labels the generated images as a training run sees
them; the share it puts outside their requested class is reported with the classifier's own test accuracy.
--generator CHECKPOINT skips step 1 and generates from that ddpm checkpoint instead (its training time is then not
measured). `--rows R ... --merge` re-runs only those rows and keeps the other rows of the published results, when
these were measured on the same seeds and on the same generated images (the judge's per-digit verdicts must match).
No choice here is made on the test set: the rows are the official SAU (pos_neg), its other official strategy (drop)
and ablations, none tuned. Writes benchmarks/results/sau_digits.{md,json} (and an MLflow run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from budget import check_same_budget, mean_std, publish, seed_metrics, train_file
from torch import nn

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
SUPERVISED = EXPERIMENTS / "supervised"
SAU = EXPERIMENTS / "sau" / "digits_lt100.yaml"
ROWS = {  # row -> (experiment file, overrides); names without parentheses or commas (MLflow metric names)
    "cross-entropy on real only": (SUPERVISED / "digits_lt100_ce.yaml", []),
    "cross-entropy on real and generated": (SUPERVISED / "digits_lt100_ce_generated.yaml", []),
    "SAU: official pos_neg": (SAU, []),
    "SAU: strategy drop": (SAU, ["config.strategy=drop"]),
    "SAU without L_SCL: lambda_scl 0": (SAU, ["config.lambda_scl=0.0"]),
    "SAU without L_mix: fc by plain cross-entropy": (SAU, ["config.classifier_loss=ce"]),
    "SAU without label correction": (SAU, ["config.label_correction=false"]),
}
SAME_BUDGET = ("seed", "optim", "data.dataset", "data.image_size", "data.imbalance_factor", "data.val_per_class")
ONE_PROCESS = ["resources.workers=1", "eval.every=null", "checkpoint.every=1000000"]
GROUPS = ("many", "medium", "few")


def train_generator(root: Path) -> tuple[Path, float]:
    spec = spec_mod.load(EXPERIMENTS / "ddpm" / "digits.yaml", ["seed=0", "resources.workers=1", "eval.every=null"])
    started = time.perf_counter()
    train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    return root / f"checkpoint_{spec.optim.steps:09d}", time.perf_counter() - started


def generate_images(generate_file: Path, checkpoint: Path, root: Path) -> tuple[Path, float]:
    spec = spec_mod.load(generate_file, [f'config.pipeline="{checkpoint}"'])
    started = time.perf_counter()
    generate.run(spec.method_config(), MethodContext(RunDir(str(root), spec.name), logger=None))
    return root / spec.name / "generated", time.perf_counter() - started


def train_judge(root: Path) -> tuple[nn.Module, float]:
    """A classifier trained on the balanced digits (DiffKD's teacher file, seed 0) and its test accuracy."""
    spec = spec_mod.load(SUPERVISED / "digits_teacher.yaml", ["seed=0", *ONE_PROCESS])
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=root)
    model = build_backbone(spec.method_config().arch, 1, 10)
    model.load_state_dict(torch.load(root / f"checkpoint_{spec.optim.steps:09d}" / "model.pt", weights_only=True))
    return model.eval(), metrics["eval/acc"]


def off_class(judge: nn.Module, folder: Path) -> dict[str, float]:
    """The share of generated images that the judge puts outside their requested class, overall and per class."""
    spec = spec_mod.load(SUPERVISED / "digits_teacher.yaml")
    source = load_source(spec.data)
    made = generated.load(folder, source, spec.data.image_size)
    evaluate = transforms.evaluation(source, spec.data.image_size)
    images = torch.stack([evaluate(made.images[i]) for i in range(len(made.labels))])  # (N, 1, 16, 16)
    labels = torch.as_tensor(made.labels)  # (N,)
    with torch.no_grad():
        wrong = judge(images).argmax(1) != labels  # (N,)
    per_class = [wrong[labels == c].float().mean().item() for c in range(10)]
    return {"off_class": wrong.float().mean().item(), "off_class_per_digit": per_class, "images": len(labels)}


def run_row(file: Path, overrides: list[str], seed: int, folder: Path) -> dict[str, float]:
    if spec_mod.load(file).data.generated:
        overrides = [*overrides, f'data.generated="{folder}"']
    metrics = train_file(file, seed, overrides)
    row = {"acc": metrics["acc"], "seconds": metrics["seconds"]}
    row.update({g: metrics[f"{g}_acc"] for g in GROUPS if f"{g}_acc" in metrics})
    if "train/noisy_fraction" in metrics:
        row["noisy_fraction_last_step"] = metrics["train/noisy_fraction"]
    return row


def table(results: dict[str, list[dict[str, float]]], chain: dict) -> str:
    lines = ["| method | test acc (mean ± std, per seed) | many | medium | few | s per run |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        groups = " | ".join(mean_std([r[g] for r in runs], per_seed=False) if g in runs[0] else "-" for g in GROUPS)
        lines.append(f"| {name} | {mean_std([r['acc'] for r in runs])} | {groups} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    seconds = chain["ddpm_seconds"]
    trained = "from a given checkpoint" if seconds is None else f"trained in {seconds:.0f} s"
    per_digit = ", ".join(f"{p:.2f}" for p in chain["off_class_per_digit"])
    lines += ["", (f"Generator: DDPM {trained}; {chain['images']} images generated ({chain['generate_file']}) in "
                   f"{chain['generate_seconds']:.0f} s. Off-class: {chain['off_class']:.3f} of them (per digit 0-9: "
                   f"{per_digit}), judged by a classifier trained on the balanced digits (test accuracy "
                   f"{chain['judge_test_acc']:.3f}). Seconds: one thread on a shared, loaded 2-core machine.")]
    return "\n".join(lines)


def merged(published: Path, results: dict[str, list[dict[str, float]]], chain: dict, seeds: list[int]
           ) -> dict[str, list[dict[str, float]]]:
    """This run's rows with the published rows of `ROWS` it did not run, in `ROWS` order; refused unless the
    published results have the same seeds and the same generated images' off-class verdicts."""
    old = json.loads(published.read_text())
    if old["seeds"] != seeds:
        raise SystemExit(f"--merge: {published} has seeds {old['seeds']}, this run {seeds}")
    verdicts = ("off_class_per_digit", "images")
    if any(old["results"]["generator"][key] != chain[key] for key in verdicts):
        raise SystemExit(f"--merge: {published} was measured on other generated images (off-class per digit "
                         f"{old['results']['generator']['off_class_per_digit']}, here {chain['off_class_per_digit']})")
    rows = {**old["results"]["rows"], **results}
    return {name: rows[name] for name in ROWS if name in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--generator", help="a ddpm checkpoint directory to generate from (skips training one)")
    parser.add_argument("--generate-file", default=str(EXPERIMENTS / "generate" / "digits_low_guidance.yaml"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--merge", action="store_true", help="keep the published results of the rows not run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sau_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget({name: ROWS[name][0] for name in args.rows}, SAME_BUDGET)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.generator:
            checkpoint, ddpm_seconds = Path(args.generator), None
        else:
            checkpoint, ddpm_seconds = train_generator(root / "ddpm")
        folder, generate_seconds = generate_images(Path(args.generate_file), checkpoint, root)
        judge, judge_acc = train_judge(root / "judge")
        chain = {"ddpm_seconds": ddpm_seconds, "generate_seconds": generate_seconds, "judge_test_acc": judge_acc,
                 "generate_file": Path(args.generate_file).name, **off_class(judge, folder)}
        print(f"generator: {chain}", flush=True)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in args.rows}
        for seed in args.seeds:
            for name in args.rows:
                results[name].append(run_row(*ROWS[name], seed, folder))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    if args.merge:
        results = merged(Path(args.out).with_suffix(".json"), results, chain, args.seeds)
    markdown = table(results, chain)
    print(markdown)
    publish(args.out, markdown, args.seeds, {"rows": results, "generator": chain},
            {"seeds": args.seeds, "threads": args.threads, "generate_file": chain["generate_file"]},
            {**seed_metrics(results, "acc"), "off_class": chain["off_class"]})


if __name__ == "__main__":
    main()
