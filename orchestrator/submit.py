"""`orchestrator submit FILE --address http://HEAD:8265`: run an experiment file as a Ray job on a cluster.

The Ray Jobs SDK uploads the project (the working directory, without virtual environments, runs, MLflow stores,
git history and benchmark results), sets the MLflow tracking URI for the job, and runs
`python -m orchestrator run|sweep|search FILE --set ...` on the cluster, so the cluster runs the submitted code
with its own installed dependencies. The job's submission id is the experiment's name plus the submission time
(Ray refuses a repeated id); resuming is the run's business (the same `name` and `storage_path`), not the job's.

Paths: the experiment file must be inside the working directory. A relative `storage_path` would be relative to
the job's temporary copy of the project and lost with it, so it is refused: give storage every node of the cluster
sees (--set storage_path=/shared/runs, s3://...). A relative `sqlite:///` MLflow store is refused for the same
reason; without a tracking URI the job uses the cluster's own MLFLOW_TRACKING_URI. (A loopback address does not
tell a cluster on this machine from one behind an SSH tunnel, so no path is resolved against this machine.)
Provenance: the job carries this checkout's commit, dirty flag and uncommitted diff (orchestrator.tracking.GIT_ENV)
and the run is tagged with them (the diff is the artifact git_diff.patch), with the Ray job's submission id, the
cluster's address and Ray's version.
Token authentication (Ray >= 2.59): the SDK sends the token from $RAY_AUTH_TOKEN or ~/.ray/auth_token when
RAY_AUTH_MODE=token is set in this environment. Never expose the dashboard port (8265) without it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import ExperimentSpec, SpecError
from orchestrator.storage import is_uri
from orchestrator.tracking import submitted_git_state

EXCLUDES = [".venv", "venv", ".git", "runs", "mlruns", "mlartifacts", "mlflow.db", "*.db", "__pycache__",
            "*.egg-info", "benchmarks/results", ".pytest_cache"]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: dict


def command_for(spec: ExperimentSpec) -> str:
    """run, sweep or search, from the file's `tune:` block."""
    if spec.tune is None:
        return "run"
    from orchestrator.nas_search import architecture_key

    return "search" if architecture_key(spec) is not None else "sweep"


def prepare(spec: ExperimentSpec, file: str | Path, overrides: list[str], working_dir: Path, python: str,
            tracking_uri: str | None) -> Submission:
    """The job to submit: entrypoint, runtime environment (working dir, env vars) and submission id."""
    working_dir = working_dir.resolve()
    try:
        relative = Path(file).resolve().relative_to(working_dir)
    except ValueError:
        raise SpecError(file, "FILE", f"an experiment file inside the working directory {working_dir} (it is "
                        "uploaded with the project)", str(file)) from None
    if not is_uri(spec.storage_path) and not Path(spec.storage_path).is_absolute():
        raise SpecError(file, "storage_path", "an absolute path or URI on storage every node of the cluster sees "
                        "(e.g. --set storage_path=/shared/runs)", spec.storage_path)
    arguments = [python, "-m", "orchestrator", command_for(spec), str(relative)]
    if overrides:
        arguments += ["--set", *overrides]
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1", **submitted_git_state(working_dir)}  # the run's provenance
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise SpecError(file, "tracking.tracking_uri", "an MLflow server the cluster reaches, or an absolute "
                        "sqlite:////path on shared storage (without one the job uses the cluster's own "
                        "MLFLOW_TRACKING_URI)", uri)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    submission_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return Submission(submission_id, shlex.join(arguments), runtime_env)


def submit(address: str, submission: Submission, wait: bool = True) -> str:
    """Submit the job; with `wait`, stream its logs until it ends. Returns the job's status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                               submission_id=submission.submission_id, metadata={"submitted_by": "orchestrator"})
    print(f"submitted job {job_id} to {address}: {submission.entrypoint}", flush=True)
    if not wait:
        return str(client.get_job_status(job_id))
    asyncio.run(_stream_logs(client, job_id))
    status = str(client.get_job_status(job_id))
    while status not in FINAL:  # the log stream can end a moment before the status is final
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


async def _stream_logs(client: object, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
