"""End to end under Ray with 2 CPU workers and a temporary MLflow store: the quickstart, a killed worker, a
killed driver. These share the session's Ray instance."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import registered
from orchestrator import checkpoint as ckpt_io
from orchestrator import spec as spec_mod
from orchestrator.cli import main
from orchestrator.launch import launch

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def assert_clean_curve(client: MlflowClient, run_id: str, total: int, every: int) -> None:
    """Strictly increasing steps, no duplicates, no gaps: exactly every `every`-th step up to `total`."""
    steps = metric_steps(client, run_id, "train/loss")
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    assert steps == list(range(every, total + 1, every))


def run_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def test_quickstart_end_to_end(ray_cluster, mlflow_uri, tmp_path, capsys) -> None:
    assert main(["run", str(QUICKSTART), "--set", f"storage_path={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    accuracy = float(next(line for line in out.splitlines() if line.startswith("test acc:")).split()[-1])
    assert accuracy >= 0.90
    assert f"in {mlflow_uri}" in out and "mlflow ui --backend-store-uri" in out
    run_page = re.search(r"the run in the UI: http://127.0.0.1:5000/#/experiments/(\d+)/runs/(\w+)\?workflowType="
                         r"machine_learning$", out, re.MULTILINE)
    assert run_page is not None

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id_of(tmp_path / "runs" / "quickstart-digits"))
    assert run.info.status == "FINISHED" and run_page.groups() == (run.info.experiment_id, run.info.run_id)
    assert run.data.tags["method"] == "supervised" and run.data.tags["dataset"] == "digits"
    provenance = {"git_sha", "host", "experiment_file", "paper", "ray_version", "ray_address", "ray_job_id"}
    assert provenance <= set(run.data.tags)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.data.metrics["startup/workers_s"] > 0 and run.data.metrics["startup/setup_s"] > 0
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["config.arch"] == "small_cnn"
    assert run.data.metrics["eval/acc"] == pytest.approx(accuracy, abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"experiment.yaml", "split.json", "final_metrics.json", "learning_curves.png"} <= artifacts
    assert_clean_curve(client, run.info.run_id, total=300, every=10)
    registered_model_loads_back_and_evaluates_the_same(client, run, tmp_path)
    finished_run_answers_at_once_and_its_checkpoint_reproduces_it(tmp_path, run, capsys)


def registered_model_loads_back_and_evaluates_the_same(client: MlflowClient, run, tmp_path: Path) -> None:
    """The final model, logged and registered as quickstart-digits version 1, loads by `models:/` and gives the
    run's test accuracy; as an `init_from` reference it names the run's final checkpoint."""
    import mlflow.pytorch

    from orchestrator.data import build_data
    from orchestrator.launch import eval_batches
    from orchestrator.references import resolve

    model_uri = "models:/quickstart-digits/1"
    assert run.data.tags["model_uri"] == model_uri
    info = mlflow.models.get_model_info(model_uri)
    assert info.run_id == run.info.run_id and info.metadata["method"] == "supervised"
    assert info.metadata["config"]["arch"] == "small_cnn" and info.saved_input_example_info is not None
    spec = spec_mod.load(QUICKSTART)
    model, test = mlflow.pytorch.load_model(model_uri), build_data(spec.data, spec.seed, spec.views).test
    correct = sum(spec.trainer.eval_step(model, batch, spec.method_config())["acc"].item()
                  for batch in eval_batches(test, 256, 0, 1, torch.device("cpu")))
    assert correct / len(test) == pytest.approx(run.data.metrics["eval/acc"], abs=1e-9)
    finetune = resolve(spec_mod.load(QUICKSTART, [f"storage_path={tmp_path / 'runs'}", "name=finetune",
                                                  f"config.init_from={model_uri}"]), QUICKSTART)
    final = sorted((tmp_path / "runs" / "quickstart-digits").glob("checkpoint_0*"))[-1]
    assert finetune.config["init_from"] == str(final)
    assert finetune.tracking.tags["source.config.init_from"] == run.info.run_id


def finished_run_answers_at_once_and_its_checkpoint_reproduces_it(tmp_path: Path, run, capsys) -> None:
    """Run again, the finished run prints its stored result without starting anything; --reeval evaluates its final
    checkpoint (loaded by both workers) and reproduces the logged metrics exactly, logging nothing twice."""
    overrides = [f"storage_path={tmp_path / 'runs'}"]
    started = time.monotonic()
    assert main(["run", str(QUICKSTART), "--set", *overrides]) == 0
    assert time.monotonic() - started < 5
    out = capsys.readouterr().out
    assert "finished on" in out and f"MLflow run {run.info.run_id}" in out
    assert f"test acc: {run.data.metrics['eval/acc']:.4f}" in out

    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "quickstart-digits").glob("checkpoint_*"))
    again = launch(spec_mod.load(QUICKSTART, overrides))
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    assert logged and {k: again.metrics[k] for k in logged} == logged  # bit for bit
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert metric_steps(client, run.info.run_id, "eval/acc") == [100, 200, 300]
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart-digits").glob("checkpoint_*")) == checkpoints


def worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_killed_worker_resumes_from_its_last_checkpoint(ray_cluster, mlflow_uri, tmp_path) -> None:
    spec = spec_mod.load(QUICKSTART, [f"storage_path={tmp_path / 'runs'}", "name=kill-worker", "optim.steps=400",
                                      "checkpoint.every=50", "eval.every=400"])
    run_dir = tmp_path / "runs" / "kill-worker"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=launch(spec)))
    thread.start()
    deadline = time.monotonic() + 240
    while not registered(run_dir, "checkpoint_000000100") and time.monotonic() < deadline:
        time.sleep(0.1)
    victims = worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=400)
    assert "result" in outcome, "the run did not finish after the worker was killed"
    result = outcome["result"]
    assert result.metrics["step"] == 400 and result.metrics["eval/acc"] >= 0.9
    client = MlflowClient(mlflow_uri)
    assert int(client.get_run(result.run_id).data.tags["resumed_from_step"]) >= 100  # restarted from a checkpoint
    assert_clean_curve(client, result.run_id, total=400, every=10)


def test_killed_driver_resumes_when_run_again(ray_cluster, mlflow_uri, tmp_path) -> None:
    command = [sys.executable, "-m", "orchestrator", "run", str(QUICKSTART), "--set", f"storage_path={tmp_path}",
               "name=kill-driver", "optim.steps=400", "checkpoint.every=50"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "kill-driver"
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoint_000000100")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[0][-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first_run_id = run_id_of(run_dir)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run" in again.stderr and f"MLflow run {first_run_id}" in again.stdout
    client = MlflowClient(mlflow_uri)
    assert client.get_run(first_run_id).info.status == "FINISHED"
    assert_clean_curve(client, first_run_id, total=400, every=10)


def test_a_failing_run_exits_1_and_marks_mlflow_failed(ray_cluster, mlflow_uri, tmp_path, capsys) -> None:
    # a real timm model that passes the checks before Ray starts, but whose forward refuses 16 px inputs
    overrides = [f"storage_path={tmp_path}", "name=broken", "config.arch=vit_tiny_patch16_224", "resources.max_failures=0"]
    assert main(["run", str(QUICKSTART), "--set", *overrides]) == 1
    err = capsys.readouterr().err
    assert "error: run broken failed" in err and "run the same command again to resume" in err
    assert MlflowClient(mlflow_uri).get_run(run_id_of(tmp_path / "broken")).info.status == "FAILED"


def test_a_diverging_run_stops_once_and_keeps_only_finite_checkpoints(ray_cluster, mlflow_uri, tmp_path,
                                                                      capsys) -> None:
    """lr 1000 breaks the quickstart within about ten steps on 2 DDP workers (batch-norm statistics overflow
    first, then the loss is NaN): both stop at the first check after it, Ray Train does not retry (max_failures is
    3), the CLI exits 1 naming the step and the last verified checkpoint, the MLflow run is FAILED with the reason,
    and no checkpoint from that step on is written."""
    overrides = [f"storage_path={tmp_path}", "name=diverge", "optim.lr=1e3", "optim.steps=40", "log_every=2",
                 "checkpoint.every=2", "checkpoint.keep=20", "eval.every=null"]
    assert main(["run", str(QUICKSTART), "--set", *overrides]) == 1
    err = capsys.readouterr().err
    found = re.search(r"(non-finite (loss|weights) at step (\d+)) \(method 'supervised', run 'diverge'\)", err)
    assert found, err[-3000:]
    bad = int(found.group(3))
    run = MlflowClient(mlflow_uri).get_run(run_id_of(tmp_path / "diverge"))
    assert run.info.status == "FAILED" and run.data.tags["stopped_reason"] == found.group(1)
    assert "resumed_from_step" not in run.data.tags  # no second attempt from a checkpoint
    checkpoints = sorted((tmp_path / "diverge").glob("checkpoint_0*"))
    last, last_step = checkpoints[-1], int(checkpoints[-1].name.removeprefix("checkpoint_"))
    assert last_step < bad and f"the last verified checkpoint is step {last_step} at {last}" in err
    for directory in checkpoints:
        model_state = ckpt_io.load(directory, rank=0)[0]
        assert all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())


@pytest.mark.parametrize("method", ["simmatchv2"])
def test_semi_supervised_digits_setting_runs_under_ray(ray_cluster, mlflow_uri, tmp_path, method) -> None:
    """A shipped semi-supervised digits file, shortened, through Ray and into MLflow: SimMatchV2's, whose views
    (weak, strong and multi-crop) exercise the most of the data path; the methods share the rest of the run, and
    each method's steps are tested in pure PyTorch (tests/test_trainers.py and its own test file)."""
    spec = spec_mod.load(REPO / "experiments" / method / "digits.yaml",
                         [f"storage_path={tmp_path}", "optim.steps=20", "eval.every=null", "checkpoint.every=10"])
    outcome = launch(spec)
    assert outcome.metrics["step"] == 20 and 0.0 <= outcome.metrics["eval/acc"] <= 1.0
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == method
    assert {"train/loss", "train/mask", "eval/acc"} <= set(run.data.metrics)


