"""VAPO's ablation at CPU scale: the supervised warm start alone, PPO, GRPO, VAPO, and VAPO minus each of its
components, on the generated arithmetic chains at an equal rollout budget, several seeds. Measures, does not assert.

    .venv/bin/python benchmarks/vapo_ablation.py [--seeds 0 1 2] [--rows VAPO GRPO ...]

Per seed, experiments/rl/arithmetic_sft.yaml trains the warm start; every RL row starts from that checkpoint and
runs its shipped file (arithmetic_{ppo,grpo,vapo}.yaml; the ablations are arithmetic_vapo.yaml with one `--set`)
through the orchestrator's step loop in this process (no Ray, one rank). Every RL row sees the same number of
sampled responses: 300 steps x 512 per rollout / 4 updates per rollout (PPO and "- group sampling" draw their 512
from 512 prompts x 1 instead of 64 x 8). Reported: greedy accuracy and avg@4 (four samples at temperature 1) on
the 500 held-out problems, and the last logged diagnostics. Writes benchmarks/results/vapo_ablation.{md,json} and
logs one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from budget import check_same_budget, mean_std, publish

from orchestrator import spec as spec_mod
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
RL = REPO / "experiments" / "rl"
ROWS: dict[str, tuple[str, list[str]]] = {
    "SFT only": ("sft", []),
    "PPO": ("arithmetic_ppo.yaml", []),
    "GRPO": ("arithmetic_grpo.yaml", []),
    "VAPO": ("arithmetic_vapo.yaml", []),
    "- value pretraining": ("arithmetic_vapo.yaml", ["config.value_pretrain_steps=0"]),
    "- decoupled GAE": ("arithmetic_vapo.yaml", ["config.decoupled_gae=false"]),
    "- length-adaptive GAE": ("arithmetic_vapo.yaml", ["config.length_adaptive=false"]),
    "- clip-higher": ("arithmetic_vapo.yaml", ["config.eps_high=0.2"]),
    "- token-level loss": ("arithmetic_vapo.yaml", ["config.token_level=false"]),
    "- positive-example LM loss": ("arithmetic_vapo.yaml", ["config.nll_coef=0.0"]),
    "- group sampling": ("arithmetic_vapo.yaml", ["config.group_size=1", "optim.batch_size=512"]),
}
DIAGNOSTICS = ("train/accuracy", "train/entropy", "train/value_explained_variance", "train/clip_high_frac",
               "train/credit_assignment")
SAME_BUDGET = ("optim.steps", "optim.lr", "data", "config.minibatches", "config.max_new_tokens")


def quiet(spec_file: Path, overrides: list[str]) -> spec_mod.ExperimentSpec:
    return spec_mod.load(spec_file, [*overrides, "eval.every=null", "checkpoint.every=1000000", "log_every=20"])


def warm_start(seed: int, root: Path) -> tuple[Path, dict[str, float]]:
    """The seed's SFT checkpoint directory and its evaluation."""
    spec = quiet(RL / "arithmetic_sft.yaml", [f"seed={seed}"])
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=root / f"sft{seed}")
    return max((root / f"sft{seed}").glob("checkpoint_*")), metrics


def run_row(row: str, seed: int, checkpoint: Path) -> dict[str, float]:
    file, overrides = ROWS[row]
    spec = quiet(RL / file, [f"seed={seed}", f"config.init_from={checkpoint}", *overrides])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"))
    return {**{k: metrics[k] for k in ("eval/accuracy", "eval/accuracy_avg4")},
            **{k: metrics.get(k, float("nan")) for k in DIAGNOSTICS}, "seconds": time.perf_counter() - started}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """One row per run: means ± std over seeds, and the paired change in avg@4 against the same seed's warm start
    (the seeds' warm starts differ more than the RL rows do)."""
    header = ("| run | greedy accuracy | avg@4 accuracy | avg@4 minus the seed's SFT | sampled train accuracy (last "
              "window) | value EV | clip-high fraction | seconds |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    sft = [r["eval/accuracy_avg4"] for r in results.get("SFT only", [])]
    for row, runs in results.items():
        if not runs:
            continue
        cells = [mean_std([r[k] for r in runs]) if k in runs[0] and runs[0][k] == runs[0][k] else "-"
                 for k in ("eval/accuracy", "eval/accuracy_avg4")]
        paired = [r["eval/accuracy_avg4"] - s for r, s in zip(runs, sft)]
        cells.append(mean_std(paired) if len(paired) == len(runs) and row != "SFT only" else "-")
        cells += [mean_std([r[k] for r in runs]) if k in runs[0] and runs[0][k] == runs[0][k] else "-"
                  for k in ("train/accuracy", "train/value_explained_variance", "train/clip_high_frac")]
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vapo_ablation"))
    parser.add_argument("--table-from", help="only print the table of an earlier run's JSON file")
    args = parser.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["results"]))
        return
    check_same_budget({f: RL / f for f in ("arithmetic_ppo.yaml", "arithmetic_grpo.yaml", "arithmetic_vapo.yaml")},
                      SAME_BUDGET)
    torch.set_num_threads(2)
    results: dict[str, list[dict[str, float]]] = {row: [] for row in args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            started = time.perf_counter()
            checkpoint, sft_metrics = warm_start(seed, Path(tmp))
            for row in args.rows:
                if ROWS[row][0] == "sft":
                    results[row].append({"eval/accuracy": sft_metrics["eval/accuracy"],
                                         "eval/accuracy_avg4": sft_metrics["eval/accuracy_avg4"],
                                         "seconds": time.perf_counter() - started})
                else:
                    results[row].append(run_row(row, seed, checkpoint))
                print(f"{row} seed {seed}: {json.dumps(results[row][-1])}", flush=True)
    markdown = table(results)
    publish(args.out, markdown, args.seeds, results,
            {"seeds": args.seeds, "task": "arithmetic chains, 2-5 single-digit operands"}, mean_metrics(results))
    print(markdown)


def mean_metrics(results: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Each row's mean greedy and avg@4 accuracy over the seeds."""
    return {f"{row.strip('- ').replace(' ', '_')}/{metric.split('/')[1]}_mean": statistics.mean(r[metric] for r in runs)
            for row, runs in results.items() for metric in ("eval/accuracy", "eval/accuracy_avg4")}


if __name__ == "__main__":
    main()
