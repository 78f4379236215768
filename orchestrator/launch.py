"""One experiment under Ray Train v2: the driver side (`launch`) and the per-worker step loop (`train_loop`).

Resume = launching the same experiment again with the same `storage_path` + `name`: Ray Train finds the run
state there, and every rank resumes from the newest checkpoint in the run directory that verifies by content
(orchestrator/run_checkpoints.py; newer ones that do not are set aside). Within a run, a worker that dies is
restarted by Ray (`resources.max_failures`) the same way. The checkpoint holds the model (with the method's EMA
teachers, queues and banks), optimizer, scheduler, step, data position and every rank's RNG state, so a resumed
run replays the lost steps exactly (with `data.loader_workers: 0`).

A loss that turns NaN or Inf stops the run without a checkpoint of the broken state, and is not retried
(orchestrator/divergence.py): the MLflow run is FAILED with the tag `stopped_reason`. So does a persistent write
error while checkpointing (disk full, quota, read-only, permissions), after removing the partial checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import yaml
from torch import nn

from orchestrator import checkpoint as ckpt_io
from orchestrator import spec as spec_mod
from orchestrator.divergence import LossGuard, NonFiniteLossError, local_weights
from orchestrator.optim import base_lr, build_optimizer, build_scheduler, default_param_groups, load_training_state
from orchestrator.run_checkpoints import RunCheckpoints, fallback_message, forget_missing
from orchestrator.spec import ExperimentSpec, Shown, SpecError
from orchestrator.storage import RunDir, absolute, filesystem

log = logging.getLogger("orchestrator")

COMPARED_ON_RESUME = ("method", "seed", "data", "config", "optim", "tune")
RESULT = "result.json"  # written in the run directory when the run has finished


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class RunOutcome:
    metrics: dict[str, float]
    run_id: str
    tracking_uri: str
    run_dir: str
    resumed: bool


def launch(spec: ExperimentSpec, spec_file: str = "<memory>") -> RunOutcome:
    """Run `spec` to completion (or resume it) on the current Ray cluster and track it in MLflow.

    Raises ray.train.TrainingFailedError when the run fails more than `resources.max_failures` times; launching
    it again resumes it.
    """
    import ray

    from orchestrator.logged_model import log_run_model
    from orchestrator.progress import ProgressBoard, ProgressWatcher
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    spec = absolute_paths(spec)
    if spec.tune is not None:
        raise SpecError(spec_file, "tune", "no `tune:` block for `orchestrator run` (run the sweep with "
                        "`orchestrator sweep`, or its base experiment once with --set tune=null name=NEW_NAME)",
                        Shown("a sweep"))
    run_dir = RunDir(spec.storage_path, spec.name)
    check_same_experiment(spec, run_dir)
    wait_for_workers(spec)
    prepare_data_on_driver(spec)
    tracker = Tracker(resolve_tracking_uri(spec.tracking.tracking_uri))
    run_id, resumed = open_mlflow_run(tracker, spec, run_dir, spec_file)
    log.info("%s run %s (MLflow run %s)", "resuming" if resumed else "starting", run_dir, run_id)
    if spec.trainer.run is not None:
        return _launch_method_run(spec, tracker, run_id, run_dir, resumed)

    board = ProgressBoard.remote()
    watcher = ProgressWatcher(board, spec.optim.steps)
    loop_config = {"spec_yaml": spec_mod.to_yaml(spec), "tracking_uri": tracker.uri, "run_id": run_id, "board": board,
                   "launched_at": time.time()}
    watcher.start()
    result, reevaluation = None, None
    reevaluating = run_dir.read(RESULT) is not None
    try:
        result = torch_trainer(spec, loop_config).fit()
        reevaluation = _reevaluation(board) if reevaluating else None
        if result.error is None and not reevaluating and spec.tracking.log_model:
            log_run_model(tracker, run_id, spec)
    except Exception as err:
        _record_write_failure(tracker, run_id, spec, err)
        raise
    finally:
        watcher.stop()
        ray.kill(board)
        metrics = finish_mlflow_run(tracker, run_id, result)
    outcome = RunOutcome(metrics, run_id, tracker.uri, str(run_dir), resumed)
    if result.error is None:
        record_finished(run_dir, outcome)
    if reevaluation is not None:  # a finished run evaluated again (--reeval): shown, not stored over its result
        outcome.metrics = {**metrics, **reevaluation}
    return outcome


def _record_write_failure(tracker: Any, run_id: str, spec: ExperimentSpec, error: BaseException) -> None:
    """A run stopped by a checkpoint write error: the MLflow tag `stopped_reason` says so, and the partial
    checkpoint is removed once more now that no rank is writing (one may have been uploading while another
    removed it)."""
    failure = find_error(error, ckpt_io.CheckpointWriteError)
    if failure is None:
        return
    tracker.client.set_tag(run_id, "stopped_reason", failure.reason)
    root = f"{spec.storage_path.rstrip('/')}/{spec.name}"
    if failure.path.startswith(f"{root}/checkpoint_"):
        RunCheckpoints(root, keep=None).remove(failure.path.removeprefix(f"{root}/"))


def find_error(error: BaseException, kind: type[BaseException]) -> Any:
    """The first `kind` in what a failed Ray Train run raised: its controller's or workers' errors, causes."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if isinstance(current, kind):
            return current
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        pending += [getattr(current, "controller_failure", None), current.__cause__, current.__context__,
                    *getattr(current, "worker_failures", {}).values()]
    return None