@pytest.mark.parametrize("variant", ["stdlib_vq64"])
def test_language_model_trains_under_ray_and_logs_perplexity(ray_cluster, mlflow_uri, tmp_path, variant) -> None:
    """A shipped CPU language-model file (VQ-Logits output), on 40 standard-library documents with a 512-token
    vocabulary; the attention variants are tested in pure PyTorch (tests/test_lm.py, test_complex_attention.py)."""
    spec = spec_mod.load(REPO / "experiments" / "lm" / f"{variant}.yaml",
                         [f"storage_path={tmp_path}", f"data.cache_dir={tmp_path / 'text'}", "data.max_documents=40",
                          "data.vocab_size=512", "data.seq_len=32", "optim.steps=20", "optim.warmup_steps=5",
                          "eval.every=10", "checkpoint.every=10"])
    outcome = launch(spec)
    assert outcome.metrics["step"] == 20
    assert outcome.metrics["eval/ppl"] == pytest.approx(math.exp(outcome.metrics["eval/loss"]), rel=1e-6)
    assert outcome.metrics["eval/ppl"] < 512  # better than uniform over the vocabulary after 20 steps
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "lm"
    assert {"train/loss", "eval/loss", "eval/ppl"} <= set(run.data.metrics)
    assert "corpus.json" in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(outcome.run_id)}
    logged_deepspeed_model_evaluates_the_same(spec, run, outcome.metrics["eval/loss"])


