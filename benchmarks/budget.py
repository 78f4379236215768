"""What the comparison benchmarks share: the guard they run first (the experiment files they compare must share
their budget), the mean ± std cell of their tables, and where their results go (files and an MLflow run)."""

from __future__ import annotations

import json
import statistics
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