def _reevaluation(board: Any) -> dict[str, float] | None:
    """The metrics rank 0 posted when it evaluated a finished run again, or None when its board is gone (with the
    node it ran on)."""
    import ray

    try:
        return ray.get(board.read.remote(), timeout=30).get("reevaluation")
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        log.warning("the re-evaluation's metrics were lost with the progress board: see the workers' log")
        return None


def record_finished(run_dir: RunDir, outcome: RunOutcome) -> None:
    """`result.json` in the run directory: the final metrics and where they are tracked. Running the experiment
    again answers from it without starting Ray (`finished_outcome`)."""
    run_dir.write(RESULT, json.dumps({**dataclasses.asdict(outcome), "finished_at": time.time()}))


def finished_outcome(spec: ExperimentSpec) -> tuple[RunOutcome, float] | None:
    """The stored outcome of `spec`'s run and when it finished, or None while the run has not finished."""
    stored = RunDir(spec.storage_path, spec.name).read(RESULT)
    if stored is None:
        return None
    fields = json.loads(stored)
    finished_at = fields.pop("finished_at")
    return RunOutcome(**{**fields, "resumed": True}), finished_at


def _launch_method_run(spec: ExperimentSpec, tracker: Any, run_id: str, run_dir: RunDir, resumed: bool) -> RunOutcome:
    from orchestrator.method_run import run_as_task

    metrics: dict[str, float] = {}
    try:
        metrics = run_as_task(spec, tracker.uri, run_id)
    finally:
        tracker.close(run_id, bool(metrics))
        if metrics:
            tracker.log_dict(run_id, metrics, "final_metrics.json")
    outcome = RunOutcome(metrics, run_id, tracker.uri, str(run_dir), resumed)
    record_finished(run_dir, outcome)
    return outcome


def worker_resources(resources: spec_mod.ResourcesSpec) -> dict[str, float]:
    """What one worker (a Ray Train rank, or a run method's task) holds."""
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    return per_worker


def placement_request(spec: ExperimentSpec) -> tuple[dict[str, float], int]:
    """(one worker's resources, how many must be placed at once): a Ray Train run's workers all together, a run
    method's tasks one at a time (they queue)."""
    together = spec.resources.workers if spec.trainer.run is None else 1
    return worker_resources(spec.resources), together


def wait_for_workers(spec: ExperimentSpec) -> None:
    """Until the cluster can place the run's workers, at most resources.placement_timeout_s; PlacementError names
    what was asked for and what the cluster has."""
    from orchestrator.placement import wait_for_placement

    resources = spec.resources
    wait_for_placement(*placement_request(spec), resources.placement_strategy, resources.placement_timeout_s,
                       f"run {spec.name}")


def prepare_data_on_driver(spec: ExperimentSpec) -> None:
    """Work every worker would otherwise repeat: tokenising a text corpus into the shared cache."""
    if spec.data is not None and spec.data.dataset == "text":
        from orchestrator.data import prepare_text

        prepare_text(spec.data)


def finish_mlflow_run(tracker: Any, run_id: str, result: Any) -> dict[str, float]:
    """Mark the run FINISHED (or FAILED when `result` is None or has an error); log the final metrics and a PNG
    of the learning curves. Returns the final numeric metrics."""
    ok = result is not None and result.error is None
    tracker.close(run_id, ok)
    metrics = {k: float(v) for k, v in (result.metrics if result is not None else {}).items()
               if isinstance(v, (int, float))}
    if metrics:
        tracker.log_dict(run_id, metrics, "final_metrics.json")
    tracker.log_learning_curves(run_id)
    return metrics


