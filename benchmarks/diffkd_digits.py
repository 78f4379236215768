"""DiffKD on digits: a small student alone, with plain KD and with DiffKD, distilled from the same teacher, several
seeds, at a student budget where plain KD helps (STUDENT and DIFFKD below). Measures, does not assert.

    .venv/bin/python benchmarks/diffkd_digits.py [--seeds 0 1 2] [--threads 1] [--eval-on test|val]
    .venv/bin/python benchmarks/diffkd_digits.py --select [--seeds 0 1 2]   # the choices, on the validation split

Per seed, the teacher is trained once with that seed (experiments/supervised/digits_teacher.yaml, its final
checkpoint kept in a temporary directory); then, with the same seed, the student alone (STUDENT), plain KD (DIFFKD
with config.diffusion=false and kd_weight 1) and DiffKD (DIFFKD), both with `teacher_from` set to that checkpoint.
Every run holds out the same validation images (data.val_per_class, drawn from the seed), so the teacher and the
students train on the pool the budget was chosen on; --eval-on val scores them on those images (for choices), the
default scores the test set (reported once). Every run goes through the orchestrator's step loop in this process (no
Ray, one rank). Writes benchmarks/results/diffkd_digits.{md,json} (and an MLflow run), or --out.

--select re-makes the recipe's choices on the validation split, the teacher trained once per seed: the student
budget (BUDGETS: the one where plain KD's mean gain over the student alone is largest against the seeds' spread,
gain / sqrt((std_alone^2 + std_KD^2) / 2)), then at that budget plain KD's tau and DiffKD's kd_weight (GRID, by
budget.select_on_validation). Writes benchmarks/results/diffkd_digits_{budget,selection}.{md,json} (and MLflow
runs); the recipes carry what it chose.

--threads sets torch's intra-op threads (default 1): on the shared 2-core machine this was written on, two threads
made the backward of the diffusion modules' small convolutions (4x4 maps) about 30 times slower than one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from budget import mean_std, publish, publish_selection, seed_metrics, train_file

from orchestrator import spec as spec_mod

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "experiments" / "supervised" / "digits_teacher.yaml"
STUDENT = REPO / "experiments" / "supervised" / "digits_student_100_steps.yaml"
DIFFKD = REPO / "experiments" / "diffkd" / "digits_100_steps.yaml"
VAL_PER_CLASS = 30  # held out of every training pool, as in STUDENT and DIFFKD (about 135 train images per digit)
PLAIN_KD = ["config.diffusion=false", "config.kd_weight=1.0"]  # Hinton KD at its usual weight (DiffKD's: 0.3)
ROWS = ("teacher", "student alone", "plain KD", "DiffKD")
BUDGETS = {"50 steps": ["optim.steps=50"], "100 steps": ["optim.steps=100"],
           "200 steps, 10 labeled a digit": ["optim.steps=200", "data.labeled_per_class=10"],
           "200 steps, 5 labeled a digit": ["optim.steps=200", "data.labeled_per_class=5"]}
GRID = {"plain KD": {"config.tau": [1.0, 4.0]}, "DiffKD": {"config.kd_weight": [1.0, 0.3, 0.1]}}


def run(path: Path, seed: int, overrides: list[str], checkpoint_root: Path | None = None) -> dict[str, float]:
    """One experiment file in this process; its final accuracy and loss, and the seconds it took."""
    metrics = train_file(path, seed, overrides, checkpoint_root)
    return {"acc": metrics["acc"], "loss": metrics["loss"], "seconds": metrics["seconds"]}


def train_teacher(seed: int, data: list[str], root: Path) -> tuple[dict[str, float], str]:
    """The seed's teacher, its final checkpoint kept under `root`: its row and the students' teacher_from override."""
    result = run(TEACHER, seed, data, root)
    checkpoint = root / f"checkpoint_{spec_mod.load(TEACHER).optim.steps:09d}"
    return result, f'config.teacher_from="{checkpoint}"'


def select(seeds: list[int], out: str) -> None:
    """The budget, then plain KD's tau and DiffKD's kd_weight at the chosen budget, all on the validation split."""
    val = [f"data.val_per_class={VAL_PER_CLASS}", "data.eval_on=val"]
    with tempfile.TemporaryDirectory() as root:
        held_out = [f"data.val_per_class={VAL_PER_CLASS}"]
        teacher = {seed: train_teacher(seed, held_out, Path(root) / str(seed))[1] for seed in seeds}
        budgets = {name: {"student alone": [run(STUDENT, seed, [*val, *extra])["acc"] for seed in seeds],
                          "plain KD": [run(DIFFKD, seed, [*val, *extra, teacher[seed], *PLAIN_KD])["acc"]
                                       for seed in seeds]} for name, extra in BUDGETS.items()}
        chosen = max(budgets, key=lambda name: kd_gain(budgets[name]))
        publish(f"{out}_budget", budget_table(budgets, chosen), seeds, budgets, {"seeds": seeds, "chosen": chosen},
                {"best_gain_over_spread": kd_gain(budgets[chosen])})
        files = {"plain KD": (DIFFKD, PLAIN_KD), "DiffKD": (DIFFKD, [])}
        publish_selection(out, GRID, seeds, lambda row, seed, extra: run(
            files[row][0], seed, [*val, *BUDGETS[chosen], teacher[seed], *files[row][1], *extra]))


def kd_gain(accs: dict[str, list[float]]) -> float:
    """Plain KD's mean gain over the student alone, in units of the seeds' pooled standard deviation."""
    spread = ((_std(accs["student alone"]) ** 2 + _std(accs["plain KD"]) ** 2) / 2) ** 0.5
    return (statistics.mean(accs["plain KD"]) - statistics.mean(accs["student alone"])) / max(spread, 1e-9)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def budget_table(budgets: dict[str, dict[str, list[float]]], chosen: str) -> str:
    lines = ["| student budget | student alone (val) | plain KD (val) | gain / spread |", "|---|---|---|---|"]
    for name, accs in budgets.items():
        label = f"**{name}**" if name == chosen else name
        lines.append(f"| {label} | {mean_std(accs['student alone'])} | {mean_std(accs['plain KD'])} | "
                     f"{kd_gain(accs):.2f} |")
    return "\n".join(lines)


def one_seed(seed: int, data: list[str]) -> dict[str, dict[str, float]]:
    """The four rows of one seed, the teacher trained with that seed; `data`: the validation overrides."""
    with tempfile.TemporaryDirectory() as root:
        results = {}
        results["teacher"], teacher_from = train_teacher(seed, data, Path(root))
        distill = [*data, teacher_from]
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
    parser.add_argument("--select", action="store_true", help="make the recipe's choices on the validation split")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diffkd_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget()
    if args.select:
        select(args.seeds, args.out)
        return
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
