"""Experiments that chain under the shared Ray instance, from the shipped files: each run finds the earlier run's
output by name (`run:<name>`), and its MLflow run is linked to (nested under) that run. Pre-training -> linear
probe, teacher -> DiffKD student, DDPM -> generation -> SAU, supernet -> architecture search -> retraining of the
winner. Each method's steps are tested in pure PyTorch."""

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


def run_ids(storage: Path, *names: str) -> list[str]:
    return [json.loads((storage / name / "mlflow_run.json").read_text())["run_id"] for name in names]


def test_teacher_then_diffkd_student_is_a_linked_chain(ray_cluster, mlflow_uri, tmp_path: Path) -> None:
    storage = f"storage_path={tmp_path}"
    short = ["optim.steps=10", "eval.every=null", "checkpoint.every=10", "resources.workers=1"]
    assert main(["run", str(REPO / "experiments" / "supervised" / "digits_teacher.yaml"), "--set", storage,
                 *short]) == 0
    assert main(["run", str(REPO / "experiments" / "diffkd" / "digits.yaml"), "--set", storage, *short]) == 0
    teacher_id, student_id = run_ids(tmp_path, "supervised-digits-teacher", "diffkd-digits")
    student = MlflowClient(mlflow_uri).get_run(student_id)
    assert student.data.tags["source.config.teacher_from"] == student.data.tags["mlflow.parentRunId"] == teacher_id
    assert student.data.params["config.teacher_from"] == str(tmp_path / "supervised-digits-teacher" /
                                                             "checkpoint_000000010")
    assert 0.0 <= student.data.metrics["eval/acc"] <= 1.0


def test_ddpm_then_generation_then_sau_is_a_linked_chain(ray_cluster, mlflow_uri, tmp_path: Path) -> None:
    """The generator trains, generates from its checkpoint (found by name), and SAU trains on digits-LT filled with
    the generated images (found by name): three runs, each nested under the one it used."""
    storage = f"storage_path={tmp_path}"
    short = ["optim.steps=4", "eval.every=null", "checkpoint.every=4", "resources.workers=1"]
    assert main(["run", str(REPO / "experiments" / "ddpm" / "digits.yaml"), "--set", storage, *short]) == 0
    assert main(["run", str(REPO / "experiments" / "generate" / "digits.yaml"), "--set", storage,
                 "config.images_per_class=3", "config.shard_size=3", "config.num_inference_steps=2"]) == 0
    assert main(["run", str(REPO / "experiments" / "sau" / "digits_lt100.yaml"), "--set", storage, *short,
                 "data.generated_fill=all", "eval.every=4"]) == 0
    ddpm_id, generate_id, sau_id = run_ids(tmp_path, "ddpm-digits", "generate-digits", "sau-digits-lt100")
    client = MlflowClient(mlflow_uri)
    generation, sau = client.get_run(generate_id), client.get_run(sau_id)
    assert generation.data.tags["mlflow.parentRunId"] == ddpm_id
    assert sau.data.tags["source.data.generated"] == sau.data.tags["mlflow.parentRunId"] == generate_id
    assert generation.data.metrics["generated_images"] == 30.0
    artifacts = {a.path for a in client.list_artifacts(generate_id, "generated")}
    assert artifacts == {"generated/manifest.json", "generated/samples.png"}
    assert sau.data.params["data.generated"] == str(tmp_path / "generate-digits" / "generated")
    assert {"eval/acc", "eval/many_acc", "eval/few_acc"} <= set(sau.data.metrics)


def test_supernet_then_search_then_retraining_is_a_linked_chain(ray_cluster, mlflow_uri, tmp_path: Path) -> None:
    """A K-shot supernet trains; NSGA-II searches it (each trial evaluates one path with the shared weights); the
    search's winner (`best:run:<search>`) is retrained stand-alone."""
    storage = f"storage_path={tmp_path}"
    files = REPO / "experiments" / "kshot_nas"
    assert main(["run", str(files / "digits.yaml"), "--set", storage, "optim.steps=6", "config.warmup_steps=2",
                 "eval.every=null", "checkpoint.every=6"]) == 0
    assert main(["search", str(files / "digits_search.yaml"), "--set", storage, "tune.num_samples=3",
                 "tune.searcher.population_size=2", "config.calib_batches=2", "config.eval_batches=2"]) == 0
    best = json.loads((tmp_path / "kshot-nas-digits-search" / "search" / "best.json").read_text())
    assert main(["run", str(files / "digits_retrain.yaml"), "--set", storage, "optim.steps=6", "eval.every=6",
                 "checkpoint.every=6"]) == 0

    supernet_id, search_id, retrain_id = run_ids(tmp_path, "kshot-nas-digits", "kshot-nas-digits-search",
                                                 "kshot-nas-digits-retrain")
    client = MlflowClient(mlflow_uri)
    trials = [r for r in client.search_runs([client.get_run(search_id).info.experiment_id])
              if r.data.tags.get("mlflow.parentRunId") == search_id and "trial_id" in r.data.tags]
    assert len(trials) == 3 and all(t.data.tags["source.config.supernet_from"] == supernet_id for t in trials)
    assert all(0.3 <= t.data.metrics["eval/mflops"] <= 0.9 for t in trials)  # the file's FLOPs window
    assert best["eval/acc"] == max(t.data.metrics["eval/acc"] for t in trials)
    assert best["arch"] in {t.data.params["config.arch"] for t in trials}
    retrain = client.get_run(retrain_id)
    assert retrain.data.params["config.arch"] == best["arch"] == client.get_run(search_id).data.tags["best_arch"]
    assert retrain.data.tags["source.config.arch"] == retrain.data.tags["mlflow.parentRunId"] == search_id
    assert 0.0 <= retrain.data.metrics["eval/acc"] <= 1.0
