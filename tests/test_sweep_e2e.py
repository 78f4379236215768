"""Sweeps end to end on the shared local Ray: an ASHA sweep whose driver is killed and resumed (early stopping,
no duplicated trial, MLflow parent/child runs, `orchestrator compare`), and a PBT sweep that exploits."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def write_sweep(tmp_path: Path, name: str, tune: dict, optim: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(QUICKSTART), "name": name, "storage_path": str(tmp_path / "runs"),
        "optim": {"warmup_steps": 0, "batch_size": 32, **optim}, "tracking": {"experiment": name},
        "tune": {"metric": "eval/acc", "mode": "max", "max_concurrent_trials": 2, "resources": {"workers": 1}, **tune},
    }))
    return path


def sweep_runs(client: MlflowClient, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of the MLflow experiment."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("orchestrator.kind") == "sweep"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tmp_path_factory):
    """Four trials (two good learning rates, two hopeless ones) under ASHA; the sweep driver is killed once a
    trial has ended, then the same command is run again. One trial at a time, in grid order: ASHA's decisions
    then do not depend on which trial happens to reach a rung first (with two at a time a hopeless trial could
    reach an empty rung and be let through)."""
    tmp_path = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(tmp_path, "asha-digits", optim={"steps": 60}, tune={
        "report_every": 15, "space": {"optim.lr": {"grid": [0.1, 0.05, 0.0003, 0.0001]}},
        "scheduler": {"name": "asha", "grace_period": 15, "reduction_factor": 2}, "max_concurrent_trials": 1})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "orchestrator", "sweep", str(path)]
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
        children = sweep_runs(client, "asha-digits")[1] if (tmp_path / "mlflow.db").exists() else []
        if any("tune.status" in r.data.tags for r in children):
            break
    assert driver.poll() is None, driver.communicate()[0][-4000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return client, again, tmp_path


def test_a_killed_sweep_resumes_without_duplicating_trials(asha_sweep) -> None:
    client, again, _ = asha_sweep
    assert "resuming sweep" in again.stderr
    parents, children = sweep_runs(client, "asha-digits")
    assert len(parents) == 1 and len(children) == 4
    assert sorted(json.loads(c.data.tags["tune.overrides"])["optim.lr"] for c in children) == [
        0.0001, 0.0003, 0.05, 0.1]
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "eval/acc")
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
        hp_steps = [m.step for m in client.get_metric_history(child.info.run_id, "hp/optim.lr")]
        assert len(hp_steps) == len(set(hp_steps)), f"hp/optim.lr logged twice at a step: {hp_steps}"


def test_asha_stops_the_weak_trials_early(asha_sweep) -> None:
    client, again, _ = asha_sweep
    _, children = sweep_runs(client, "asha-digits")
    status = {json.loads(c.data.tags["tune.overrides"])["optim.lr"]: c.data.tags["tune.status"] for c in children}
    assert status[0.0003] == status[0.0001] == "stopped early"  # they reach each rung after the good ones
    assert "completed" in status.values()
    stopped = sum(s == "stopped early" for s in status.values())
    assert f"4 trials, {stopped} stopped early by the scheduler" in again.stdout
    best = max(children, key=lambda c: c.data.metrics.get("eval/acc", 0))
    assert json.loads(best.data.tags["tune.overrides"])["optim.lr"] in (0.1, 0.05)
    # trained alone for 60 steps, lr 0.1 reaches 0.867 and lr 0.05 0.802; asynchronous ASHA may stop either one
    assert best.data.metrics["eval/acc"] > 0.75


def test_the_parent_run_holds_the_trial_table_and_plot(asha_sweep) -> None:
    client, again, tmp_path = asha_sweep
    (parent,), children = sweep_runs(client, "asha-digits")
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/total"] == 4
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    assert {"trials.csv", "trials.md", "sweep.png", "experiment.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and {"trial", "status", "optim.lr", "eval/acc", "step"} <= set(rows[0])
    child_params = client.get_run(children[0].info.run_id).data.params
    assert {"optim.lr", "optim.steps", "config.arch", "config.label_smoothing"} <= set(child_params)


def test_compare_tabulates_a_sweeps_trials(asha_sweep, capsys) -> None:
    client, _, tmp_path = asha_sweep
    out = tmp_path / "compare"
    assert main(["compare", "--sweep", "asha-digits", "--out", str(out),
                 "--tracking-uri", client.tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert "optim.lr" in printed and "eval/acc" in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 4 and "optim.lr" in rows[0] and "optim.steps" not in rows[0]  # only differing params
    assert (out / "compare.png").stat().st_size > 10_000 and (out / "compare.md").exists()
    one, two = rows[0]["run_id"], rows[1]["run_id"]
    assert main(["compare", one, two, "--out", str(out / "two"), "--tracking-uri", client.tracking_uri]) == 0
    assert len(list(csv.DictReader((out / "two" / "compare.csv").open()))) == 2


def test_pbt_clones_a_better_trials_checkpoint(ray_cluster, mlflow_uri, tmp_path, capsys) -> None:
    path = write_sweep(tmp_path, "pbt-digits", optim={"steps": 60, "schedule": "constant"}, tune={
        "report_every": 20, "space": {"optim.lr": {"grid": [0.0003, 0.2]}},
        "scheduler": {"name": "pbt", "perturbation_interval": 40, "quantile_fraction": 0.5, "synch": True,
                      "resample_probability": 0.0, "mutations": {"optim.lr": {"loguniform": [1.0e-4, 0.5]}}}})
    assert main(["sweep", str(path)]) == 0
    _, children = sweep_runs(MlflowClient(mlflow_uri), "pbt-digits")
    trials = {c.data.tags["trial_id"]: c for c in children}
    cloned = [c for c in children if "tune.restored_from" in c.data.tags]
    assert cloned, "no trial was restored from another trial's checkpoint"
    source = cloned[0].data.tags["tune.restored_from"].split()[0]
    assert source in trials and source != cloned[0].data.tags["trial_id"]
    learning_rates = MlflowClient(mlflow_uri).get_metric_history(cloned[0].info.run_id, "hp/optim.lr")
    assert len({m.value for m in learning_rates}) >= 2  # PBT changed its lr (perturbed by 0.8x / 1.2x)
    assert_no_reserved_cpus_left()


def assert_no_reserved_cpus_left(timeout_s: float = 30.0) -> None:
    """Every placement group of the sweep's trials and worker groups is removed soon after it ends. A trial that
    PBT pauses ends its Ray Train controller without a shutdown, and Ray Train's cleaner, which removes the worker
    group's placement group then, needs Ray's state API: with a local Ray started without its dashboard the CPUs of
    each paused trial stayed reserved, and a later test needing all 4 waited forever."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (live := [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]):
        assert time.monotonic() < deadline, f"placement groups still reserved: {live}"
        time.sleep(0.5)