def open_mlflow_run(tracker: Any, spec: ExperimentSpec, run_dir: RunDir, spec_file: str, run_name: str | None = None,
                    extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Open the run's MLflow run (or reopen it on resume); a new one gets its params and experiment file.
    `extra_tags` may hold `mlflow.parentRunId` to nest it under a sweep."""
    from orchestrator import tracking

    dataset = spec.data.dataset if spec.data is not None else "none"
    tags = tracking.run_tags(spec.method, spec.trainer.paper, dataset, spec_file, spec.tracking.tags)
    tags = {**tags, "run_dir": str(run_dir), **(extra_tags or {})}  # run_dir: where `mlflow:<run_id>` finds it
    run_id, resumed = tracker.open_run(run_dir, spec.tracking.experiment or spec.method, tags, run_name)
    if not resumed:
        params = tracking.flatten({k: v for k, v in spec.model_dump(mode="json").items() if k != "config"})
        params.update(tracking.flatten(config_dict(spec.method_config()), "config."))
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, _public_yaml(spec), "experiment.yaml")
        diff = tracking.git_diff(tracking.PROJECT)
        if diff:
            tracker.log_text(run_id, diff, "git_diff.patch")
    return run_id, resumed


def torch_trainer(spec: ExperimentSpec, loop_config: dict[str, Any], name: str | None = None,
                  storage_path: str | None = None, callbacks: tuple[Any, ...] = ()) -> Any:
    """The TorchTrainer of one run: `name` and `storage_path` default to the experiment's (a sweep gives each
    trial's runs their own), `callbacks` are Ray Train UserCallbacks. A non-finite loss is never retried."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.placement import controller_failure_limit
    from orchestrator.train_callbacks import NoRetryOnDeterministicErrors

    name, storage_path = name or spec.name, storage_path or spec.storage_path
    loop_config = {**loop_config, "checkpoint_root": f"{storage_path.rstrip('/')}/{name}"}
    forget_missing(loop_config["checkpoint_root"])
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=spec.resources.workers,
            use_gpu=spec.resources.gpus_per_worker > 0,
            resources_per_worker=worker_resources(spec.resources),
            placement_strategy=spec.resources.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=spec.resources.max_failures,
                                         controller_failure_limit=controller_failure_limit(
                                             spec.resources.placement_timeout_s)),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # the step loop keeps only verified ones
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress replaces Ray Train's info lines
            callbacks=[*callbacks, NoRetryOnDeterministicErrors()],
        ),
    )


def absolute_paths(spec: ExperimentSpec) -> ExperimentSpec:
    """Workers chdir into their run directory, so relative paths (the data root, the storage path, the method's
    path fields) are resolved here, against the driver's cwd."""
    update: dict[str, Any] = {"storage_path": absolute(spec.storage_path)}
    if spec.data is not None:
        data = spec.data
        update["data"] = data.model_copy(update={"root": data.root and absolute(data.root),
                                                 "generated": data.generated and absolute(data.generated)})
    cfg = spec.method_config()
    paths = {f: absolute(getattr(cfg, f)) for f in spec.trainer.path_fields if getattr(cfg, f)}
    update["config"] = {**spec.config, **paths}
    return spec.model_copy(update=update)


def check_same_experiment(spec: ExperimentSpec, run_dir: RunDir) -> None:
    """Resuming `name` with a different recipe would silently mix two experiments: refuse it; a new run records
    its recipe."""
    if not compare_with_recorded(spec, run_dir):
        run_dir.write("experiment.yaml", _public_yaml(spec))


def compare_with_recorded(spec: ExperimentSpec, run_dir: RunDir) -> bool:
    """Whether `run_dir` records an experiment (writing nothing); a SpecError when it records another recipe."""
    saved = run_dir.read("experiment.yaml")
    if saved is None:
        return False
    current = yaml.safe_load(_public_yaml(spec))
    saved_spec = yaml.safe_load(saved)
    for key in COMPARED_ON_RESUME:
        if saved_spec.get(key) != current.get(key):
            raise SpecError(f"{run_dir}/experiment.yaml", key,
                            f"the same `{key}` as the run being resumed (or a new `name`)", current.get(key))
    return True


def _public_yaml(spec: ExperimentSpec) -> str:
    """The resolved experiment with secrets (API keys, tokens) replaced by ***: what is written and logged."""
    from orchestrator.tracking import redact

    return yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False)


def config_dict(config: Any) -> dict[str, Any]:
    """A method's Config as plain JSON values (for MLflow params and a logged model's metadata)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ---------------------------------------------------------------------------------------------- worker


class TrainStep(nn.Module):
    """Puts the method's pure `train_step` inside `forward`, so DDP sees the whole step and syncs gradients."""

    def __init__(self, model: nn.Module, train_step: Any, cfg: Any):
        super().__init__()
        self.model, self.train_step, self.cfg = model, train_step, cfg

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.train_step(self.model, batch, self.cfg, step)


