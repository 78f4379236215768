"""DiffKD on digits: a small student alone, with plain KD and with DiffKD, distilled from the same teacher, several
seeds, at a student budget where plain KD helps (STUDENT and DIFFKD below). Measures, does not assert.

    .venv/bin/python benchmarks/diffkd_digits.py [--seeds 0 1 2] [--threads 1] [--eval-on test|val]

Per seed, the teacher is trained once with that seed (experiments/supervised/digits_teacher.yaml, its final
checkpoint kept in a temporary directory); then, with the same seed, the student alone (STUDENT), plain KD (DIFFKD
with config.diffusion=false and kd_weight 1) and DiffKD (DIFFKD), both with `teacher_from` set to that checkpoint.
Every run holds out the same validation images (data.val_per_class, drawn from the seed), so the teacher and the
students train on the pool the budget was chosen on; --eval-on val scores them on those images (for choices), the
default scores the test set (reported once). Every run goes through the orchestrator's step loop in this process (no
Ray, one rank). Writes benchmarks/results/diffkd_digits.{md,json} (and an MLflow run), or --out.

--threads sets torch's intra-op threads (default 1): on the shared 2-core machine this was written on, two threads
made the backward of the diffusion modules' small convolutions (4x4 maps) about 30 times slower than one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from budget import mean_std, publish, seed_metrics, train_file

from orchestrator import spec as spec_mod

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "experiments" / "supervised" / "digits_teacher.yaml"
STUDENT = REPO / "experiments" / "supervised" / "digits_student_100_steps.yaml"
DIFFKD = REPO / "experiments" / "diffkd" / "digits_100_steps.yaml"
VAL_PER_CLASS = 30  # held out of every training pool, as in STUDENT and DIFFKD (about 135 train images per digit)
PLAIN_KD = ["config.diffusion=false", "config.kd_weight=1.0"]  # Hinton KD at its usual weight (DiffKD's: 0.3)
ROWS = ("teacher", "student alone", "plain KD", "DiffKD")


def run(path: Path, seed: int, overrides: list[str], checkpoint_root: Path | None = None) -> dict[str, float]:
    """One experiment file in this process; its final accuracy and the seconds it took."""
    metrics = train_file(path, seed, overrides, checkpoint_root)
    return {"acc": metrics["acc"], "seconds": metrics["seconds"]}


def one_seed(seed: int, data: list[str]) -> dict[str, dict[str, float]]:
    """The four rows of one seed, the teacher trained with that seed; `data`: the validation overrides."""
    with tempfile.TemporaryDirectory() as root:
        results = {"teacher": run(TEACHER, seed, data, Path(root))}
        checkpoint = Path(root) / f"checkpoint_{spec_mod.load(TEACHER).optim.steps:09d}"
        distill = [*data, f'config.teacher_from="{checkpoint}"']
        results["student alone"] = run(STUDENT, seed, data)
        results["plain KD"] = run(DIFFKD, seed, [*distill, *PLAIN_KD])
        results["DiffKD"] = run(DIFFKD, seed, distill)
    return results


def check_same_budget() -> None:
    """The student rows differ only in the method: same data, optim block and student architecture."""
    alone, distill = spec_mod.load(STUDENT), spec_mod.load(DIFFKD)
    if alone.data != distill.data or alone.optim != distill.optim or \
            alone.method_config().arch != distill.method_config().arch:
        raise SystemExit(f"not the same budget: {STUDENT.name} and {DIFFKD.name} differ in data, optim or arch")
    if spec_mod.load(TEACHER).method_config().arch != distill.method_config().teacher_arch:
        raise SystemExit(f"{DIFFKD.name}: teacher_arch is not the arch of {TEACHER.name}")


def table(results: dict[str, list[dict[str, float]]], eval_on: str) -> str:
    lines = [f"| model | {eval_on} acc (mean ± std, per seed) | s per run |", "|---|---|---|"]
    for name, runs in results.items():
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {mean_std([r['acc'] for r in runs], 4)} | {seconds:.0f} |")
    lines += ["", (f"Student: {STUDENT.name} / {DIFFKD.name}; {VAL_PER_CLASS} images per class held out of every "
                   f"training pool. Seconds: one thread on a shared, loaded 2-core machine.")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--eval-on", choices=("test", "val"), default="test")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diffkd_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget()
    data = [f"data.val_per_class={VAL_PER_CLASS}", f"data.eval_on={args.eval_on}"]
    results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    for seed in args.seeds:
        for row, result in one_seed(seed, data).items():
            results[row].append(result)
            print(f"seed {seed} {row}: {result}", flush=True)
    markdown = table(results, args.eval_on)
    print(markdown)
    publish(args.out, markdown, args.seeds, results,
            {"seeds": args.seeds, "threads": args.threads, "eval_on": args.eval_on, "val_per_class": VAL_PER_CLASS,
             "student": STUDENT.name, "distill": DIFFKD.name}, seed_metrics(results, "acc"))


if __name__ == "__main__":
    main()
