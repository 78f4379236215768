"""A 2-seed repeat end to end on the shared local Ray: interrupted (Ctrl-C) once seed 0 has finished, then the
same command again trains only seed 1; the parent holds the mean, std and per-seed values of the children, and a
third run answers from MLflow."""

from __future__ import annotations

import csv
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

pytestmark = pytest.mark.ray

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def interrupt_when_seed_finishes(client: MlflowClient, seed: str, timeout_s: float = 120) -> threading.Thread:
    """Send this process SIGINT (Tune stops and saves its state) once the repeat's child of `seed` has completed."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = client.get_experiment_by_name("rep-e2e")
            runs = client.search_runs([found.experiment_id], f"tags.seed = '{seed}'") if found else []
            if runs and runs[0].data.tags.get("tune.status") == "completed":
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_repeat_aggregates_its_seeds_and_resumes_only_the_unfinished_one(ray_cluster, mlflow_uri, tmp_path,
                                                                            capsys) -> None:
    path = tmp_path / "rep.yaml"
    # one worker holding all 4 CPUs of the session's Ray: one seed at a time, and the trial drivers must take none
    path.write_text(yaml.safe_dump({
        "base": str(QUICKSTART), "name": "rep-e2e", "storage_path": str(tmp_path / "runs"),
        "optim": {"steps": 6, "warmup_steps": 0, "batch_size": 32}, "resources": {"workers": 1, "cpus_per_worker": 4},
        "eval": {"every": 3}, "checkpoint": {"every": 3}, "log_every": 3, "tracking": {"experiment": "rep-e2e"},
        "repeat": {"seeds": [0, 1]}}))
    client = MlflowClient(mlflow_uri)
    watcher = interrupt_when_seed_finishes(client, "0")
    assert main(["run", str(path)]) == 1
    watcher.join()
    assert "was interrupted: run the same command again" in capsys.readouterr().err
    (first_seed0,) = client.search_runs([client.get_experiment_by_name("rep-e2e").experiment_id], "tags.seed = '0'")

    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    runs = client.search_runs([client.get_experiment_by_name("rep-e2e").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("repeat") == "true"]
    children = sorted((r for r in runs if "seed" in r.data.tags), key=lambda r: r.data.tags["seed"])
    assert [c.info.run_name for c in children] == ["rep-e2e-seed0", "rep-e2e-seed1"]
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id
               for c in children)
    assert (children[0].info.end_time, children[0].data.metrics) == (first_seed0.info.end_time,
                                                                     first_seed0.data.metrics)  # not retrained
    trial_runs = sorted(p.name for p in (tmp_path / "runs" / "rep-e2e-repeat" / "runs").iterdir())
    assert sum(name.endswith("-fresh") for name in trial_runs) == 2  # one Train run per seed, none started twice
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval/acc")]
        assert steps == [3, 6]

    assert parent.info.status == "FINISHED" and parent.data.tags["seeds"] == "0,1"
    for key in ("eval/acc", "eval/loss", "train/loss"):
        values = [c.data.metrics[key] for c in children]
        assert parent.data.metrics[f"{key}_mean"] == pytest.approx(statistics.mean(values))
        assert parent.data.metrics[f"{key}_std"] == pytest.approx(statistics.stdev(values))
    assert len(client.get_metric_history(parent.info.run_id, "eval/acc_mean")) == 1
    table = Path(client.download_artifacts(parent.info.run_id, "seeds.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.open()))
    assert [(r["seed"], float(r["eval/acc"])) for r in rows] == [
        (c.data.tags["seed"], pytest.approx(c.data.metrics["eval/acc"])) for c in children]
    assert f"eval/acc: {parent.data.metrics['eval/acc_mean']:.4f} ± " in printed

    started = time.monotonic()
    assert main(["run", str(path), "--seeds", "0,1"]) == 0  # finished: its stored result, Ray not used
    assert time.monotonic() - started < 10 and "has finished" in capsys.readouterr().out
    assert client.get_run(parent.info.run_id).data.metrics == parent.data.metrics
