"""Every check made before Ray starts, in one module the CLI calls (so `spec.py`, the schema at the bottom of the
package, imports nothing above it).

- `load` / `validate`: the file's schema (spec.py) and its `tune:` block (orchestrator.tune: the search space, the
  scheduler and the searcher): what `check`, `submit` and `plan` need;
- `before_ray`: what `run`, `sweep` and `search` need of this machine: no sweep file given to `run`, storage_path
  creatable and writable, the MLflow store answering, a resumed run's recorded experiment unchanged, the dataset
  and the method's own files, a search's credentials.

Every problem is a one-line SpecError naming the file and the key; nothing here waits longer than PROBE_TIMEOUT_S.
"""

from __future__ import annotations

import os
import posixpath
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

import trainers
from orchestrator import spec as spec_mod
from orchestrator.spec import DataSpec, ExperimentSpec, Shown, SpecError
from orchestrator.storage import RunDir, absolute, filesystem, is_uri
from orchestrator.tracking import display_uri, resolve_tracking_uri

PROBE_TIMEOUT_S = 5.0  # one request to an MLflow server, one probe file on storage: an answer or a clear error


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """The experiment file (its `base:` and the `--set` overrides) validated, with its `tune:` block."""
    return validate(spec_mod.load_raw(path, overrides), path)


def validate(raw: dict[str, Any], path: str | Path | None = None) -> ExperimentSpec:
    spec = spec_mod.validate(raw, path)
    if spec.tune is not None:
        from orchestrator.tune import check

        check(spec, raw, path)
    return spec


def before_ray(spec: ExperimentSpec, path: str | Path | None, command: str) -> None:
    """The checks `run`, `sweep` and `search` make on this machine (not `check`: a file may be meant for a cluster
    whose nodes have the data and the storage)."""
    if command == "run" and spec.tune is not None:
        raise SpecError(path, "tune", "no `tune:` block for `orchestrator run` (run the sweep with `orchestrator "
                        "sweep`, or its base experiment once with --set tune=null name=NEW_NAME)", Shown("a sweep"))
    if command in ("sweep", "search") and spec.repeat is not None:
        raise SpecError(path, "repeat", f"no `repeat:` block for `orchestrator {command}` (run the repeat with "
                        "`orchestrator run`; a sweep repeats its trials with seed: {grid: [0, 1, 2]} in tune.space)",
                        Shown("a repeat"))
    check_inputs(spec, path)
    check_storage(spec.storage_path, path)
    check_mlflow(path, from_file=spec.tracking.tracking_uri, flag="tracking.tracking_uri")
    check_resumed(spec, path)


# ---------------------------------------------------------------------------------------------- storage, MLflow


def check_storage(storage_path: str, path: str | Path | None) -> None:
    """storage_path holds the run directories: it is created if needed, and a probe file written and deleted."""
    try:
        _within(PROBE_TIMEOUT_S, _probe_storage, storage_path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise SpecError(path, "storage_path", "a directory this machine can create and write, or a URI of a "
                        "filesystem pyarrow supports (s3://, gs://, hdfs://, abfs://)",
                        Shown(f"{storage_path} ({_reason(err)})")) from None


def check_writable(directory: str | Path, file: str | Path | None, key: str) -> None:
    """An output directory (of `compare`, `plan`, `profile`) that can be created and written."""
    try:
        _within(PROBE_TIMEOUT_S, _probe, pafs.LocalFileSystem(), absolute(str(directory)))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise SpecError(file, key, "a directory this machine can create and write",
                        Shown(f"{directory} ({_reason(err)})")) from None


def check_mlflow(path: str | Path | None, from_flag: str | None = None, from_file: str | None = None,
                 existing: bool = False, flag: str = "--tracking-uri") -> str:
    """The tracking URI in effect (orchestrator.tracking.resolve_tracking_uri), checked, with the error naming
    where it came from (the environment, the `flag`, the file; the default is the flag's); `existing`: a sqlite
    database must be there already (for a command that only reads it)."""
    key = ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else
           "tracking.tracking_uri" if from_file and not from_flag else flag)
    uri = resolve_tracking_uri(from_flag or from_file)
    if existing and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SpecError(path, key, "an existing MLflow store (nothing has been tracked in this one)",
                        Shown(display_uri(uri)))
    check_tracking(uri, path, key)
    return uri


def check_server(url: str, path: str | Path | None, key: str) -> None:
    """An http(s):// server (a Ray dashboard) that answers within PROBE_TIMEOUT_S."""
    try:
        if not url.startswith(("http://", "https://")):
            raise ValueError("not an http:// or https:// address")
        _within(PROBE_TIMEOUT_S, _ask_server, url)
    except (OSError, ValueError) as err:
        raise SpecError(path, key, f"an http(s):// address answering within {PROBE_TIMEOUT_S:g} s",
                        Shown(f"{display_uri(url)} ({_reason(err)})")) from None


