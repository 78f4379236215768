"""The final model of a run as an MLflow model, optionally registered, and `models:/` references to it.

When a run that trains over batches finishes, the driver builds the method's module on its CPU, loads the final
checkpoint into it (model.pt, or DeepSpeed's shards gathered into one fp32 state with DeepSpeed's zero_to_fp32)
and logs it as the MLflow model `model` of the run: the module pickled by mlflow.pytorch, with metadata naming the
method, its Config, the experiment and the checkpoint, and an input example (the first two test items, the
batch format the method's eval_step takes). It appears under the run's "Logged models" in the MLflow UI, and with
`tracking.register: NAME` as a new version of the registered model NAME. `tracking.log_model: false` skips it
(e.g. for models too large to keep a second copy of).

    mlflow.pytorch.load_model("models:/NAME/VERSION")   # the method's module, on the CPU

The pickle runs code when it is loaded (unlike the checkpoints, read with weights_only=True): load models from
stores you trust, with this project installed (the pickle refers to its classes).

Wherever the project accepts a run reference (a method's path fields such as init_from, teacher_from or pipeline,
and data.generated), `models:/NAME/VERSION` (or `models:/NAME@ALIAS`, `models:/NAME/latest`) names the run that
logged that model version, exactly like `mlflow:<run_id>`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator import checkpoint as ckpt_io
from orchestrator.spec import ExperimentSpec

log = logging.getLogger("orchestrator")
PREFIX = "models:/"
ARTIFACT = "model"
EXAMPLE_ITEMS = 2
# mlflow's warnings while logging a method's module: it is not a predict(DataFrame) function, so MLflow's serving
# checks of the input example fail by design, and the pickle warning is the README's
QUIET_LOGGERS = ("mlflow.models.model", "mlflow.models.signature", "mlflow.pytorch")


def log_run_model(tracker: Any, run_id: str, spec: ExperimentSpec) -> str | None:
    """After a finished run: log its final checkpoint's model (log_final_model) and tag the run `model_uri`. A
    failure here loses nothing of the run: it is logged as a warning and tagged `model_log_error`. Returns the model
    URI, or None."""
    from orchestrator.references import latest_checkpoint
    from orchestrator.storage import absolute, is_uri

    if is_uri(spec.storage_path):
        return _not_logged(tracker, run_id, f"storage_path {spec.storage_path} is not a local or mounted path")
    checkpoint = latest_checkpoint(Path(absolute(spec.storage_path)) / spec.name)
    if checkpoint is None:
        return _not_logged(tracker, run_id, "the run has no complete checkpoint")
    try:
        model_uri = log_final_model(tracker.uri, run_id, spec, checkpoint)
    except Exception as err:  # noqa: BLE001 - the run itself finished; its model is an extra
        return _not_logged(tracker, run_id, f"{type(err).__name__}: {err}")
    tracker.client.set_tag(run_id, "model_uri", model_uri)
    log.info("final model logged: %s (mlflow.pytorch.load_model(%r))", model_uri, model_uri)
    return model_uri


def _not_logged(tracker: Any, run_id: str, reason: str) -> None:
    log.warning("the final model was not logged as an MLflow model: %s", reason)
    tracker.client.set_tag(run_id, "model_log_error", reason[:5000])


def log_final_model(client_uri: str, run_id: str, spec: ExperimentSpec, checkpoint: Path) -> str:
    """Log `checkpoint`'s model as the MLflow model of run `run_id` (registered as `tracking.register` when set).
    Returns the model's URI (`models:/NAME/VERSION` when registered)."""
    import mlflow
    import mlflow.pytorch

    from orchestrator.data import build_data
    from orchestrator.launch import config_dict

    data = build_data(spec.data, spec.seed, spec.views)
    model = _load(spec.trainer.build(spec.method_config(), data.info), checkpoint)
    example = _input_example(data.test)
    metadata = {"method": spec.method, "config": config_dict(spec.method_config()), "experiment": spec.name,
                "checkpoint": str(checkpoint)}
    mlflow.set_tracking_uri(client_uri)
    with _quiet(), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(model, name=ARTIFACT, serialization_format="pickle",
                                        input_example=example, signature=mlflow.models.infer_signature(example),
                                        metadata=metadata, pip_requirements=_requirements(),
                                        registered_model_name=spec.tracking.model_name)
    if spec.tracking.model_name:
        return f"{PREFIX}{spec.tracking.model_name}/{info.registered_model_version}"
    return info.model_uri


def run_id_of(uri: str, model_uri: str) -> str:
    """The id of the run that logged the model version `model_uri` (models:/NAME/VERSION, models:/NAME@ALIAS,
    models:/NAME/latest) in the MLflow store `uri`; MlflowException when there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    name, sep, version = model_uri.removeprefix(PREFIX).rpartition("/")
    if not sep:
        name, _, alias = model_uri.removeprefix(PREFIX).partition("@")
        if not alias:
            raise MlflowException(f"{model_uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return client.get_model_version_by_alias(name, alias).run_id
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise MlflowException(f"{model_uri}: registered model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version)).run_id
    return client.get_model_version(name, version).run_id


def _load(model: nn.Module, checkpoint: Path) -> nn.Module:
    """`model` with the checkpoint's state: model.pt, or DeepSpeed's files (ZeRO 1-3: the shards gathered in fp32 by
    DeepSpeed's zero_to_fp32; ZeRO 0: the module state). DeepSpeed's keys carry the `model.` of launch.TrainStep,
    which it wrapped, and leave out non-persistent buffers, which the freshly built model already holds."""
    if (checkpoint / "model.pt").is_file():
        model.load_state_dict(ckpt_io.safe_load(checkpoint / "model.pt"))
        return model.eval()
    from orchestrator.deepspeed_engine import TAG

    shards = checkpoint / TAG
    if any(shards.glob("zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        wrapped = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    else:
        wrapped = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = {key.removeprefix("model."): value for key, value in wrapped.items()}
    missing = set(model.state_dict()) - set(state)
    buffers = {name for name, _ in model.named_buffers()}
    if missing - buffers:
        raise ckpt_io.CheckpointError(f"{checkpoint}: DeepSpeed's state lacks parameters {sorted(missing - buffers)}")
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k in missing}, **state})
    return model.eval()


def _input_example(dataset: Any) -> dict[str, Any]:
    """The first items of the test set as one batch, {key: numpy array}."""
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=EXAMPLE_ITEMS)))
    return {key: value.numpy() for key, value in batch.items()}


def _requirements() -> list[str]:
    """The packages the pickle needs: this project (its classes) and the torch it was saved with."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        project = f"lab-orchestrator=={version('lab-orchestrator')}"
    except PackageNotFoundError:
        project = "lab-orchestrator"
    return [project, f"torch=={torch.__version__.split('+')[0]}"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
