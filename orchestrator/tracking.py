"""MLflow tracking: one MLflow run per experiment run, continued when the run resumes.

The driver opens (or reopens) the run and logs params, tags and the resolved experiment file; rank 0 of the
workers logs metrics with their steps. A resumed worker skips steps that are already in MLflow, so the metric
curves have no duplicates, and since the checkpoint restores every RNG, the replayed steps equal the logged ones.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import Any

import yaml

from orchestrator.storage import RunDir

SECRET_KEY = re.compile(r"(api[_-]?key|access[_-]?key|private[_-]?key|token|secret|password|passwd|credential|auth)",
                        re.IGNORECASE)
URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # scheme://user:password@host
REDACTED = "***"
PROJECT = Path(__file__).resolve().parents[1]  # the checkout whose code runs (its git state is the run's provenance)
# The submitting machine's git state, carried into a Ray job (whose copy of the project has no .git)
GIT_ENV = ("LAB_GIT_SHA", "LAB_GIT_DIRTY", "LAB_GIT_DIFF")
MAX_DIFF = 100_000  # characters of the uncommitted diff kept (an environment variable holds at most 128 KiB)
# MLflow 3 opens an experiment on its runs table (model training) or on GenAI traces, by this tag
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# Values that are credentials whatever their key, also inside longer strings. A `body` must look random (a digit,
# or upper and lower case letters), so that words such as "sk-learn-compatible-models" stay.
CREDENTIALS = [re.compile(r"(?<![A-Za-z0-9])" + pattern) for pattern in (
    r"sk-(?P<body>[A-Za-z0-9_-]{16,})",  # OpenAI: sk-..., sk-proj-...
    r"hf_(?P<body>[A-Za-z0-9]{16,})",  # Hugging Face
    r"gh[pousr]_(?P<body>[A-Za-z0-9]{16,})",  # GitHub: ghp_, gho_, ghu_, ghs_, ghr_
    r"github_pat_(?P<body>[A-Za-z0-9_]{16,})",
    r"glpat-(?P<body>[A-Za-z0-9_-]{16,})",  # GitLab
    r"xox[a-z]-(?P<body>[A-Za-z0-9-]{16,})",  # Slack: xoxb-, xoxp-, xoxa-, xoxs-, ...
    r"(?<=[Bb]earer )(?P<body>[A-Za-z0-9._~+/=-]{16,})",  # an HTTP Authorization header's token
    r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",  # AWS access key ids
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",  # JWT: header.payload.signature
)]
MIN_ENV_SECRET = 8  # shorter values of secret-named environment variables are not looked for


def resolve_tracking_uri(from_file: str | None) -> str:
    """$MLFLOW_TRACKING_URI, else the file's `tracking.tracking_uri`, else sqlite:///<cwd>/mlflow.db.

    Relative sqlite paths are made absolute here, on the driver: Ray workers run in other directories.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or from_file or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def display_uri(uri: str) -> str:
    """The tracking URI without credentials (user:password@host)."""
    return re.sub(r"//[^/@]+@", "//", uri)


def ui_link(uri: str, run_id: str) -> str:
    """The MLflow UI page of run `run_id`: on the tracking server itself for an http(s) store, else at `mlflow ui`'s
    default address. `workflowType=machine_learning` opens the UI in its model-training mode: MLflow 3.17's UI
    decides GenAI or model training by a switch of its own, stored per browser and starting on GenAI (traces),
    not by the experiment's `mlflow.experimentKind` tag."""
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    base = display_uri(uri).rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def redact(tree: Any, also: Iterable[str] = ()) -> Any:
    """A copy of a nested dict/list with the value of every key that looks like a secret replaced by ***, and in
    every string what `redact_text` hides. Keys are matched loosely (`max_tokens` is hidden as well): showing a
    secret costs more than hiding a number."""
    return _redact(tree, _hidden(also))


def redact_text(text: str, also: Iterable[str] = ()) -> str:
    """`text` with credentials replaced by ***: URI passwords (scheme://user:password@host), token-shaped values
    (CREDENTIALS), the values of secret-named environment variables (OPENAI_API_KEY, HF_TOKEN, ...) and the values
    in `also` (those of MIN_ENV_SECRET characters or more)."""
    return _redact_text(text, _hidden(also))


def redact_yaml(text: str) -> str:
    """A YAML file's text with secrets hidden as `redact` hides them, the comment lines that open it kept."""
    header = "".join(f"{line}\n" for line in takewhile(lambda line: line.startswith("#"), text.splitlines()))
    return redact_text(header) + yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)


