"""What a restored sweep does to the MLflow records a killed sweep driver left behind (no Ray needed here; the
killed-and-resumed sweep itself runs in test_sweep_e2e.py)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orchestrator.tracking import Tracker
from orchestrator.tune import StartPoint, _close_orphaned_children, _log_start


def sweep_with_children(tracker: Tracker, statuses: list[str]) -> tuple[str, list[str]]:
    experiment = tracker.experiment_id("restore")
    parent = tracker.client.create_run(experiment, run_name="sweep").info.run_id
    children = []
    for i, status in enumerate(statuses):
        run = tracker.client.create_run(experiment, run_name=f"t{i}", tags={"mlflow.parentRunId": parent,
                                                                            "trial_id": f"t{i}"})
        if status != "RUNNING":
            tracker.client.set_terminated(run.info.run_id, status=status)
        children.append(run.info.run_id)
    return parent, children


def test_children_a_killed_driver_left_running_are_marked_killed(mlflow_uri) -> None:
    tracker = Tracker(mlflow_uri)
    parent, children = sweep_with_children(tracker, ["RUNNING", "FINISHED", "FAILED", "RUNNING"])
    _close_orphaned_children(tracker, parent)
    client = MlflowClient(mlflow_uri)
    assert [client.get_run(c).info.status for c in children] == ["KILLED", "FINISHED", "FAILED", "KILLED"]
    assert client.get_run(parent).info.status == "RUNNING"  # the restored sweep's own


def test_a_trial_restarted_from_the_same_point_logs_its_hyperparameters_once(mlflow_uri) -> None:
    tracker = Tracker(mlflow_uri)
    _, (child,) = sweep_with_children(tracker, ["RUNNING"])
    fresh = StartPoint(None, "fresh", None, 0)
    for _ in range(2):  # started, then started again by the restored sweep
        _log_start(tracker, child, "t0", {"optim.lr": 0.1, "optim.name": "sgd"}, fresh)
    _log_start(tracker, child, "t0", {"optim.lr": 0.05}, StartPoint("ckpt", "abc", "t1", 0))  # PBT: new value
    _log_start(tracker, child, "t0", {"optim.lr": 0.05}, StartPoint("ckpt", "def", "t1", 40))
    history = [(m.step, m.value) for m in MlflowClient(mlflow_uri).get_metric_history(child, "hp/optim.lr")]
    assert sorted(history) == [(0, 0.05), (0, 0.1), (40, 0.05)]