def logged_deepspeed_model_evaluates_the_same(spec: spec_mod.ExperimentSpec, run, loss: float) -> None:
    """The logged model of a DeepSpeed ZeRO-2 run (its shards gathered on the driver) gives the run's test loss."""
    import mlflow.pytorch

    from orchestrator.data import build_data
    from orchestrator.launch import eval_batches

    model = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    test = build_data(spec.data, spec.seed, spec.views).test
    with torch.no_grad():
        sums = [spec.trainer.eval_step(model, batch, spec.method_config())
                for batch in eval_batches(test, spec.eval.batch_size, 0, 1, torch.device("cpu"))]
    assert sum(s["loss"].item() for s in sums) / sum(s["n"].item() for s in sums) == pytest.approx(loss, rel=1e-5)


def test_workers_the_cluster_cannot_place_stop_naming_what_it_has(ray_cluster, mlflow_uri, tmp_path, capsys) -> None:
    """Never placeable: stopped at once. Placeable but held by other runs: stopped after placement_timeout_s.
    Neither opens an MLflow run."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    base = [f"storage_path={tmp_path}", "optim.steps=20"]
    started = time.monotonic()
    assert main(["run", str(QUICKSTART), "--set", *base, "name=too-big", "resources.workers=64"]) == 2
    err = capsys.readouterr().err
    assert "64 worker(s) x {CPU: 1} = {CPU: 64}" in err and "the cluster has {CPU: 4} on 1 node(s)" in err
    assert time.monotonic() - started < 30
    sweep_file = tmp_path / "too-big-sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(QUICKSTART), "name": "too-big-sweep", "storage_path": str(tmp_path),
        "tune": {"metric": "eval/acc", "mode": "max", "resources": {"workers": 64},
                 "space": {"optim.lr": {"choice": [0.1, 0.05]}}}}))
    assert main(["sweep", str(sweep_file)]) == 2
    assert "each trial of sweep too-big-sweep asks for 64 worker(s)" in capsys.readouterr().err

    holder = placement_group([{"CPU": 3}])  # another run holds 3 of the session's 4 CPUs
    ray.get(holder.ready(), timeout=60)
    try:
        assert main(["run", str(QUICKSTART), "--set", *base, "name=busy", "resources.placement_timeout_s=2"]) == 2
    finally:
        remove_placement_group(holder)
    err = capsys.readouterr().err
    assert "did not place 2 worker(s) x {CPU: 1} within resources.placement_timeout_s = 2 s" in err
    assert not list(tmp_path.glob("*/mlflow_run.json"))
