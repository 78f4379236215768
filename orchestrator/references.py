"""Experiments that start from an earlier run: a method's path field (e.g. `init_from` of `linear_probe`,
`teacher_from` of `diffkd`, `pipeline` of `generate`) and `data.generated` may name the earlier run by its MLflow
run id, `mlflow:<run_id>`, by its experiment `name` in the same `storage_path`, `run:<name>` (so experiment files
chain without copying ids), by a registered model version it logged, `models:/NAME/VERSION` (or `@ALIAS`, or
`/latest`; see orchestrator/logged_model.py), or give a path.

An architecture search's result is referenced the same way with `best:` in front: `config.arch:
best:run:<sweep name>` (or `best:mlflow:<parent run id>`, or `best:<sweep directory>`) is the best architecture
of that finished search, so a search and the stand-alone retraining of its winner chain as two experiment files.

Before Ray starts, `resolve` replaces a reference by that run's latest complete checkpoint (for `data.generated`:
its `generated` folder, once its manifest is written). An MLflow run is found through its `run_dir` tag, which
every orchestrator run carries. The new run is linked to the earlier ones in MLflow: a tag `source.<key>` per
reference, and `source_run_id` and `mlflow.parentRunId` for the first, so the MLflow UI lists the new run under it
(when both log to the same MLflow experiment). A path inside an orchestrator run directory is linked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from orchestrator import checkpoint as ckpt_io
from orchestrator.logged_model import PREFIX as MODEL_PREFIX
from orchestrator.logged_model import run_id_of
from orchestrator.spec import ExperimentSpec, SpecError

PREFIX = "mlflow:"
RUN_PREFIX = "run:"
BEST_PREFIX = "best:"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint that was completely written (its manifests verify), or None."""
    for directory in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        try:
            ckpt_io.verify(directory)
        except (ckpt_io.CheckpointError, ValueError, OSError):
            continue
        return directory
    return None


def resolve(spec: ExperimentSpec, path: str | Path | None) -> ExperimentSpec:
    """`spec` with every reference replaced by a path (a checkpoint directory for the method's path fields, the
    `generated` folder of a generate run for `data.generated`), and the link tags."""
    config, tags, data = dict(spec.config), dict(spec.tracking.tags), spec.data
    for field, value in spec.config.items():
        if isinstance(value, str) and value.startswith(BEST_PREFIX):
            config[field], run_id = _best_architecture(spec, path, f"config.{field}", value)
            _link(tags, f"config.{field}", run_id)
    for field in spec.trainer.path_fields:
        value = config.get(field)
        if isinstance(value, str) and value:
            config[field], run_id = _resolve_one(spec, path, f"config.{field}", value, CHECKPOINT)
            _link(tags, f"config.{field}", run_id)
    if data is not None and data.generated:
        generated, run_id = _resolve_one(spec, path, "data.generated", data.generated, GENERATED)
        data = data.model_copy(update={"generated": generated})
        _link(tags, "data.generated", run_id)
    tracking = spec.tracking.model_copy(update={"tags": tags})
    return spec.model_copy(update={"config": config, "tracking": tracking, "data": data})


class Target(NamedTuple):
    """What a reference to a run means: `find(run_dir)` gives the path, or None with `wanted` in the error."""

    find: Callable[[Path], Path | None]
    wanted: str


def _generated_folder(run_dir: Path) -> Path | None:
    folder = run_dir / "generated"
    return folder if (folder / "manifest.json").is_file() else None


CHECKPOINT = Target(latest_checkpoint, "a run with a complete checkpoint")
GENERATED = Target(_generated_folder, "a generate run that finished (generated/manifest.json)")