@dataclass
class Position:
    """Where the run is: optimizer steps done, and micro-batches consumed (the data position)."""

    step: int = 0
    micro: int = 0


@dataclass
class Setup:
    """Everything one rank trains with, built the same way under Ray and in-process."""

    spec: ExperimentSpec
    method: Any  # trainers.TrainerSpec
    cfg: Any  # the method's Config
    data: Any  # orchestrator.data.DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @classmethod
    def build(cls, spec: ExperimentSpec, device: torch.device) -> Setup:
        from orchestrator.data import build_data

        method, cfg = spec.trainer, spec.method_config()
        data = build_data(spec.data, spec.seed, spec.views)
        model = method.build(cfg, data.info).to(device)
        groups = method.param_groups(model, cfg) if method.param_groups else default_param_groups(model)
        optimizer = build_optimizer(groups, spec.optim)
        return cls(spec, method, cfg, data, model, optimizer, build_scheduler(optimizer, spec.optim))


class RayInfoFilter(logging.Filter):
    """Drops records below WARNING that were logged from inside the ray package."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self.ray_package = str(Path(ray.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_package)


def keep_ray_info_off_the_console() -> None:
    """Ray Train's per-report lines ("Reporting training result N: TrainingReport(...)") come from a logger named by
    its file, which RunConfig's LoggingConfig level does not reach; on a worker they would interleave with the
    driver's progress. The root logger's console handlers get a RayInfoFilter; its file handlers (the Ray session's
    train logs) keep every record."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, RayInfoFilter) for f in handler.filters):
            handler.addFilter(RayInfoFilter())


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function that Ray Train runs on every rank."""
    entered = time.time()
    import ray.train
    import ray.train.torch

    from orchestrator.tracking import background_logger

    keep_ray_info_off_the_console()
    spec = spec_mod.validate(yaml.safe_load(loop_config["spec_yaml"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray sets OMP_NUM_THREADS, but torch may already have sized its pool
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    seed_everything(spec.seed, rank)
    uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    with background_logger(uri, run_id) if rank == 0 else nullcontext() as logger:  # MLflow opens meanwhile
        _train_rank(spec, {**loop_config, "entered_at": entered}, device, rank, world, logger)


def _train_rank(spec: ExperimentSpec, loop_config: dict[str, Any], device: torch.device, rank: int, world: int,
                logger: Any) -> None:
    """One rank's run under Ray Train: build, resume from the newest verified checkpoint, train, evaluate."""
    import ray.train

    setup = Setup.build(spec, device)
    engine = _engine(setup, device, rank, world)
    for name, obj in setup.data.artifacts.items() if logger is not None else ():
        logger.log_dict(obj, name)
    checkpoints = RunCheckpoints(loop_config["checkpoint_root"], spec.checkpoint.keep)
    start = _resume_point(checkpoints, loop_config.get("initial_checkpoint"), rank, world, logger)
    position, last_checkpoint = Position(), None
    if start is not None:
        with ray.train.Checkpoint(start).as_directory() as directory:
            position = engine.restore(Path(directory), rank)
        last_checkpoint = (position.step, start)
        log.info("rank %d resumed at step %d", rank, position.step)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> str | None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))
        return f"{loop_config['checkpoint_root']}/{checkpoint_name(step)}" if checkpoint_dir else None

    if logger is not None and position.step:
        logger.set_tag("resumed_from_step", str(position.step))
    if logger is not None:
        logger.log(startup_metrics(loop_config, fresh=start is None), position.step)
    loop = StepLoop(setup, engine, device, rank, world, report, logger, loop_config["board"], last_checkpoint,
                    checkpoints)
    with system_metrics(loop_config, resumed=start is not None):
        loop.run(position)


def startup_metrics(loop_config: dict[str, Any], fresh: bool) -> dict[str, float]:
    """Where a start's time went before its first step: `startup/setup_s` from the train function's start to the
    step loop (imports, data, model, process group, resume); on a fresh start of `orchestrator run` also
    `startup/workers_s`, from the driver's fit() to the train function (Ray Train's controller and worker group). A
    worker group restarted after a failure would count the training before it, so it is left out then."""
    now, entered = time.time(), loop_config["entered_at"]
    metrics = {"startup/setup_s": now - entered}
    if fresh and loop_config.get("launched_at"):
        metrics["startup/workers_s"] = entered - loop_config["launched_at"]
    return metrics


SYSTEM_METRICS_INTERVAL_S = 5.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


