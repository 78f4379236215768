"""A pre-training -> linear-probe chain from the shipped experiment files, under the shared Ray instance: the probe
finds the pre-training run's checkpoint by name and its MLflow run is linked to (nested under) the pre-training run.
Each method's steps are tested in pure PyTorch (tests/test_ressl.py, test_wcl.py, test_lewel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_then_probe_is_a_linked_chain(ray_cluster, mlflow_uri, tmp_path: Path, capsys) -> None:
    storage = f"storage_path={tmp_path}"
    pretrain = ["optim.steps=20", "eval.every=null", "checkpoint.every=20", "resources.workers=1"]
    assert main(["run", str(REPO / "experiments" / "wcl" / "digits.yaml"), "--set", storage, *pretrain]) == 0
    assert main(["run", str(REPO / "experiments" / "linear_probe" / "wcl_digits.yaml"), "--set", storage,
                 "optim.steps=20", "eval.every=20", "checkpoint.every=20"]) == 0
    assert "test knn_acc:" in capsys.readouterr().out

    source_id = json.loads((tmp_path / "wcl-digits" / "mlflow_run.json").read_text())["run_id"]
    probe_id = json.loads((tmp_path / "probe-wcl-digits" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(mlflow_uri)
    source, probe = client.get_run(source_id), client.get_run(probe_id)
    assert probe.data.tags["source_run_id"] == probe.data.tags["mlflow.parentRunId"] == source_id
    assert probe.info.experiment_id == source.info.experiment_id  # the UI lists the probe under its source
    assert probe.data.params["config.init_from"] == str(tmp_path / "wcl-digits" / "checkpoint_000000020")
    assert 0.0 <= probe.data.metrics["eval/knn_acc"] <= 1.0 and 0.0 <= probe.data.metrics["eval/acc"] <= 1.0