def secret_env_values() -> set[str]:
    """The values of environment variables named like secrets, of MIN_ENV_SECRET characters or more, without
    whitespace, and not naming an existing file (XAUTHORITY, SSH_AUTH_SOCK)."""
    return {value for name, value in os.environ.items() if SECRET_KEY.search(name) and len(value) >= MIN_ENV_SECRET
            and not any(c.isspace() for c in value) and not os.path.exists(value)}


def _hidden(also: Iterable[str]) -> list[str]:
    return sorted(secret_env_values() | {v for v in also if len(v) >= MIN_ENV_SECRET}, key=len, reverse=True)


def _redact(tree: Any, hidden: list[str]) -> Any:
    if isinstance(tree, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and v else _redact(v, hidden) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_redact(v, hidden) for v in tree]
    if isinstance(tree, str):
        return _redact_text(tree, hidden)
    return tree


def _redact_text(text: str, hidden: list[str]) -> str:
    for value in hidden:
        text = text.replace(value, REDACTED)
    text = URI_CREDENTIALS.sub(f"{REDACTED}@", text)
    for pattern in CREDENTIALS:
        text = pattern.sub(_hide_credential, text)
    return text


def _hide_credential(match: re.Match[str]) -> str:
    body = match.groupdict().get("body")
    random_looking = body is None or any(c.isdigit() for c in body) or (body.lower() != body != body.upper())
    return REDACTED if random_looking else match.group(0)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}, with secrets replaced by ***."""
    return _flatten(redact(tree), prefix)


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else ""


def submitted_git_state(cwd: Path) -> dict[str, str]:
    """The commit, dirty flag and uncommitted diff (of tracked files, at most MAX_DIFF characters) of the project at
    `cwd`, as the environment variables a job carries them in (GIT_ENV): a job's uploaded copy has no .git."""
    sha = _git(cwd, "rev-parse", "HEAD")
    if not sha:
        return {}
    diff = _git(cwd, "diff", "HEAD")
    if len(diff) > MAX_DIFF:
        diff = diff[:MAX_DIFF] + f"\n... (the diff was {len(diff)} characters; the first {MAX_DIFF} are kept)"
    sha_env, dirty_env, diff_env = GIT_ENV
    return {sha_env: sha, dirty_env: str(bool(diff)), diff_env: diff}


def _run_git_state(cwd: Path) -> dict[str, str]:
    """GIT_ENV of the run: what a job carries from the submitting machine, else the checkout at `cwd` (empty outside
    a git checkout)."""
    sha_env, dirty_env, diff_env = GIT_ENV
    if os.environ.get(sha_env):
        return {sha_env: os.environ[sha_env], dirty_env: os.environ.get(dirty_env, "unknown"),
                diff_env: os.environ.get(diff_env, "")}
    return submitted_git_state(cwd)


def git_state(cwd: Path) -> dict[str, str]:
    """Tags git_sha and git_dirty of the run (`_run_git_state`); git_sha "unknown" without one."""
    sha_env, dirty_env, _ = GIT_ENV
    state = _run_git_state(cwd)
    return {"git_sha": state[sha_env], "git_dirty": state[dirty_env]} if state else {"git_sha": "unknown"}


def git_diff(cwd: Path) -> str:
    """The uncommitted diff the run was started with (`_run_git_state`), "" when clean or unknown."""
    return _run_git_state(cwd).get(GIT_ENV[2], "")


def ray_provenance() -> dict[str, str]:
    """Tags ray_version and, in a Ray session, ray_address (its GCS) and ray_job_id: the submission id of a job
    (`ray job submit`, `orchestrator submit`, a RayJob), else the driver's Ray job id."""
    import ray

    tags = {"ray_version": ray.__version__}
    if ray.is_initialized():
        context = ray.get_runtime_context()
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        submission = job_config.get("metadata", {}).get("job_submission_id")
        tags.update(ray_address=context.gcs_address, ray_job_id=submission or context.get_job_id())
    return tags