@contextmanager
def system_metrics(loop_config: dict[str, Any], resumed: bool) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml is installed) of every node, sampled on
    its first rank into the run's `system/` metrics (`system/node_<k>/` when the run spans several nodes), so the
    run page's System metrics tab shows them. MLflow logs a sample once an interval has passed, so a run shorter
    than one interval has none."""
    import ray.train

    context = ray.train.get_context()
    if context.get_local_rank() != 0:
        yield
        return
    nodes = context.get_world_size() // context.get_local_world_size()
    node = f"node_{context.get_node_rank()}" if nodes > 1 else None
    monitor: list[Any] = []
    starting = threading.Thread(target=lambda: monitor.append(_start_monitor(loop_config, resumed, node)),
                                name="system-metrics", daemon=True)
    starting.start()  # importing MLflow takes a second: the step loop starts meanwhile
    try:
        yield
    finally:
        starting.join()
        if monitor and monitor[0] is not None:
            monitor[0].finish()


def _start_monitor(loop_config: dict[str, Any], resumed: bool, node: str | None) -> Any:
    """A started SystemMetricsMonitor, or None (with a warning) when it cannot start: training goes on."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
        monitor = SystemMetricsMonitor(loop_config["run_id"], sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       resume_logging=resumed, node_id=node, tracking_uri=loop_config["tracking_uri"])
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - system metrics are optional
        log.warning("system metrics are not recorded: %s", err)
        return None


def _resume_point(checkpoints: RunCheckpoints, initial: str | None, rank: int, world: int, logger: Any) -> str | None:
    """The checkpoint every rank restores, chosen by rank 0: the run's newest that verifies (those newer are set
    aside, logged and tagged `checkpoint_fallback`), else a sweep trial's start checkpoint (verified too), else
    None."""
    start = None
    if rank == 0:
        name, set_aside = checkpoints.newest_verified()
        start = checkpoints.display(name) if name else initial
        if name is None and initial is not None:
            fs, path = filesystem(initial)
            ckpt_io.verify(path, fs)
        if set_aside:
            message = fallback_message(set_aside, start)
            log.warning("%s", message)
            if logger is not None:
                logger.set_tag("checkpoint_fallback", message[:5000])
    if world > 1:
        chosen = [start]
        torch.distributed.broadcast_object_list(chosen, src=0)
        start = chosen[0]
    return start


