"""Architecture searchers on a tabular benchmark (NAS-Bench-Macro by default; any space of the `nas_bench` method
with its table): the best accuracy found against the number of architectures evaluated, for random search,
regularised evolution and TPE (20 seeds each), and GENIUS when an endpoint is configured. Measures, does not assert.

    .venv/bin/python benchmarks/nas_search.py [--seeds 20] [--evaluations 100] [--space nas_bench_macro --table PATH]
    .venv/bin/python benchmarks/nas_search.py --space channel_bench_res --table data/Results_ResNet.json
    GENIUS_BASE_URL=http://localhost:11434/v1 GENIUS_MODEL=llama3.1 .venv/bin/python benchmarks/nas_search.py

Each searcher is the same `ray.tune.search.Searcher` object a sweep uses (orchestrator/nas_search.py,
orchestrator/genius.py), driven here without Tune: suggest, look the architecture up with the `nas_bench` method's
lookup, report; MFLOPs and params come from the table where it lists them. The table is checked against the space
first (trainers/nas_bench.py `check`). Accuracy is the table's search accuracy (%): NAS-Bench-Macro's and
Channel-Bench's mean test accuracy over 3 seeds, NAS-Bench-201's validation accuracy. Writes
benchmarks/results/nas_search.{md,json} for the default space, nas_search_<space>.{md,json} for another, and logs
one MLflow run (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.nas_search import ArchCounts, searcher_class
from trainers._common.contract import ConfigError
from trainers.nas import arch_value, get_space, parse_arch_value
from trainers.nas_bench import TABLE_FORMATS, Config, check, load_table, lookup

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = "nas_bench_macro"
KEY, METRIC = "config.arch", "eval/acc"
CHECKPOINTS = (10, 25, 50, 100)
BASELINES = ("random", "evolution", "tpe")


def search(searcher: Any, table: Any, evaluations: int) -> list[dict[str, float]]:
    """Suggest, look up, report, one architecture at a time; the trajectory of (accuracy %, rank)."""
    trajectory = []
    for number in range(evaluations):
        suggestion = searcher.suggest(f"t{number}")
        if not isinstance(suggestion, dict):
            break
        _, code = parse_arch_value(suggestion[KEY])
        metrics = lookup(table, code)
        searcher.on_trial_complete(f"t{number}", {METRIC: metrics["eval/acc"]})
        trajectory.append({"acc": 100 * metrics["eval/acc"], "rank": metrics["eval/rank"]})
    return trajectory


def best_at(trajectory: list[dict[str, float]], n: int) -> dict[str, float] | None:
    if len(trajectory) < n:
        return None
    best = max(trajectory[:n], key=lambda t: t["acc"])
    return {"acc": best["acc"], "rank": best["rank"]}


def run_searcher(name: str, seeds: int, evaluations: int, table: Any, table_path: str,
                 **kwargs: Any) -> dict[str, Any]:
    space, cls = table.space, searcher_class(name)
    runs, started = [], time.perf_counter()
    for seed in range(seeds):
        counts = ArchCounts(space, table_path)
        searcher = cls(space, KEY, METRIC, "max", seed=seed, counts=counts, **kwargs) if name != "genius" else cls(
            space, KEY, METRIC, "max", counts=counts, **kwargs)
        runs.append(search(searcher, table, evaluations))
    summary = {}
    for n in CHECKPOINTS:
        found = [b for b in (best_at(t, n) for t in runs) if b is not None]
        if found:
            accs = [b["acc"] for b in found]
            summary[n] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "mean_rank": statistics.mean(b["rank"] for b in found), "runs": len(found)}
    return {"summary": summary, "seconds": time.perf_counter() - started, "trajectories": runs}


def markdown(results: dict[str, dict[str, Any]], optimum: float, note: str, table: Any) -> str:
    head = " | ".join(f"best after {n}" for n in CHECKPOINTS)
    lines = [f"| searcher | runs | {head} | seconds |", "|---|---|" + "---|" * len(CHECKPOINTS) + "---|"]
    for name, result in results.items():
        cells = []
        for n in CHECKPOINTS:
            s = result["summary"].get(n)
            cells.append(f"{s['mean']:.2f} ± {s['std']:.2f} (rank {s['mean_rank']:.0f})" if s else "")
        runs = max((s["runs"] for s in result["summary"].values()), default=0)
        lines.append(f"| {name} | {runs} | {' | '.join(cells)} | {result['seconds']:.1f} |")
    lines += ["", f"{table.space.name}: the search accuracy (%) of the best architecture found, mean ± std over runs, "
              f"and its mean rank among the {len(table.entries)} entries. Global optimum {optimum:.2f}%.", "", note]
    return "\n".join(lines)


def genius_arguments(evaluations: int) -> tuple[dict[str, Any] | None, str]:
    base_url, model = os.environ.get("GENIUS_BASE_URL"), os.environ.get("GENIUS_MODEL")
    if not base_url or not model:
        return None, ("GENIUS: not run. No endpoint is configured; set GENIUS_BASE_URL (an OpenAI-compatible "
                      "/v1 URL) and GENIUS_MODEL, and the key in $OPENAI_API_KEY if the endpoint needs one.")
    log_dir = tempfile.mkdtemp(prefix="genius-")
    return ({"model": model, "base_url": base_url, "log_dir": log_dir},
            f"GENIUS: model {model} at {base_url}, {evaluations} evaluations per run; chats in {log_dir}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--genius-runs", type=int, default=3, help="GENIUS runs (temperature 0: repeats differ "
                        "only as much as the endpoint is non-deterministic)")
    parser.add_argument("--genius-evaluations", type=int, default=25)
    parser.add_argument("--space", default=DEFAULT_SPACE, choices=sorted(TABLE_FORMATS),
                        help="the search space; --table is its benchmark's JSON file")
    parser.add_argument("--table", default=str(REPO.parent / "shared" / "data" / "nas-bench-macro_cifar10.json"))
    parser.add_argument("--out", default=None, help="results path without suffix (default: benchmarks/results/"
                        "nas_search, with _<space> for another space)")
    args = parser.parse_args()
    args.out = args.out or str(REPO / "benchmarks" / "results" /
                               ("nas_search" if args.space == DEFAULT_SPACE else f"nas_search_{args.space}"))

    table = checked_table(args.space, args.table)
    optimum = table.sorted_accuracies[-1]  # the best search accuracy in the table (%)
    results = {}
    for name in BASELINES:
        results[name] = run_searcher(name, args.seeds, args.evaluations, table, args.table)
        print(name, json.dumps(results[name]["summary"]), flush=True)
    genius, note = genius_arguments(args.genius_evaluations)
    if genius is not None:
        results["genius"] = run_searcher("genius", args.genius_runs, args.genius_evaluations, table, args.table,
                                         **genius)
    print(note)
    text = markdown(results, optimum, note, table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    summaries = {name: {"summary": r["summary"], "seconds": r["seconds"]} for name, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "optimum": optimum, "results": summaries},
                                                   indent=2))
    log_to_mlflow(results, text, args)
    print(text)


def checked_table(space_name: str, path: str) -> Any:
    """The table of `space_name` at `path`, checked as before a sweep (key form, size, sampled counts); SystemExit
    with the check's message otherwise."""
    space = get_space(space_name)
    try:
        check(Config(arch=arch_value(space, space.encode([0] * len(space.choices))), table=path))
    except ConfigError as err:
        raise SystemExit(f"error: --table: expected {err.expected}; found {err.found}") from None
    return load_table(path, space_name)


def log_to_mlflow(results: dict[str, dict[str, Any]], text: str, args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="nas_search"):
        mlflow.log_params({"seeds": args.seeds, "evaluations": args.evaluations, "benchmark": args.space})
        for name, result in results.items():
            for n, s in result["summary"].items():
                mlflow.log_metric(f"{name}/best_acc_mean", s["mean"], step=n)
                mlflow.log_metric(f"{name}/best_acc_std", s["std"], step=n)
        mlflow.log_text(text, "nas_search.md")


if __name__ == "__main__":
    main()
