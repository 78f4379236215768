"""`orchestrator search experiments/genius/nas_bench_macro.yaml` end to end on the shared local Ray, against the
OpenAI-compatible test server: the chat (with a malformed, a duplicate and an over-budget answer re-prompted),
the candidates, the trajectory and the best architecture end up in MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient
from openai_server import FreshArchitecturePolicy, OpenAIServer, RawReply, ScriptedPolicy, SlowReply

from trainers.nas import get_space

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "genius" / "nas_bench_macro.yaml"
TABLE = ROOT.parent / "shared" / "data" / "nas-bench-macro_cifar10.json"
REPLIES = ["I would use a deep network with large kernels.",  # malformed
           "[1, 1, 1, 1, 1, 1, 1, 1]",  # accepted
           "[1, 1, 1, 1, 1, 1, 1, 1]",  # duplicate of experiment 1
           "[2, 2, 2, 2, 2, 2, 2, 2]"]  # 105.7 MFLOPs: over the 70 MFLOPs budget


def test_genius_search_runs_end_to_end(ray_cluster, tmp_path: Path) -> None:
    space = get_space("nas_bench_macro")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "MLFLOW_TRACKING_URI": uri}
    env.pop("OPENAI_API_KEY", None)
    policy = ScriptedPolicy(REPLIES, fallback=FreshArchitecturePolicy(space, seed=0, flops=(0.0, 70.0)))
    with OpenAIServer(policy) as server:
        command = [sys.executable, "-m", "orchestrator", "search", str(EXPERIMENT), "--set", "tune.num_samples=3",
                   f"tune.searcher.base_url={server.base_url}", "tune.searcher.flops=[0, 70]",
                   f"config.table={TABLE}", f"storage_path={tmp_path / 'runs'}"]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "best architecture: nas_bench_macro:" in done.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("genius").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("orchestrator.kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(c.data.tags["tune.status"] == "completed" for c in children)
    assert children and all(c.data.metrics["arch/mflops"] <= 70 for c in children)
    pids = {json.loads(line)["pid"] for result in (tmp_path / "runs").glob("*/*/result.json")
            for line in result.read_text().splitlines()}
    assert 1 <= len(pids) < len(children)  # lookups share their trial process instead of starting one each

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"architectures.csv", "search_trajectory.png", "search"} <= artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "search", str(tmp_path / "downloaded")))
    verdicts = [json.loads(line)["verdict"] for line in (local / "candidates.jsonl").read_text().splitlines()]
    assert verdicts[:5] == ["malformed", "accepted", "duplicate", "over_budget", "accepted"]
    assert verdicts.count("accepted") == 3
    chat = json.loads((local / "chat.json").read_text())
    assert len(chat["exchanges"]) == len(server.requests) == len(verdicts)
    last_prompt = chat["exchanges"][-1]["messages"][1]["content"]
    assert re.search(r"Experiment 1: \[1, 1, 1, 1, 1, 1, 1, 1\], FLOPs [\d.]+M, accuracy \d+\.\d\d%", last_prompt)
    usage = json.loads((local / "usage.json").read_text())
    assert usage["requests"] == len(verdicts) and usage["total_tokens"] > 0
    assert parent.data.metrics["search/total_tokens"] == usage["total_tokens"]

    best = max(children, key=lambda c: c.data.metrics["eval/acc"])
    assert parent.data.tags["best_arch"] == best.data.tags["arch"]
    assert parent.data.metrics["best/eval/acc"] == best.data.metrics["eval/acc"]


FAULTS = [  # (what the server sends, what the one-line error says); the search is resumed after each
    ([RawReply(200, "<html><body>gateway busy</body></html>")], "answered HTTP 200 with a body that is not JSON"),
    (["[1, 1, 1, 1, 1, 1, 1, 1]", RawReply(500, '{"error": {"message": "upstream down"}}', "application/json")],
     "InternalServerError: Error code: 500 - upstream down"),
    ([SlowReply(8.0, "[2, 2, 2, 2, 2, 2, 2, 2]")], "APITimeoutError: Request timed out."),
    (["no list here", "none here either"], "no acceptable architecture after 1 re-prompts"),
]


def test_genius_endpoint_faults_stop_the_search_in_one_line_and_a_resume_keeps_every_record(
        ray_cluster, tmp_path: Path) -> None:
    """`orchestrator search` against a server that answers badly, resumed after each fault with the same command:
    exit 1 with one `error:` line (no traceback) each time, then the search completes; every request and reply of
    every attempt is in the sweep's search logs and counts, and in its MLflow parent run."""
    space = get_space("nas_bench_macro")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "MLFLOW_TRACKING_URI": uri}
    env.pop("OPENAI_API_KEY", None)
    scripted = [reply for replies, _ in FAULTS for reply in replies]
    policy = ScriptedPolicy(scripted, fallback=FreshArchitecturePolicy(space, seed=0))
    with OpenAIServer(policy) as server:
        command = [sys.executable, "-m", "orchestrator", "search", str(EXPERIMENT), "--set", "tune.num_samples=2",
                   f"tune.searcher.base_url={server.base_url}", "tune.searcher.max_retries=1",
                   "tune.searcher.request_retries=0", "tune.searcher.request_timeout=4", f"config.table={TABLE}",
                   f"storage_path={tmp_path / 'runs'}"]
        for _, message in FAULTS:
            done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
            errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            assert done.returncode == 1 and len(errors) == 1, done.stdout[-3000:] + done.stderr[-3000:]
            # the command's own output has no traceback (lines Ray forwards from a trial process it tears down,
            # "(run_trial pid=N) ...", are that process's and can hold one from its interrupted shutdown)
            own = [line for line in done.stderr.splitlines() if not re.search(r"\([\w.]+ pid=\d+", line)]
            assert message in errors[0] and "its state is kept" in errors[0]
            assert not any("Traceback" in line for line in own), "\n".join(own[-40:])
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        sent = len(server.requests)

    logs = tmp_path / "runs" / "genius-nas-bench-macro" / "search"
    candidates = [json.loads(line) for line in (logs / "candidates.jsonl").read_text().splitlines()]
    answered = [r for r in scripted if isinstance(r, str)]  # the replies the client received, in order
    assert [c["reply"] for c in candidates[:len(answered)]] == answered and len(candidates) > len(answered)
    assert [c["verdict"] for c in candidates].count("accepted") >= 2  # the 2 trials, and any repeated by a restart
    exchanges = json.loads((logs / "chat.json").read_text())["exchanges"]
    assert len(exchanges) == sent and sum(bool(e["error"]) for e in exchanges) == 3
    usage = json.loads((logs / "usage.json").read_text())
    assert (usage["requests"], usage["failed_requests"]) == (sent, 3)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("genius").experiment_id])
    parents = [r for r in runs if r.data.tags.get("orchestrator.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].data.metrics["search/requests"] == sent
    assert parents[0].data.metrics["search/failed_requests"] == 3


def test_a_lookup_runs_alone_as_a_ray_task(ray_cluster, tmp_path: Path) -> None:
    """`orchestrator run` of a run(cfg, ctx) method: one Ray task, its report in an MLflow run of its own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "orchestrator", "run", str(EXPERIMENT), "--set", "tune=null", "name=one-lookup",
               "config.arch=nas_bench_macro:22212202", f"config.table={TABLE}", f"storage_path={tmp_path / 'runs'}"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = MlflowClient(uri)
    run, = client.search_runs([client.get_experiment_by_name("genius").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "none"
    assert run.data.metrics["eval/acc"] == json.loads(TABLE.read_text())["22212220"]["mean_acc"] / 100
    assert run.data.metrics["eval/rank"] == 1
