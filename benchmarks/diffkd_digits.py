"""DiffKD on digits: a small student alone, with plain KD and with DiffKD, distilled from the same teacher, several
seeds. Measures, does not assert.

    .venv/bin/python benchmarks/diffkd_digits.py [--seeds 0 1 2] [--threads 1]

Per seed, the teacher is trained once with that seed (experiments/supervised/digits_teacher.yaml, its final
checkpoint kept in a temporary directory); then, with the same seed, the student alone
(experiments/supervised/digits_student.yaml), plain KD (experiments/diffkd/digits.yaml with config.diffusion=false)
and DiffKD (experiments/diffkd/digits.yaml), both with `teacher_from` set to that checkpoint. Every run goes through
the orchestrator's step loop in this process (no Ray, one rank). Reports the test accuracy (mean ± std and per seed)
and the seconds of each run. Writes benchmarks/results/diffkd_digits.{md,json}.

--threads sets torch's intra-op threads (default 1): on the shared 2-core machine this was written on, two threads
made the backward of the diffusion modules' small convolutions (4x4 maps) about 30 times slower than one.
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
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "experiments" / "supervised" / "digits_teacher.yaml"
STUDENT = REPO / "experiments" / "supervised" / "digits_student.yaml"
DIFFKD = REPO / "experiments" / "diffkd" / "digits.yaml"
ONE_PROCESS = ["resources.workers=1", "eval.every=null"]
NO_CHECKPOINTS = ["checkpoint.every=1000000"]
ROWS = ("teacher", "student alone", "plain KD", "DiffKD")


def run(path: Path, overrides: list[str], checkpoint_root: Path | None = None) -> dict[str, float]:
    """One experiment file in this process; its final test accuracy and the seconds it took."""
    spec = spec_mod.load(path, [*overrides, *ONE_PROCESS])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=checkpoint_root)
    return {"acc": metrics["eval/acc"], "seconds": time.perf_counter() - started}


def one_seed(seed: int) -> dict[str, dict[str, float]]:
    """The four rows of one seed, the teacher trained with that seed."""
    with tempfile.TemporaryDirectory() as root:
        results = {"teacher": run(TEACHER, [f"seed={seed}"], Path(root))}
        checkpoint = Path(root) / f"checkpoint_{spec_mod.load(TEACHER).optim.steps:09d}"
        distill = [f"seed={seed}", f'config.teacher_from="{checkpoint}"', *NO_CHECKPOINTS]
        results["student alone"] = run(STUDENT, [f"seed={seed}", *NO_CHECKPOINTS])
        results["plain KD"] = run(DIFFKD, [*distill, "config.diffusion=false"])
        results["DiffKD"] = run(DIFFKD, distill)
    return results


def check_same_budget() -> None:
    """The student rows differ only in the method: same data, optim block and student architecture."""
    alone, distill = spec_mod.load(STUDENT), spec_mod.load(DIFFKD)
    if alone.data != distill.data or alone.optim != distill.optim or \
            alone.method_config().arch != distill.method_config().arch:
        raise SystemExit(f"not the same budget: {STUDENT.name} and {DIFFKD.name} differ in data, optim or arch")
    if spec_mod.load(TEACHER).method_config().arch != distill.method_config().teacher_arch:
        raise SystemExit(f"{DIFFKD.name}: teacher_arch is not the arch of {TEACHER.name}")


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| model | test acc (mean ± std, per seed) | s per run |", "|---|---|---|"]
    for name, runs in results.items():
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {mean_std([r['acc'] for r in runs], 4)} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diffkd_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_same_budget()

    results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    for seed in args.seeds:
        for row, result in one_seed(seed).items():
            results[row].append(result)
            print(f"seed {seed} {row}: {result}", flush=True)
    text = table(results)
    print(text)
    Path(f"{args.out}.md").write_text(text + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"seeds": args.seeds, "threads": args.threads,
                                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