class Tracker:
    """The driver's side: open or reopen the run, log what describes it, close it."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def open_run(self, run_dir: RunDir, experiment: str, tags: dict[str, str],
                 run_name: str | None = None) -> tuple[str, bool]:
        """(run_id, resumed). The run id is remembered in the run directory's `mlflow_run.json`; the run is named
        `run_name`, by default after the run directory."""
        remembered = run_dir.read("mlflow_run.json")
        if remembered is not None:
            run_id = json.loads(remembered)["run_id"]
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        run = self.client.create_run(self.experiment_id(experiment), tags=redact(tags),
                                     run_name=redact_text(run_name or run_dir.path.rsplit("/", 1)[-1]))
        run_dir.write("mlflow_run.json", json.dumps({"run_id": run.info.run_id, "tracking_uri": display_uri(self.uri)}))
        return run.info.run_id, False

    def experiment_id(self, experiment: str) -> str:
        """The id of the MLflow experiment `experiment`, created (artifacts beside a sqlite store) if missing. It is
        marked as model training (EXPERIMENT_KIND), so MLflow 3's UI opens it on the runs table, not on GenAI traces;
        an experiment whose kind someone set already keeps it."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return self.client.create_experiment(experiment, self._artifacts(experiment), tags=dict([EXPERIMENT_KIND]))
        if EXPERIMENT_KIND[0] not in exp.tags:
            self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id

    def _artifacts(self, experiment: str) -> str | None:
        """Beside a sqlite database, rather than MLflow's default of ./mlruns in whatever directory the process
        runs in; a tracking server keeps its own artifact root."""
        if not self.uri.startswith("sqlite:///"):
            return None
        database = Path(self.uri.removeprefix("sqlite:///"))
        return (database.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in redact(params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, redact_text(text), name)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def log_learning_curves(self, run_id: str) -> None:
        """A PNG of every metric against its step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted(k for k in self.client.get_run(run_id).data.metrics if not k.startswith("system/"))
        if not keys:
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            history = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], marker="." if len(history) < 30 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "learning_curves.png"
            fig.savefig(path, dpi=110)
            self.client.log_artifact(run_id, str(path))
        plt.close(fig)

    def close(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class MetricLogger:
    """Rank 0's side: metrics with steps; steps at or below what MLflow already holds are skipped."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        logged = self.client.get_run(run_id).data.metrics
        self.last_step = {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in logged}

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.last_step.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            self.last_step.update({m.key: step for m in fresh})

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, redact_text(value))

    def log_bytes(self, data: bytes, name: str) -> None:
        """`data` as the artifact `name` (it may name a folder: "generated/samples.png")."""
        folder, _, file = name.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / file).write_bytes(data)
            self.client.log_artifact(self.run_id, str(Path(tmp) / file), folder or None)


class BackgroundLogger:
    """A MetricLogger on a thread of its own, for rank 0 of a run: importing MLflow and opening its store (about
    1.7 s of the quickstart's start) and every write happen off the step loop's path. Calls run in order, the
    opening first; `flush` waits for those queued and raises the first error one met (the step loop flushes before
    it reports a checkpoint, so the metrics of every step a checkpoint covers are in MLflow when it exists); `close`
    flushes and ends the thread."""

    def __init__(self, tracking_uri: str, run_id: str):
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._logger: MetricLogger | None = None
        self._submit(lambda: setattr(self, "_logger", MetricLogger(tracking_uri, run_id)))
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics, stamp = dict(metrics), int(time.time() * 1000)  # stamped when logged, not when written
        self._submit(lambda: self._logger.log(metrics, step, stamp))

    def log_dict(self, obj: Any, name: str) -> None:
        self._submit(lambda: self._logger.log_dict(obj, name))

    def set_tag(self, key: str, value: str) -> None:
        self._submit(lambda: self._logger.set_tag(key, value))

    def log_bytes(self, data: bytes, name: str) -> None:
        self._submit(lambda: self._logger.log_bytes(data, name))

    def flush(self) -> None:
        self._calls.join()
        self._raise()

    def close(self, quiet: bool = False) -> None:
        """Flush and end the thread; `quiet`: without raising a write's error (another error is on its way)."""
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()
        if not quiet:
            self._raise()

    def _submit(self, call: Callable[[], None]) -> None:
        self._raise()
        self._calls.put(call)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                if self._error is None:
                    call()
            except Exception as err:  # noqa: BLE001 - raised on the step loop's thread at its next call
                self._error = err
            finally:
                self._calls.task_done()
        self._calls.task_done()


@contextmanager
def background_logger(tracking_uri: str, run_id: str) -> Iterator[BackgroundLogger]:
    """A BackgroundLogger closed on the way out; when the block raises, that error is the one raised."""
    logger = BackgroundLogger(tracking_uri, run_id)
    try:
        yield logger
    except BaseException:
        logger.close(quiet=True)
        raise
    logger.close()


def run_tags(method: str, paper: str, dataset: str, experiment_file: str, extra: dict[str, str]) -> dict[str, str]:
    return {
        "method": method,
        "paper": paper,
        "dataset": dataset,
        "experiment_file": experiment_file,
        "host": socket.gethostname(),
        **git_state(PROJECT),
        **ray_provenance(),
        **redact(extra),
    }
