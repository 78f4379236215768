"""Architecture searchers on NAS-Bench-Macro: the best accuracy found against the number of architectures
evaluated, for random search, regularised evolution and TPE (20 seeds each), and GENIUS when an endpoint is
configured. Measures, does not assert.

    .venv/bin/python benchmarks/nas_search.py [--seeds 20] [--evaluations 100] [--table PATH]
    GENIUS_BASE_URL=http://localhost:11434/v1 GENIUS_MODEL=llama3.1 .venv/bin/python benchmarks/nas_search.py

Each searcher is the same `ray.tune.search.Searcher` object a sweep uses (orchestrator/nas_search.py,
orchestrator/genius.py), driven here without Tune: suggest, look the architecture up with the `nas_bench` method's
lookup, report. Accuracy is the table's mean test accuracy over 3 seeds (%). Writes
benchmarks/results/nas_search.{md,json} and logs one MLflow run (experiment `benchmarks`).
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

from orchestrator.nas_search import searcher_class
from trainers.nas import get_space, parse_arch_value
from trainers.nas_bench import load_table, lookup

REPO = Path(__file__).resolve().parents[1]
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


def run_searcher(name: str, seeds: int, evaluations: int, table: Any, **kwargs: Any) -> dict[str, Any]:
    space, cls = get_space("nas_bench_macro"), searcher_class(name)
    runs, started = [], time.perf_counter()
    for seed in range(seeds):
        searcher = cls(space, KEY, METRIC, "max", seed=seed, **kwargs) if name != "genius" else cls(
            space, KEY, METRIC, "max", **kwargs)
        runs.append(search(searcher, table, evaluations))
    summary = {}
    for n in CHECKPOINTS:
        found = [b for b in (best_at(t, n) for t in runs) if b is not None]
        if found:
            accs = [b["acc"] for b in found]
            summary[n] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "mean_rank": statistics.mean(b["rank"] for b in found), "runs": len(found)}
    return {"summary": summary, "seconds": time.perf_counter() - started, "trajectories": runs}


def markdown(results: dict[str, dict[str, Any]], optimum: float, note: str) -> str:
    head = " | ".join(f"best after {n}" for n in CHECKPOINTS)
    lines = [f"| searcher | runs | {head} | seconds |", "|---|---|" + "---|" * len(CHECKPOINTS) + "---|"]
    for name, result in results.items():
        cells = []
        for n in CHECKPOINTS:
            s = result["summary"].get(n)
            cells.append(f"{s['mean']:.2f} ± {s['std']:.2f} (rank {s['mean_rank']:.0f})" if s else "")
        runs = max((s["runs"] for s in result["summary"].values()), default=0)
        lines.append(f"| {name} | {runs} | {' | '.join(cells)} | {result['seconds']:.1f} |")
    lines += ["", f"Mean test accuracy (%) of the best architecture found, mean ± std over runs, and its mean rank "
              f"among the 6561 codes. Global optimum {optimum:.2f}%.", "", note]
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
    parser.add_argument("--table", default=str(REPO.parent / "shared" / "data" / "nas-bench-macro_cifar10.json"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nas_search"))
    args = parser.parse_args()

    table = load_table(args.table, "nas_bench_macro")
    optimum = 100 * lookup(table, "22212220")["eval/acc"]
    results = {}
    for name in BASELINES:
        results[name] = run_searcher(name, args.seeds, args.evaluations, table)
        print(name, json.dumps(results[name]["summary"]), flush=True)
    genius, note = genius_arguments(args.genius_evaluations)
    if genius is not None:
        results["genius"] = run_searcher("genius", args.genius_runs, args.genius_evaluations, table, **genius)
    print(note)
    text = markdown(results, optimum, note)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    summaries = {name: {"summary": r["summary"], "seconds": r["seconds"]} for name, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "optimum": optimum, "results": summaries},
                                                   indent=2))
    log_to_mlflow(results, text, args)
    print(text)


def log_to_mlflow(results: dict[str, dict[str, Any]], text: str, args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="nas_search"):
        mlflow.log_params({"seeds": args.seeds, "evaluations": args.evaluations, "benchmark": "nas_bench_macro"})
        for name, result in results.items():
            for n, s in result["summary"].items():
                mlflow.log_metric(f"{name}/best_acc_mean", s["mean"], step=n)
                mlflow.log_metric(f"{name}/best_acc_std", s["std"], step=n)
        mlflow.log_text(text, "nas_search.md")


if __name__ == "__main__":
    main()