def check_tracking(uri: str, path: str | Path | None, key: str) -> None:
    """The MLflow store answers: a server one request within PROBE_TIMEOUT_S; a sqlite database or a file store
    a directory that can be created and written. Other stores (databricks, postgresql://, ...) are MLflow's."""
    try:
        if uri.startswith(("http://", "https://")):
            _within(PROBE_TIMEOUT_S, _ask_server, uri)
        elif uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
            _within(PROBE_TIMEOUT_S, _probe_sqlite, Path(uri.removeprefix("sqlite:///")))
        elif uri.startswith("file:") or not is_uri(uri):
            directory = urllib.parse.urlsplit(uri).path if uri.startswith("file:") else uri
            _within(PROBE_TIMEOUT_S, _probe, pafs.LocalFileSystem(), absolute(directory))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise SpecError(path, key, f"an MLflow store this machine reaches (a server answering within "
                        f"{PROBE_TIMEOUT_S:g} s, or a writable directory)",
                        Shown(f"{display_uri(uri)} ({_reason(err)})")) from None


def _probe_storage(storage_path: str) -> None:
    _probe(*filesystem(storage_path))


def _probe(fs: pafs.FileSystem, directory: str) -> None:
    """Create `directory`, write and delete a probe file in it, and remove the directories it created: a
    command refused later leaves nothing behind."""
    created = _missing(fs, directory.rstrip("/"))
    fs.create_dir(directory, recursive=True)
    try:
        probe = f"{directory.rstrip('/')}/.orchestrator-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"probe")
        fs.delete_file(probe)
    finally:
        for path in created:
            fs.delete_dir(path)


def _missing(fs: pafs.FileSystem, directory: str) -> list[str]:
    """`directory` and those of its parents that do not exist, deepest first."""
    missing = []
    while directory not in ("", "/") and fs.get_file_info(directory).type == pafs.FileType.NotFound:
        missing.append(directory)
        directory = posixpath.dirname(directory)
    return missing


def _probe_sqlite(database: Path) -> None:
    if database.is_dir() or (database.exists() and not os.access(database, os.R_OK | os.W_OK)):
        raise PermissionError(f"{database} is not a database file this user can write")
    _probe(pafs.LocalFileSystem(), str(database.parent))


def _ask_server(uri: str) -> None:
    """One GET of the server's /health; any HTTP answer (401 behind a proxy, say) means it is there."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # without user:password
    url = urllib.parse.urlunsplit((parts.scheme, host, f"{parts.path.rstrip('/')}/health", "", ""))
    try:
        urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return


def _within(seconds: float, call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)`, or TimeoutError when it has not returned after `seconds` (left running in a daemon thread:
    a DNS lookup or a hung NFS mount cannot be interrupted)."""
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, call(*args)))
        except Exception as err:  # noqa: BLE001 (raised again in the caller's thread below)
            outcome.append((False, err))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _reason(err: Exception) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, str):
        err = err.reason
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- inputs, resume


def check_inputs(spec: ExperimentSpec, path: str | Path | None) -> None:
    """The files the run reads on this machine: the dataset directory, generated images, the method's own files
    (`TrainerSpec.check`, e.g. a benchmark table) and a search's credentials."""
    root = spec.data.root if spec.data is not None else None
    if root and "://" not in root and not spec.data.download:
        if not Path(root).expanduser().exists():
            raise SpecError(path, "data.root", "an existing dataset directory (or data.download: true)", root)
        _check_dataset_files(spec.data.model_copy(update={"root": str(Path(root).expanduser())}), path)
    if spec.data is not None and spec.data.generated:
        _check_generated(Path(spec.data.generated).expanduser(), path)
    if spec.trainer.check is not None:
        try:
            spec.trainer.check(spec.method_config())
        except trainers.ConfigError as err:
            raise SpecError(path, f"config.{err.field}", err.expected, Shown(str(err.found))) from None
    if spec.tune is not None:
        from orchestrator.nas_search import preflight as search_preflight

        search_preflight(spec, path)


def check_resumed(spec: ExperimentSpec, path: str | Path | None) -> None:
    """A run (or sweep) directory that records an experiment is resumed only with the same recipe. Nothing is
    written here: launching records a new run's experiment."""
    if RunDir(spec.storage_path, spec.name).read("experiment.yaml") is None:
        return
    from orchestrator.launch import absolute_paths, compare_with_recorded

    resolved = absolute_paths(spec)
    compare_with_recorded(resolved, RunDir(resolved.storage_path, resolved.name))


def _check_dataset_files(data: DataSpec, path: str | Path | None) -> None:
    from orchestrator.data.sources import DataFileError, check_files

    try:
        check_files(data)
    except (FileNotFoundError, DataFileError) as err:
        raise SpecError(path, "data.root", f"readable {data.dataset} files", Shown(str(err))) from None
    except KeyError as err:  # "data.image_column: column 'img' not in FILE (columns: [...])"
        key, _, found = str(err.args[0]).partition(": ")
        raise SpecError(path, key, "a column of the Parquet files", Shown(found)) from None


def _check_generated(directory: Path, path: str | Path | None) -> None:
    from orchestrator.data import generated
    from orchestrator.data.sources import DataFileError

    try:
        generated.check(directory)
    except (FileNotFoundError, DataFileError) as err:
        raise SpecError(path, "data.generated", "a folder of generated Parquet shards (or run:<name> of a generate "
                        "run)", Shown(str(err))) from None