def _engine(setup: Setup, device: torch.device, rank: int, world: int) -> Any:
    """DeepSpeed when the experiment asks for it, else the method's module under DDP (gloo on CPU, NCCL on GPU)."""
    import ray.train.torch

    if setup.spec.resources.deepspeed is not None:
        from orchestrator.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(setup, device, world)
    step_module = ray.train.torch.prepare_model(
        TrainStep(setup.model, setup.method.train_step, setup.cfg), move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": setup.method.dynamic_graph})
    return TorchEngine(setup, step_module, device, world)


def train_in_process(spec: ExperimentSpec, device: torch.device | None = None,
                     checkpoint_root: Path | None = None) -> dict[str, float]:
    """The same step loop in this process, one rank, no Ray and no MLflow: for benchmarks and debugging.
    Checkpoints are written and discarded, or kept as `checkpoint_root/checkpoint_{step:09d}`; returns the final
    metrics. `resources.deepspeed` is ignored here (DeepSpeed runs in Ray workers)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(spec.seed, 0)
    setup = Setup.build(spec, device)
    reported: dict[str, float] = {}

    def report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> str | None:
        reported.update(metrics)
        if checkpoint_dir is None or checkpoint_root is None:
            return None
        kept = Path(checkpoint_root) / checkpoint_name(step)
        kept.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(str(checkpoint_dir), str(kept))  # as Ray Train stores it; an OSError keeps its errno
        return str(kept)

    engine = TorchEngine(setup, TrainStep(setup.model, setup.method.train_step, setup.cfg), device)
    checkpoints = RunCheckpoints(str(checkpoint_root), keep=None) if checkpoint_root is not None else None
    StepLoop(setup, engine, device, 0, 1, report, checkpoints=checkpoints).run(Position())
    return reported


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


# (metrics, checkpoint dir or None, step) -> where the checkpoint was kept, or None
Report = Callable[[dict[str, float], Path | None, int], str | None]


class TorchEngine:
    """One optimizer step of the method's module, plain or under DDP: gradient accumulation (no_sync between
    micro-batches), bf16 autocast on GPU, clipping, optimizer and schedule; and its checkpoints (rank 0 writes the
    model and training state, every rank its RNG). The step's loss is the mean over its micro-batches, so a NaN in
    any of them shows."""

    even_eval_shards = False  # eval needs no collective inside the forward pass

    def __init__(self, setup: Setup, step_module: nn.Module, device: torch.device, world: int = 1):
        self.setup, self.step_module, self.device, self.world = setup, step_module, device, world
        use_amp = setup.spec.optim.amp and device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    def optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]], position: Position) -> dict[str, Any]:
        setup, accum = self.setup, self.setup.spec.optim.grad_accum
        setup.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, Any] = {}
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            batch = next(batches)
            sync = i == accum - 1 or not hasattr(self.step_module, "no_sync")
            with (nullcontext() if sync else self.step_module.no_sync()), self.autocast():
                loss, metrics = self.step_module(batch, position.step)
            (loss / accum).backward()
            total += loss.detach().float()
            position.micro += 1
        if setup.spec.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(setup.model.parameters(), setup.spec.optim.clip_grad_norm)
        setup.optimizer.step()
        setup.scheduler.step()
        position.step += 1
        return {"loss": total / accum, **metrics, "lr": base_lr(setup.optimizer)}

    def save(self, directory: Path, rank: int, position: Position) -> None:
        written = ckpt_io.save_rng(directory, rank)
        if rank == 0:
            setup = self.setup
            train_state = {"optimizer": setup.optimizer.state_dict(), "scheduler": setup.scheduler.state_dict(),
                           "step": position.step, "micro": position.micro}
            written.update(ckpt_io.save_state(directory, setup.model.state_dict(), train_state))
        ckpt_io.save_rank_manifest(directory, rank, self.world, position.step, written)

    def restore(self, directory: Path, rank: int) -> Position:
        """From a checkpoint rank 0 has verified (`_resume_point`)."""
        model_state, train_state, rng = ckpt_io.read(directory, rank)
        setup = self.setup
        setup.model.load_state_dict(model_state)
        load_training_state(setup.optimizer, setup.scheduler, train_state["optimizer"], train_state["scheduler"])
        if rng is not None:
            ckpt_io.restore_rng(rng)
        return Position(train_state["step"], train_state["micro"])


class StepLoop:
    """The step loop: accumulation, AMP, logging windows, evaluation and checkpoint reports.

    `report` is called on every rank at the same steps (under Ray it is a barrier); rank 0 logs to `logger`
    (MLflow) and posts progress to `board` when they are given. A NaN or Inf loss is looked for at each log line
    and before each report (orchestrator/divergence.py); `last_checkpoint` is (step, path) of the newest verified
    checkpoint (at first the one the run resumed from), named when it stops. `checkpoints`: the run directory's,
    where rank 0 verifies each new checkpoint and prunes old ones, and a write error's partial one is removed.
    """

    def __init__(self, setup: Setup, engine: Any, device: torch.device, rank: int, world: int,
                 report: Report, logger: Any = None, board: Any = None,
                 last_checkpoint: tuple[int, str] | None = None, checkpoints: RunCheckpoints | None = None):
        self.setup, self.spec, self.engine, self.device = setup, setup.spec, engine, device
        self.rank, self.world, self.report, self.logger, self.board = rank, world, report, logger, board
        self.last_train: dict[str, float] = {}  # the latest logged train/* means, sent with every report
        self.micro_batch = self.spec.optim.batch_size // (world * self.spec.optim.grad_accum)
        self.guard = LossGuard(("loss", *setup.method.finite_metrics), device, world)
        self.last_checkpoint, self.checkpoints = last_checkpoint, checkpoints

    def run(self, position: Position) -> None:
        """Train from `position` to optim.steps, then evaluate. Started at the last step (a finished run evaluated
        again), it only evaluates: no checkpoint is written and nothing is logged twice."""
        start = position.step
        self.train(position)
        self._stop_if_diverged(position.step, weights=True)
        final = self.evaluate(position.step)
        trained = position.step > start
        if not trained and self.rank == 0 and self.board is not None:  # the driver reads it: Ray's result keeps
            self.board.post.remote({"step": position.step, "reevaluation": final})  # the checkpoint's metrics
        self._report(final, position, with_checkpoint=trained, log_metrics=trained)
        if self.rank == 0:
            log.info("finished at step %d: %s", position.step, json.dumps(final))

    def train(self, position: Position) -> None:
        """The steps from `position` to optim.steps: a log line every log_every steps, evaluation and checkpoint
        reports when they are due, and the last window's log line."""
        total = self.spec.optim.steps
        batches = step_batches(self.setup.data.train, self.micro_batch, self.rank, self.world, self.spec.seed,
                               position.micro, self.spec.data.loader_workers, self.device)
        window = Window(self.spec.optim.batch_size)
        self.setup.model.train()
        while position.step < total:
            metrics = self._optimizer_step(batches, position)
            self.guard.watch(metrics, position.step)
            window.add(metrics)
            if position.step % self.spec.log_every == 0:
                self._stop_if_diverged(position.step)
                self._log(window.flush(), position.step)
            eval_due = self.spec.eval.every and position.step % self.spec.eval.every == 0
            ckpt_due = position.step % self.spec.checkpoint.every == 0
            if position.step < total and (eval_due or ckpt_due):
                self._stop_if_diverged(position.step, weights=ckpt_due)
                reported = self.evaluate(position.step) if eval_due else {}
                self._report(reported, position, with_checkpoint=ckpt_due)
        if window.count:
            self._stop_if_diverged(position.step)
            self._log(window.flush(), position.step)

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]], position: Position) -> dict[str, Any]:
        metrics = self.engine.optimizer_step(batches, position)
        if self.setup.method.on_step_end is not None:
            self.setup.method.on_step_end(self.setup.model, self.setup.cfg, position.step)
        return metrics

    def _stop_if_diverged(self, step: int, weights: bool = False) -> None:
        """A collective, called by every rank at the same steps (a log line, an evaluation or checkpoint report,
        the end), where the loop syncs anyway: when a watched metric was NaN or Inf (or, before a checkpoint, this
        state's weights are), every rank raises NonFiniteLossError before anything of it is saved, and rank 0
        tags the MLflow run with the reason."""
        found = self.guard.first_bad(step, local_weights(self.setup.model) if weights else None)
        if found is None:
            return
        error = NonFiniteLossError(*found, self.spec.method, self.spec.name, self.last_checkpoint)
        if self.rank == 0:
            log.error("%s", error)
            if self.logger is not None:
                self.logger.set_tag("stopped_reason", error.reason)
        raise error

    def _log(self, averaged: dict[str, float], step: int) -> None:
        metrics = {f"train/{k}": v for k, v in averaged.items() if k not in ("samples_per_s", "steps_per_s")}
        metrics["train/samples_per_s"] = averaged["samples_per_s"]
        self.last_train = metrics
        if self.rank != 0:
            return
        if self.logger is not None:
            self.logger.log(metrics, step)
        if self.board is not None:
            self.board.post.remote({"step": step, **metrics, "samples_per_s": averaged["samples_per_s"],
                                    "steps_per_s": averaged["steps_per_s"]})

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """eval_step sums over this rank's share of the test set, added over ranks, divided by the count; rank 0
        logs the method's figure of its first batch (`eval_figure`) as the artifact eval/figure_<step>.png. Every
        rank evaluates with rank 0's buffers, the state a checkpoint holds, so evaluating a checkpoint again gives
        the same numbers."""
        setup = self.setup
        if setup.method.eval_step is None:
            return {}
        setup.model.eval()
        totals: dict[str, torch.Tensor] = {}
        with rank0_buffers(setup.model, self.world):
            for k, batch in enumerate(eval_batches(setup.data.test, self.spec.eval.batch_size, self.rank, self.world,
                                                   self.device, even=self.engine.even_eval_shards)):
                with self.engine.autocast():
                    sums = setup.method.eval_step(setup.model, batch, setup.cfg)
                    if k == 0 and self.rank == 0 and self.logger is not None and setup.method.eval_figure is not None:
                        figure = setup.method.eval_figure(setup.model, batch, setup.cfg)
                        self.logger.log_bytes(figure, f"eval/figure_{step:08d}.png")
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0) + value.detach().double()
        setup.model.train()
        keys = sorted(totals)
        stacked = torch.stack([totals[k] for k in keys]) if keys else torch.zeros(0, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(stacked)
        sums = dict(zip(keys, stacked.tolist()))
        count = sums.pop("n", 0.0)
        if not count:
            return {}
        means = {k: v / count for k, v in sums.items()}
        if setup.method.eval_summary is not None:
            means.update(setup.method.eval_summary(means))
        return {f"eval/{k}": v for k, v in means.items() if not k.startswith("_")}

    def _report(self, metrics: dict[str, float], position: Position, with_checkpoint: bool,
                log_metrics: bool = True) -> None:
        """With a checkpoint, each rank writes its part (engine.save) into its own directory, then all report: Ray
        merges the ranks' directories into one checkpoint."""
        if self.rank == 0 and metrics and self.logger is not None and log_metrics:
            self.logger.log(metrics, position.step)
        metrics = {**self.last_train, **metrics, "step": position.step}
        if not with_checkpoint:
            self.report(metrics, None, position.step)
            return
        directory = Path(tempfile.mkdtemp(prefix="ckpt-"))
        name = checkpoint_name(position.step)
        try:
            with self._write_errors_stop(position.step, str(directory)):
                self.engine.save(directory, self.rank, position)
            stored = self.checkpoints.display(name) if self.checkpoints else str(directory)
            if self.logger is not None:  # the metrics of every step the checkpoint covers are in MLflow first
                self.logger.flush()
            with self._write_errors_stop(position.step, stored):
                kept = self.report(metrics, directory, position.step)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if self._verified(name):
            self.last_checkpoint = (position.step, kept)

    @contextmanager
    def _write_errors_stop(self, step: int, where: str) -> Iterator[None]:
        """A persistent write error (disk full, quota, read-only, no permission) stops the run: this rank removes
        the partial checkpoint and raises CheckpointWriteError, which Ray does not retry. `where`: the directory
        being written."""
        try:
            yield
        except OSError as err:
            if not ckpt_io.is_persistent(err):
                raise
            if self.checkpoints is not None:
                self.checkpoints.remove(checkpoint_name(step))
            error = ckpt_io.write_failure(err, step, where)
            log.error("rank %d: %s", self.rank, error)
            raise error from None

    def _verified(self, name: str) -> bool:
        """After every rank's part is stored: rank 0 verifies the new checkpoint (and then deletes those beyond
        `checkpoint.keep`), and all ranks learn whether it did verify. One that does not is set aside."""
        if self.checkpoints is None:
            return False
        if self.world > 1:
            torch.distributed.barrier()  # every rank's upload is done
        verdict = [self.rank == 0 and self._verify_and_prune(name)]
        if self.world > 1:
            torch.distributed.broadcast_object_list(verdict, src=0)
        return verdict[0]

    def _verify_and_prune(self, name: str) -> bool:
        try:
            self.checkpoints.check(name)
        except ckpt_io.CorruptCheckpointError as err:
            set_aside = self.checkpoints.set_aside(name, str(err))
            log.error("the checkpoint just written %s did not verify (%s); set aside as %s", name, err,
                      set_aside.moved_to)
            return False
        self.checkpoints.prune()
        return True


@contextmanager
def rank0_buffers(model: nn.Module, world: int) -> Iterator[None]:
    """Rank 0's buffers on every rank while inside, this rank's own put back after. DDP broadcasts the buffers at
    the start of each training forward pass, but each rank's BatchNorm then updates its running statistics with its
    own batch, so after a step the ranks' statistics differ and only rank 0's reach the checkpoint."""
    if world == 1:
        yield
        return
    buffers = [b for b in model.buffers() if b.numel()]
    own = [b.clone() for b in buffers]
    for b in buffers:
        torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        for b, saved in zip(buffers, own):
            b.copy_(saved)


class Window:
    """Running means of the step metrics between two log lines, plus throughput."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)
        self.count += 1

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        means["steps_per_s"] = self.count / elapsed
        means["samples_per_s"] = self.count * self.global_batch / elapsed
        self.sums, self.count, self.started = {}, 0, time.perf_counter()
        return means


# ---------------------------------------------------------------------------------------------- data order


def epoch_order(n: int, micro_batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded permutation, split over ranks, incomplete batches dropped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutation = torch.randperm(n, generator=generator)
    per_rank = (n // world) // micro_batch * micro_batch
    if per_rank == 0:
        raise ValueError(f"{n} training items cannot fill one micro-batch of {micro_batch} on each of {world} workers")
    return permutation[rank::world][:per_rank].view(-1, micro_batch).tolist()


def step_batches(dataset: Any, micro_batch: int, rank: int, world: int, seed: int, start_micro: int,
                 loader_workers: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches forever, starting at micro-batch `start_micro` (the resumed data position)."""
    per_epoch = len(epoch_order(len(dataset), micro_batch, rank, world, seed, 0))
    epoch, offset = divmod(start_micro, per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = epoch_order(len(dataset), micro_batch, rank, world, seed, epoch)[offset:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=loader_workers,
                                             pin_memory=device.type == "cuda")
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        epoch, offset = epoch + 1, 0


def eval_batches(dataset: Any, batch_size: int, rank: int, world: int, device: torch.device,
                 even: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the test set (every world-th item), each item exactly once over all ranks. `even`
    drops the last len % world items so every rank runs as many forward passes (ZeRO-3 gathers parameters
    collectively inside each one)."""
    end = len(dataset) - len(dataset) % world if even else len(dataset)
    shard = torch.utils.data.Subset(dataset, range(rank, end, world))
    for batch in torch.utils.data.DataLoader(shard, batch_size=batch_size):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
