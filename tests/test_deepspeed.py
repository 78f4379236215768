"""DeepSpeed ZeRO inside Ray Train workers on CPU (gloo, fp32, torch AdamW as the client optimizer): the
generated config, ZeRO-1 and ZeRO-3 runs with 2 workers, every rank's shards in the checkpoint, and a run whose
worker is killed that ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import registered
from mlflow.tracking import MlflowClient

from orchestrator import spec as spec_mod
from orchestrator.checkpoint import CheckpointError, verify
from orchestrator.deepspeed_engine import deepspeed_config
from orchestrator.launch import launch
from orchestrator.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
LM = REPO / "experiments" / "lm" / "stdlib_rope.yaml"


def tiny_lm(tmp_path: Path, name: str, *overrides: str):
    """The shipped CPU file (DeepSpeed ZeRO-2) on 40 standard-library documents, 512 tokens, a 2-layer width-64 model."""
    return spec_mod.load(LM, [f"name={name}", f"storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'text'}",
                              "data.max_documents=40", "data.vocab_size=512", "data.seq_len=32", "config.d_model=64",
                              "config.n_layers=2", "optim.batch_size=8", "optim.warmup_steps=2", "log_every=2",
                              *overrides])


def test_deepspeed_config_follows_optim_and_takes_raw_keys(tmp_path: Path) -> None:
    spec = tiny_lm(tmp_path, "cfg", "optim.grad_accum=2", "optim.clip_grad_norm=0.5",
                   "resources.deepspeed={zero_stage: 3, offload_optimizer: true, config: {zero_optimization: "
                   "{stage3_max_live_parameters: 1000}, gradient_clipping: 0.25}}")
    config = deepspeed_config(spec, world=2, on_gpu=False)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (8, 2)
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.25  # raw key wins
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "stage3_max_live_parameters": 1000}
    assert config["bf16"] == {"enabled": False}
    assert deepspeed_config(spec, world=2, on_gpu=True)["bf16"] == {"enabled": True}
    with pytest.raises(SpecError, match="resources.deepspeed: expected zero_stage 3 for offload_params"):
        tiny_lm(tmp_path, "bad", "resources.deepspeed={zero_stage: 2, offload_params: true}")


@pytest.mark.parametrize("stage", [3])  # ZeRO-1: the killed-worker test below; ZeRO-3 with generation: VAPO's test
def test_zero_stages_train_under_ray_and_save_every_ranks_shards(ray_cluster, mlflow_uri, tmp_path, stage) -> None:
    spec = tiny_lm(tmp_path, f"zero{stage}", "optim.steps=8", "optim.grad_accum=2", "checkpoint.every=4",
                   "eval.every=4", f"resources.deepspeed.zero_stage={stage}")
    outcome = launch(spec)
    assert outcome.metrics["step"] == 8 and outcome.metrics["eval/ppl"] < 512  # 2 micro-batches per step
    checkpoint = tmp_path / "runs" / f"zero{stage}" / "checkpoint_000000008"
    manifest = verify(checkpoint)
    assert manifest["ranks"] == 2 and {"manifest_rank0.json", "manifest_rank1.json"} <= {
        p.name for p in checkpoint.iterdir()}
    shards = {p.name for p in (checkpoint / "deepspeed").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards
    if stage == 3:  # parameters are sharded too
        assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= shards
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["resources.deepspeed.zero_stage"] == str(stage)


def test_a_checkpoint_missing_a_ranks_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "step": 4, "ranks": 2}))
    (tmp_path / "manifest_rank0.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match="no manifest_rank1.json: rank 1 did not finish"):
        verify(tmp_path)


def test_killed_worker_resumes_to_the_same_loss_as_an_uninterrupted_run(ray_cluster, mlflow_uri, tmp_path) -> None:
    overrides = ("optim.steps=60", "checkpoint.every=10", "eval.every=null", "resources.deepspeed.zero_stage=1")
    uninterrupted = launch(tiny_lm(tmp_path, "straight", *overrides))
    spec = tiny_lm(tmp_path, "killed", *overrides)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=launch(spec)))
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 300
    while not registered(run_dir, "checkpoint_000000010") and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=400)
    resumed = outcome["result"]
    assert resumed.metrics["step"] == 60
    assert resumed.metrics["eval/loss"] == pytest.approx(uninterrupted.metrics["eval/loss"], rel=1e-6)
    client = MlflowClient(mlflow_uri)
    assert int(client.get_run(resumed.run_id).data.tags["resumed_from_step"]) >= 10  # the kill did interrupt it
    history = client.get_metric_history(resumed.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(2, 61, 2))  # no duplicated or missing step


def test_vapo_runs_under_ray_with_zero3_and_logs_its_diagnostics(ray_cluster, mlflow_uri, tmp_path) -> None:
    """The shipped VAPO file, shrunk (a 1-layer policy from scratch, 8 steps: 2 of value pretraining, then
    rollouts of 4 prompts x 2 samples on each of 2 workers), under DeepSpeed ZeRO-3: both ranks generate in
    lockstep inside the engine's forward (parameters are gathered collectively), and the diagnostics reach MLflow."""
    spec = spec_mod.load(REPO / "experiments" / "rl" / "arithmetic_vapo.yaml", [
        f"storage_path={tmp_path / 'runs'}", "config.init_from=''", "config.d_model=32", "config.n_layers=1",
        "config.n_heads=2", "config.max_new_tokens=6", "config.group_size=2", "config.minibatches=2",
        "config.value_pretrain_steps=2", "config.eval_samples=2", "data.num_problems=64", "data.num_test=8",
        "optim.steps=8", "optim.batch_size=8", "log_every=2", "eval.every=null", "checkpoint.every=4",
        "resources.workers=2", "resources.deepspeed={zero_stage: 3}"])
    outcome = launch(spec)
    assert outcome.metrics["step"] == 8 and 0.0 <= outcome.metrics["eval/accuracy_avg2"] <= 1.0
    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "vapo"
    diagnostics = {"train/value_bias/t00", "train/value_explained_variance/t05", "train/advantage_std/long",
                   "train/credit_assignment", "train/entropy", "train/clip_low_frac", "train/clip_high_frac",
                   "train/value_pretraining", "eval/accuracy"}
    assert diagnostics <= set(run.data.metrics)
    pretraining = client.get_metric_history(outcome.run_id, "train/value_pretraining")
    assert [m.value for m in sorted(pretraining, key=lambda m: m.step)] == [1.0, 0.0, 0.0, 0.0]
    shards = {p.name for p in (tmp_path / "runs" / spec.name / "checkpoint_000000008" / "deepspeed").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= shards
