"""A two-node Ray cluster on loopback (head and worker from `ray start`, token auth, an MLflow server): the
quickstart submitted with `ray job submit`, and with `orchestrator submit` while the worker node is lost mid-run.

Each node has one CPU, so the quickstart's two training workers run one on each node (DDP across nodes). This
module starts and stops its own cluster; the session's shared Ray instance is not involved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import registered
from local_cluster import RAY, LocalCluster, MlflowServer
from mlflow.tracking import MlflowClient
from test_packaging import IMPORT_ALL, check_origins

from orchestrator.submit import EXCLUDES

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SHORT = ["optim.steps=60", "eval.every=null", "checkpoint.every=30", "log_every=10"]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> MlflowServer:
    server = MlflowServer(Path(tmp_path_factory.mktemp("mlflow")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> LocalCluster:
    nodes = LocalCluster(Path(tmp_path_factory.mktemp("cluster")))
    try:
        nodes.start_head(cpus=1)
        nodes.add_worker(cpus=1)
        yield nodes
    finally:
        nodes.stop()


def only_run(tracking: MlflowServer, experiment: str, name: str):
    client = MlflowClient(tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.timestamp, m.step))]


def test_a_client_without_the_token_is_refused(cluster) -> None:
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard], capture_output=True, text=True,
                             timeout=120, env=env)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    allowed = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard], capture_output=True, text=True,
                             timeout=120, env=cluster.env)
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def test_quickstart_with_ray_job_submit(cluster, tracking) -> None:
    """As the README documents plain `ray job submit`: the commit travels as LAB_GIT_SHA (.git is not uploaded)."""
    runs = cluster.root / "runs"
    runtime_env = {"excludes": [".venv", ".git", "benchmarks/results"],
                   "env_vars": {"MLFLOW_TRACKING_URI": tracking.uri, "RAY_TRAIN_V2_ENABLED": "1",
                                "LAB_GIT_SHA": head_commit()}}
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", "orchestrator", "run",
               "experiments/quickstart.yaml", "--set", *SHORT, f"storage_path={runs}", "name=ray-job-submit"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=500, env=cluster.env)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    client, run = only_run(tracking, "quickstart", "ray-job-submit")
    assert run.info.status == "FINISHED" and loss_steps(client, run.info.run_id) == [10, 20, 30, 40, 50, 60]
    assert (runs / "ray-job-submit" / "checkpoint_000000060").is_dir()
    assert {"experiment.yaml", "final_metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["git_sha"] == head_commit() and run.data.tags["ray_job_id"].startswith("raysubmit_")


def test_a_job_imports_our_ops_beside_hugging_face_packages(cluster) -> None:
    """The job runs in the uploaded copy of the project, whose root is its cwd and first on sys.path: `lab_kernels`
    comes from there, `kernels` (diffusers' and transformers' dependency) from the installed distribution."""
    code = IMPORT_ALL + "import os\nprint('ORIGINS', os.getcwd(), *origins)"
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cluster.env)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    cwd, ours, theirs = next(line for line in done.stdout.splitlines() if line.startswith("ORIGINS")).split()[1:]
    assert Path(cwd) != REPO
    check_origins(f"{ours} {theirs}", Path(cwd) / "lab_kernels")


def test_orchestrator_submit_survives_losing_the_worker_node(cluster, tracking) -> None:
    """The quickstart through `orchestrator submit`, which streams the job's logs; at step >= 100 the worker
    node dies (its raylet SIGKILLed) and a replacement joins, as a cloud provider replaces a lost spot instance.
    The run resumes from its checkpoint and MLflow keeps one continuous run."""
    runs = cluster.root / "runs"
    command = [sys.executable, "-m", "orchestrator", "submit", "experiments/quickstart.yaml", "--address",
               cluster.dashboard, "--python", sys.executable, "--tracking-uri", tracking.uri, "--set",
               "optim.steps=300", "eval.every=300", "checkpoint.every=50", "log_every=10", f"storage_path={runs}",
               "name=node-loss", "resources.max_failures=2"]
    with (cluster.root / "submit.log").open("w+") as log:
        submit = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                  env=cluster.env)
        deadline = time.monotonic() + 300
        while not registered(runs / "node-loss", "checkpoint_000000100"):
            assert time.monotonic() < deadline and submit.poll() is None, "no checkpoint at step 100"
            time.sleep(0.2)
        cluster.lose(cluster.nodes[-1])
        cluster.add_worker(cpus=1)
        submit.wait(timeout=400)
        log.seek(0)
        output = log.read()
    assert submit.returncode == 0 and "SUCCEEDED" in output, output[-4000:]
    assert "test acc" in output  # the job's own output, streamed
    client, run = only_run(tracking, "quickstart", "node-loss")
    assert run.info.status == "FINISHED" and run.data.metrics["eval/acc"] >= 0.85
    assert int(run.data.tags["resumed_from_step"]) >= 100
    tags = run.data.tags  # provenance from the submitting checkout and the cluster
    assert tags["git_sha"] == head_commit() and tags["git_dirty"] in ("True", "False")
    assert tags["ray_job_id"].startswith("node-loss-") and tags["ray_version"] == ray.__version__
    assert tags["ray_address"].rsplit(":", 1)[-1] == str(cluster.gcs_port)
    assert loss_steps(client, run.info.run_id) == list(range(10, 301, 10))  # one curve: no gap, no step twice