def _resolve_one(spec: ExperimentSpec, path: str | Path | None, key: str, value: str,
                 target: Target) -> tuple[str, str | None]:
    """(the path `value` stands for, the MLflow run id of the run it belongs to, if known)."""
    if value.startswith(PREFIX):
        run_id = value.removeprefix(PREFIX)
        return str(_found(target, _run_dir_of_id(spec, path, key, run_id), path, key, value)), run_id
    if value.startswith(MODEL_PREFIX):
        run_id = _run_id_of_model(spec, path, key, value)
        return str(_found(target, _run_dir_of_id(spec, path, key, run_id), path, key, value)), run_id
    if value.startswith(RUN_PREFIX):
        value = str(_found(target, _run_dir_of_name(spec, path, key, value.removeprefix(RUN_PREFIX)), path, key,
                           value))
    return value, _run_id_near(Path(value))


def _found(target: Target, run_dir: Path, path: str | Path | None, key: str, value: str) -> Path:
    found = target.find(run_dir)
    if found is None:
        raise SpecError(path, key, f"{target.wanted} in {run_dir} (run that experiment first)", value)
    return found


def _link(tags: dict[str, str], key: str, run_id: str | None) -> None:
    """Tag the new run with its source runs: `source.<key>` each, `source_run_id` and the MLflow parent: the
    first one (the MLflow UI nests the new run under it)."""
    if run_id is None:
        return
    tags[f"source.{key}"] = run_id
    tags.setdefault("source_run_id", run_id)
    tags.setdefault("mlflow.parentRunId", run_id)


def _run_dir_of_id(spec: ExperimentSpec, path: str | Path | None, key: str, run_id: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import display_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.tracking_uri)
    found = f"{PREFIX}{run_id}"
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise SpecError(path, key, f"the id of a run in the MLflow store {display_uri(uri)}", found) from None
    run_dir = run.data.tags.get("run_dir")
    if run_dir is None or "://" in run_dir:
        raise SpecError(path, key, "a run of this orchestrator whose run directory is on a local or mounted path "
                        f"(tag run_dir: {run_dir})", found)
    return Path(run_dir)


def _run_id_of_model(spec: ExperimentSpec, path: str | Path | None, key: str, model_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import display_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.tracking_uri)
    try:
        return run_id_of(uri, model_uri)
    except MlflowException as err:
        raise SpecError(path, key, "a registered model version (models:/NAME/VERSION, models:/NAME@ALIAS or "
                        f"models:/NAME/latest) in the MLflow store {display_uri(uri)}: {err.message}",
                        model_uri) from None


def _run_dir_of_name(spec: ExperimentSpec, path: str | Path | None, key: str, name: str) -> Path:
    from orchestrator.storage import absolute, is_uri

    if is_uri(spec.storage_path):
        raise SpecError(path, key, "run:<name> with a local or mounted storage_path (give the path instead)",
                        spec.storage_path)
    return Path(absolute(spec.storage_path)) / name


def _run_id_near(checkpoint: Path) -> str | None:
    """The MLflow run of the orchestrator run directory holding `checkpoint` (a directory or its model.pt, or a
    generate run's `generated` folder)."""
    import json

    for directory in (checkpoint, *checkpoint.parents[:2]):
        remembered = directory / "mlflow_run.json"
        if remembered.is_file():
            return json.loads(remembered.read_text())["run_id"]
    return None


def _best_architecture(spec: ExperimentSpec, path: str | Path | None, key: str, value: str) -> tuple[str, str | None]:
    """("<space>:<code>" of the search's best architecture, the search's MLflow parent run id)."""
    import json

    from orchestrator.nas_search import BEST_FILE

    target = value.removeprefix(BEST_PREFIX)
    if target.startswith(PREFIX):
        sweep_dir = _run_dir_of_id(spec, path, key, target.removeprefix(PREFIX))
    elif target.startswith(RUN_PREFIX):
        sweep_dir = _run_dir_of_name(spec, path, key, target.removeprefix(RUN_PREFIX))
    else:
        sweep_dir = Path(target).expanduser()
    best_file = sweep_dir / BEST_FILE
    if not best_file.is_file():
        raise SpecError(path, key, f"an architecture search that finished with a best architecture ({best_file} "
                        "is missing: run that search first)", value)
    best = json.loads(best_file.read_text())
    return best["arch"], best.get("parent_run_id")
