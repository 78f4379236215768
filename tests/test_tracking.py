"""MLflow tracking on a real (temporary sqlite) store: runs reopen, steps never repeat, secrets never leave."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import tracking
from orchestrator.storage import RunDir


def test_secrets_are_redacted_at_any_depth() -> None:
    tree = {"optim": {"lr": 0.1}, "config": {"api_key": "sk-123", "llm": {"auth_token": "t", "model": "m"}},
            "tracking": {"tags": {"MY_PASSWORD": "p", "team": "vision"}}, "empty_token": ""}
    flat = tracking.flatten(tree)
    assert flat["optim.lr"] == 0.1 and flat["config.llm.model"] == "m" and flat["tracking.tags.team"] == "vision"
    assert flat["config.api_key"] == flat["config.llm.auth_token"] == flat["tracking.tags.MY_PASSWORD"] == "***"
    assert "sk-123" not in repr(tracking.redact(tree))


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == f"sqlite:///{tmp_path / 'other.db'}"
    assert tracking.display_uri("https://user:pw@mlflow.lab:5000") == "https://mlflow.lab:5000"


def test_reopened_run_skips_logged_steps(mlflow_uri: str, tmp_path: Path) -> None:
    tracker = tracking.Tracker(mlflow_uri)
    run_dir = RunDir(str(tmp_path), "r")
    run_id, resumed = tracker.open_run(run_dir, "unit", {"method": "supervised"})
    assert not resumed and tracker.client.get_run(run_id).info.run_name == "r"
    location = tracker.client.get_experiment_by_name("unit").artifact_location
    assert location == (tmp_path / "mlartifacts" / "unit").as_uri()  # beside the database, not in the cwd
    first = tracking.MetricLogger(mlflow_uri, run_id)
    for step in (10, 20, 30):
        first.log({"train/loss": 1.0 / step}, step)

    again, resumed = tracker.open_run(RunDir(str(tmp_path), "r"), "unit", {})
    assert (again, resumed) == (run_id, True)
    second = tracking.MetricLogger(mlflow_uri, run_id)  # a resumed worker replays steps 20 and 30
    for step in (20, 30, 40):
        second.log({"train/loss": 1.0 / step, "eval/acc": 0.5}, step)
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [10, 20, 30, 40]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "eval/acc")] == [20, 30, 40]


def test_params_are_logged_once_and_truncated(mlflow_uri: str, tmp_path: Path) -> None:
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = tracker.open_run(RunDir(str(tmp_path), "p"), "unit", {})
    tracker.log_params(run_id, {"a": 1, "long": "x" * 7000})
    tracker.log_params(run_id, {"a": 1, "b": [1, 2]})
    params = tracker.client.get_run(run_id).data.params
    assert params["a"] == "1" and params["b"] == "[1, 2]" and len(params["long"]) == 6000


@pytest.mark.parametrize("as_uri", [False, True])
def test_run_dir_files_on_a_path_or_a_filesystem_uri(tmp_path: Path, as_uri: bool) -> None:
    run_dir = RunDir(f"file://{tmp_path}" if as_uri else str(tmp_path), "exp")
    assert run_dir.read("experiment.yaml") is None
    run_dir.write("experiment.yaml", "name: exp\n")
    assert run_dir.read("experiment.yaml") == "name: exp\n"
    assert (tmp_path / "exp" / "experiment.yaml").read_text() == "name: exp\n"


def test_searcher_keys_tokens_and_uri_passwords_are_logged_as_stars(mlflow_uri: str, tmp_path: Path) -> None:
    """What the driver logs for a run (params, experiment.yaml in MLflow and in the run directory), without Ray."""
    from orchestrator import spec as spec_mod
    from orchestrator.launch import check_same_experiment, open_mlflow_run

    sweep_file = Path(__file__).resolve().parents[1] / "experiments" / "supervised" / "digits_sweep.yaml"
    spec = spec_mod.load(sweep_file, ["tune.searcher={name: optuna, api_key: sk-secret-1}",
                                      "tracking.tags={HF_TOKEN: hf-secret-2, team: vision}",
                                      "tracking.tracking_uri=https://alice:secret-3@mlflow.lab:5000"])
    run_dir = RunDir(str(tmp_path), "sweep")
    check_same_experiment(spec, run_dir)
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = open_mlflow_run(tracker, spec, run_dir, str(sweep_file))
    run = tracker.client.get_run(run_id)
    assert run.data.params["tune.searcher.api_key"] == "***" and run.data.params["tune.searcher.name"] == "optuna"
    assert run.data.params["tracking.tracking_uri"] == "https://***@mlflow.lab:5000"
    assert run.data.tags["HF_TOKEN"] == "***" and run.data.tags["team"] == "vision"
    logged = tracker.client.download_artifacts(run_id, "experiment.yaml", str(tmp_path))
    texts = [Path(logged).read_text(), run_dir.read("experiment.yaml")]
    assert all("api_key: '***'" in text for text in texts)
    everything = repr(run.data.params) + repr(run.data.tags) + "".join(texts)
    assert not any(f"secret-{i}" in everything for i in (1, 2, 3))
