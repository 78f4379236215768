"""Experiments that start from an earlier run: a method's path field (e.g. `init_from` of `linear_probe` or
`supervised`) may name the earlier run by its MLflow run id, `mlflow:<run_id>`, by its experiment `name` in the
same `storage_path`, `run:<name>` (so experiment files chain without copying ids), or give a checkpoint path.

Before Ray starts, `resolve` replaces a reference by that run's latest complete checkpoint (an MLflow run is found
through its `run_dir` tag, which every orchestrator run carries), and links the new run to the earlier one in
MLflow: tags `source_run_id` and `mlflow.parentRunId`, so the MLflow UI lists the new run under the earlier one
(when both log to the same MLflow experiment). A checkpoint path inside an orchestrator run directory is linked too.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator import checkpoint as ckpt_io
from orchestrator.spec import ExperimentSpec, SpecError

PREFIX = "mlflow:"
RUN_PREFIX = "run:"


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
    """`spec` with every `mlflow:<run_id>` path field replaced by a checkpoint directory, and the link tags."""
    config, tags = dict(spec.config), dict(spec.tracking.tags)
    for field in spec.trainer.path_fields:
        value = config.get(field)
        if not isinstance(value, str) or not value:
            continue
        if value.startswith(PREFIX):
            run_id = value.removeprefix(PREFIX)
            config[field] = str(_checkpoint_of_run(spec, path, field, run_id))
            tags.update({"source_run_id": run_id, "mlflow.parentRunId": run_id})
            continue
        if value.startswith(RUN_PREFIX):
            config[field] = value = str(_checkpoint_of_name(spec, path, field, value.removeprefix(RUN_PREFIX)))
        if (run_id := _run_id_near(Path(value))) is not None:
            tags.update({"source_run_id": run_id, "mlflow.parentRunId": run_id})
    return spec.model_copy(update={"config": config, "tracking": spec.tracking.model_copy(update={"tags": tags})})


def _checkpoint_of_run(spec: ExperimentSpec, path: str | Path | None, field: str, run_id: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import display_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.tracking_uri)
    key, found = f"config.{field}", f"{PREFIX}{run_id}"
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise SpecError(path, key, f"the id of a run in the MLflow store {display_uri(uri)}", found) from None
    run_dir = run.data.tags.get("run_dir")
    if run_dir is None or "://" in run_dir:
        raise SpecError(path, key, "a run of this orchestrator whose run directory is on a local or mounted path "
                        f"(tag run_dir: {run_dir})", found)
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        raise SpecError(path, key, f"a run with a complete checkpoint in {run_dir}", found)
    return checkpoint


def _checkpoint_of_name(spec: ExperimentSpec, path: str | Path | None, field: str, name: str) -> Path:
    from orchestrator.storage import absolute, is_uri

    if is_uri(spec.storage_path):
        raise SpecError(path, f"config.{field}", "run:<name> with a local or mounted storage_path (give the "
                        "checkpoint's path instead)", spec.storage_path)
    run_dir = Path(absolute(spec.storage_path)) / name
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SpecError(path, f"config.{field}", f"a run with a complete checkpoint in {run_dir} (run that "
                        "experiment first)", f"{RUN_PREFIX}{name}")
    return checkpoint


def _run_id_near(checkpoint: Path) -> str | None:
    """The MLflow run of the orchestrator run directory holding `checkpoint` (a directory or its model.pt)."""
    import json

    for directory in (checkpoint, *checkpoint.parents[:2]):
        remembered = directory / "mlflow_run.json"
        if remembered.is_file():
            return json.loads(remembered.read_text())["run_id"]
    return None
