"""Runs side by side, from MLflow: `orchestrator compare RUN_ID... | --experiment NAME | --sweep ID_OR_NAME |
--repeat ID_OR_NAME`.

A table of the runs with the params that differ between them and their final metrics (printed, and written as
CSV and Markdown), and a PNG overlaying their metric curves. Sweeps use the same pieces for their trial table
and plot. Repeats (a repeat's parent run, or `--by-seed`) are compared as groups of runs that differ only by
seed: one row per group with each metric's mean +- std, and a PNG of the means with std error bars.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterator

STATUS_TAG = "tune.status"  # completed | stopped early | error, set on each trial's child run
SWEEP_KIND = ("orchestrator.kind", "sweep")
REPEAT_KIND = ("orchestrator.kind", "repeat")
PARENT_KINDS = (SWEEP_KIND[1], REPEAT_KIND[1])  # runs that hold their children's summary, not a result of their own
NOT_RESULTS = ("system/", "hp/")  # metrics every run logs about itself (machine load, its hyperparameters)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------- finding runs


def children(client: Any, parent_id: str) -> list[Any]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10_000)
    return sorted(runs, key=lambda r: r.data.tags.get("trial_id", r.info.run_name or ""))


def find_sweep(client: Any, sweep: str, kind: tuple[str, str] = SWEEP_KIND) -> Any:
    """A sweep's (or, with REPEAT_KIND, a repeat's) parent run, by run id or by name (the newest of that name)."""
    import mlflow.exceptions

    with contextlib.suppress(mlflow.exceptions.MlflowException):
        run = client.get_run(sweep)
        if run.data.tags.get(kind[0]) == kind[1]:
            return run
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.sweep = '{sweep}' and tags.`{kind[0]}` = '{kind[1]}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"no {kind[1]} {sweep!r}: give the parent run id or the {kind[1]}'s name")
    return runs[0]


def is_repeat(run: Any) -> bool:
    return run.data.tags.get(REPEAT_KIND[0]) == REPEAT_KIND[1]


def resolve_runs(client: Any, run_ids: list[str], experiment: str | None, sweep: str | None,
                 repeats: list[str] = ()) -> list[Any]:
    """The runs named by ids (a repeat's parent stands for its seeds), all runs of an MLflow experiment (sweep and
    repeat parents left out), a sweep's trials, or repeats' seeds."""
    runs = []
    for run in [client.get_run(run_id) for run_id in run_ids]:
        runs += children(client, run.info.run_id) if is_repeat(run) else [run]
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise LookupError(f"no MLflow experiment {experiment!r}")
        runs += [r for r in client.search_runs([found.experiment_id], max_results=10_000,
                                               order_by=["attributes.start_time ASC"])
                 if r.data.tags.get(SWEEP_KIND[0]) not in PARENT_KINDS]
    if sweep is not None:
        runs += children(client, find_sweep(client, sweep).info.run_id)
    for repeat in repeats:
        runs += children(client, find_sweep(client, repeat, REPEAT_KIND).info.run_id)
    if not runs:
        raise LookupError("no runs to compare: give run ids, --experiment NAME, --sweep ID or --repeat ID")
    return runs


# ---------------------------------------------------------------------------------------------- tables


def default_metrics(runs: list[Any]) -> list[str]:
    """Every eval/* metric the runs have, then train/loss."""
    keys = {k for r in runs for k in r.data.metrics}
    return sorted(k for k in keys if k.startswith("eval/")) + (["train/loss"] if "train/loss" in keys else [])


PLACEMENT_PARAMS = ("name", "storage_path")  # where a run is kept and what it is called, not what it computes
PLACEMENT_PREFIXES = ("tracking.",)  # where it is recorded (MLflow store, experiment, tags)


def _placement(key: str) -> bool:
    return key in PLACEMENT_PARAMS or key.startswith(PLACEMENT_PREFIXES)


def differing_params(runs: list[Any]) -> list[str]:
    """The params whose values differ between the runs, leaving out those that only name or place a run."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if not _placement(k) and len({r.data.params.get(k) for r in runs}) > 1]


def comparison_rows(runs: list[Any], metrics: list[str]) -> list[dict[str, Any]]:
    params = differing_params(runs)
    rows = []
    for run in runs:
        row = {"run": run.info.run_name, "run_id": run.info.run_id,
               "status": run.data.tags.get(STATUS_TAG, run.info.status.lower())}
        row.update({k: run.data.params.get(k, "") for k in params})
        row.update({k: run.data.metrics.get(k) for k in metrics})
        rows.append(row)
    return rows


def trial_rows(client: Any, parent_id: str, metric: str) -> list[dict[str, Any]]:
    """One row per trial of a sweep: its overrides, status, final `metric`, the step it reached, minutes."""
    rows = []
    for run in children(client, parent_id):
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        end = run.info.end_time or run.info.start_time
        rows.append({
            "trial": run.data.tags.get("trial_id", run.info.run_name),
            "run_id": run.info.run_id,
            "status": run.data.tags.get(STATUS_TAG, run.info.status.lower()),
            **json.loads(run.data.tags.get("tune.overrides", "{}")),
            metric: history[-1].value if history else None,
            "step": history[-1].step if history else 0,
            "minutes": round((end - run.info.start_time) / 60_000, 2),
        })
    return rows


# ---------------------------------------------------------------------------------------------- repeats


def final_metrics(run: Any) -> dict[str, float]:
    """The run's final value of every metric it reports (not the system/ and hp/ ones)."""
    return {k: v for k, v in sorted(run.data.metrics.items()) if not k.startswith(NOT_RESULTS)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as the lab's tables report them."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One row per seed of a repeat, in seed order: seed, run, run_id, status and every final metric."""
    rows = [{"seed": int(run.data.params.get("seed", -1)), "run": run.info.run_name, "run_id": run.info.run_id,
             "status": run.data.tags.get(STATUS_TAG, run.info.status.lower()), **final_metrics(run)} for run in runs]
    return sorted(rows, key=lambda row: row["seed"])


def aggregate(rows: list[dict[str, Any]], metrics: list[str] | None = None) -> dict[str, float]:
    """`<metric>_mean` and `<metric>_std` over the rows of each metric (default: every metric some row has)."""
    metrics = metrics or sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    summary = {}
    for key in metrics:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std(values)
    return summary


def seed_groups(runs: list[Any]) -> list[list[Any]]:
    """The runs grouped by what they compute but for the seed (same parent run, same params but `seed` and the
    naming/placement ones), in the order first seen."""
    groups: dict[Any, list[Any]] = {}
    for run in runs:
        params = sorted((k, v) for k, v in run.data.params.items() if k != "seed" and not _placement(k))
        groups.setdefault((run.data.tags.get("mlflow.parentRunId"), tuple(params)), []).append(run)
    return list(groups.values())


def group_rows(groups: list[list[Any]], metrics: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per group: (numeric rows with `<metric>_mean` / `<metric>_std`, the same rows with "mean ± std"
    cells for the terminal and Markdown)."""
    params = differing_params([group[0] for group in groups])
    numeric, shown = [], []
    for group in groups:
        rows = seed_rows(group)
        head = {"runs": re.sub(r"-seed\d+$", "", group[0].info.run_name or ""),
                "seeds": ",".join(str(r["seed"]) for r in rows), "n": len(rows),
                **{k: group[0].data.params.get(k, "") for k in params}}
        summary = aggregate(rows, metrics)
        numeric.append({**head, **{k: summary.get(k) for m in metrics for k in (f"{m}_mean", f"{m}_std")}})
        shown.append({**head, **{m: f"{summary[m + '_mean']:.4g} ± {summary[m + '_std']:.2g}"
                                 if m + "_mean" in summary else None for m in metrics}})
    return numeric, shown


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns for a terminal."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], stem: Path, shown: list[dict[str, Any]] | None = None) -> list[Path]:
    """`stem`.csv of `rows` and `stem`.md of `shown` (default: the same rows)."""
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    shown = rows if shown is None else shown
    columns = list(dict.fromkeys(k for r in shown for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in shown]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


# ---------------------------------------------------------------------------------------------- plots


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(client: Any, runs: list[Any], metrics: list[str], path: Path) -> None:
    """One panel per metric, one line per run, against the optimizer step."""
    plt = pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.6 * len(metrics)), squeeze=False)
    for ax, key in zip(axes[:, 0], metrics):
        for run in runs:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=run.info.run_name,
                        marker="." if len(history) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    if len(runs) <= 12:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(client: Any, rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> None:
    """Left: `metric` against the step for every trial (early-stopped ones end early). Right: each trial's final
    `metric` against the time it ended, with the best so far."""
    plt = pyplot()
    fig, (curves, timeline) = plt.subplots(1, 2, figsize=(12, 4.2))
    runs = {r["run_id"]: client.get_run(r["run_id"]).info for r in rows}
    for row in rows:
        history = sorted(client.get_metric_history(row["run_id"], metric), key=lambda m: m.step)
        style = "--" if row["status"] == "stopped early" else "-"
        curves.plot([m.step for m in history], [m.value for m in history], style, marker=".", label=row["trial"])
    curves.set(xlabel="optimizer step", ylabel=metric, title="trials (dashed: stopped early)")
    curves.grid(alpha=0.3)
    done = sorted((r for r in rows if r.get(metric) is not None),
                  key=lambda r: runs[r["run_id"]].end_time or runs[r["run_id"]].start_time)
    if done:
        t0 = min(info.start_time for info in runs.values())
        minutes = [((runs[r["run_id"]].end_time or runs[r["run_id"]].start_time) - t0) / 60_000 for r in done]
        values = [r[metric] for r in done]
        best_so_far = list(itertools.accumulate(values, max if mode == "max" else min))
        timeline.scatter(minutes, values, c=["tab:orange" if r["status"] == "stopped early" else "tab:blue"
                                             for r in done])
        timeline.step(minutes, best_so_far, where="post", color="black", label=f"best so far ({mode})")
        timeline.legend(fontsize=8)
    timeline.set(xlabel="minutes since the first trial started", ylabel=f"final {metric}",
                 title="trials by end time (orange: stopped early)")
    timeline.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_groups(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """One panel per metric: each group's mean with its std as an error bar."""
    plt = pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(5.0, 1.2 * len(rows)), 2.6 * len(metrics)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], metrics):
        scored = [r for r in rows if r.get(f"{key}_mean") is not None]
        ax.errorbar(range(len(scored)), [r[f"{key}_mean"] for r in scored], yerr=[r[f"{key}_std"] for r in scored],
                    fmt="o", capsize=4)
        ax.set_xticks(range(len(scored)), [f"{r['runs']} (n={r['n']})" for r in scored], fontsize=7)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(client: Any, runs: list[Any], metrics: list[str] | None, out: Path,
            by_seed: bool = False) -> tuple[str, list[Path]]:
    """The printed table and the files written to `out`: compare.csv, compare.md, compare.png (`by_seed`: one
    row per group of runs that differ only by seed, mean +- std)."""
    metrics = metrics or default_metrics(runs)
    out.mkdir(parents=True, exist_ok=True)
    if by_seed:
        rows, shown = group_rows(seed_groups(runs), metrics)
        files = write_tables(rows, out / "compare", shown)
        if metrics:
            plot_groups(rows, metrics, out / "compare.png")
            files.append(out / "compare.png")
        return format_table(shown), files
    rows = comparison_rows(runs, metrics)
    files = write_tables(rows, out / "compare")
    if metrics:
        plot_curves(client, runs, metrics, out / "compare.png")
        files.append(out / "compare.png")
    return format_table(rows), files
