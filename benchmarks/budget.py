"""What the comparison benchmarks share: the guard they run first (the experiment files they compare must share
their budget), the selection of hyperparameters on the validation split, the mean ± std cell of their tables, and
where their results go (files and an MLflow run)."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator import spec as spec_mod


def check_same_budget(files: dict[str, Path], keys: tuple[str, ...], exempt: dict[str, str] | None = None) -> None:
    """Exit naming the first dotted key (e.g. "optim.steps") whose value differs between the files; `exempt` maps a
    key to the one row that may differ in it (a supervised baseline reads no unlabeled data)."""
    dumps = {name: spec_mod.load(path).model_dump() for name, path in files.items()}
    for dotted in keys:
        values = {name: _get(dump, dotted) for name, dump in dumps.items() if (exempt or {}).get(dotted) != name}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            raise SystemExit(f"not the same budget: {dotted} differs: {values}")


def train_file(path: Path, seed: int, extra: list[str] = (), checkpoint_root: Path | None = None
               ) -> dict[str, float]:
    """One run of an experiment file through the orchestrator's step loop in this process (no Ray, one rank, no
    intermediate evaluation or checkpoint; the final checkpoint goes to `checkpoint_root` when given), `extra` as
    --set overrides: its final metrics, eval ones without the "eval/" prefix, and "seconds"."""
    import torch

    from orchestrator.launch import train_in_process

    spec = spec_mod.load(path, [f"seed={seed}", "resources.workers=1", "eval.every=null", "checkpoint.every=1000000",
                                *extra])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=checkpoint_root)
    return {k.removeprefix("eval/"): v for k, v in metrics.items()} | {"seconds": time.perf_counter() - started}


def grid_points(grid: dict[str, list]) -> list[dict[str, object]]:
    """{"config.a": [1, 2], "config.b": [3]} -> [{"config.a": 1, "config.b": 3}, {"config.a": 2, "config.b": 3}]."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def overrides(point: dict[str, object]) -> list[str]:
    """A grid point as --set overrides."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def select_on_validation(grids: dict[str, dict[str, list]], seeds: list[int],
                         run: Callable[[str, int, list[str]], dict[str, float]]) -> dict[str, list[dict]]:
    """Every point of each row's grid, scored by `run(row, seed, overrides)` with `data.eval_on=val` (the file's
    validation split) for every seed: {row: [{"point", "acc", "loss" (means over seeds), "per_seed"}, ...]}, best
    first: the highest accuracy, ties (150 validation images: one image is 0.7%) broken by the lower loss."""
    scores = {}
    for row, grid in grids.items():
        scored = []
        for point in grid_points(grid):
            runs = [run(row, seed, [*overrides(point), "data.eval_on=val"]) for seed in seeds]
            scored.append({"point": point, "acc": statistics.mean(r["acc"] for r in runs),
                           "loss": statistics.mean(r["loss"] for r in runs), "per_seed": [r["acc"] for r in runs]})
            print(f"validation {row} {point}: {runs}", flush=True)
        scores[row] = sorted(scored, key=lambda r: (-r["acc"], r["loss"]))
    return scores


def selection_table(scores: dict[str, list[dict]]) -> str:
    """The validation accuracy and loss of every grid point, one line per point, the chosen (first) one in bold."""
    lines = ["| method | setting | validation accuracy (mean over seeds) | validation loss | per seed |",
             "|---|---|---|---|---|"]
    for row, scored in scores.items():
        for rank, r in enumerate(scored):
            setting = ", ".join(f"{k.removeprefix('config.')} {v}" for k, v in r["point"].items())
            cell = f"**{r['acc']:.3f}**" if rank == 0 else f"{r['acc']:.3f}"
            lines.append(f"| {row} | {setting} | {cell} | {r['loss']:.3f} | "
                         f"{', '.join(f'{a:.3f}' for a in r['per_seed'])} |")
    return "\n".join(lines)


def publish_selection(out: str | Path, grids: dict[str, dict[str, list]], seeds: list[int],
                      run: Callable[[str, int, list[str]], dict[str, float]]) -> None:
    """`select_on_validation`, its table printed and published as `out`_selection.{md,json} (and an MLflow run)."""
    scores = select_on_validation(grids, seeds, run)
    markdown = selection_table(scores)
    publish(f"{out}_selection", markdown, seeds, scores, {"seeds": seeds},
            {f"{row}/best_val_acc": scored[0]["acc"] for row, scored in scores.items()})
    print(markdown)


def _get(tree: dict, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def mean_std(values: list[float], digits: int = 3, per_seed: bool = True) -> str:
    """"mean ± std (v1, v2, ...)" of one row's seeds (std 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    cell = f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"
    return cell + (f" ({', '.join(f'{v:.{digits}f}' for v in values)})" if per_seed else "")


def seed_metrics(results: dict[str, list[dict[str, float]]], key: str) -> dict[str, float]:
    """Each row's mean and std over its seeds of `key`: {"<row>/<key>_mean", "<row>/<key>_std"}."""
    metrics = {}
    for row, runs in results.items():
        values = [r[key] for r in runs]
        metrics[f"{row}/{key}_mean"] = statistics.mean(values)
        metrics[f"{row}/{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return metrics


def publish(out: str | Path, markdown: str, seeds: list[int], results: dict, params: dict, metrics: dict) -> None:
    """The table as `out`.md and the per-seed results as `out`.json, both also in one MLflow run (experiment
    `benchmarks`, named after `out`) with the benchmark's params and summary metrics."""
    import mlflow

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown + "\n")
    out.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=2))
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=out.name):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out.with_suffix(".md")))
        mlflow.log_artifact(str(out.with_suffix(".json")))
