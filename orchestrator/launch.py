"""One experiment under Ray Train v2: the driver side (`launch`) and the per-worker step loop (`train_loop`).

Resume = launching the same experiment again with the same `storage_path` + `name`: Ray Train finds the run
state there and `ray.train.get_checkpoint()` returns the latest complete checkpoint. Within a run, a worker that
dies is restarted by Ray (`resources.max_failures`) from the same checkpoint. The checkpoint holds the model
(with the method's EMA teachers, queues and banks), optimizer, scheduler, step, data position and every rank's
RNG state, so a resumed run replays the lost steps exactly (with `data.loader_workers: 0`).

A loss that turns NaN or Inf stops the run without a checkpoint of the broken state, and is not retried
(orchestrator/divergence.py): the MLflow run is FAILED with the tag `stopped_reason`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from orchestrator import checkpoint as ckpt_io
from orchestrator import spec as spec_mod
from orchestrator.divergence import LossGuard, NonFiniteLossError, local_weights, no_retry_callback
from orchestrator.optim import base_lr, build_optimizer, build_scheduler, default_param_groups, load_training_state
from orchestrator.spec import ExperimentSpec, Shown, SpecError
from orchestrator.storage import RunDir, absolute

log = logging.getLogger("orchestrator")

COMPARED_ON_RESUME = ("method", "seed", "data", "config", "optim", "tune")


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

    from orchestrator.progress import ProgressBoard, ProgressWatcher
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    spec = absolute_paths(spec)
    if spec.tune is not None:
        raise SpecError(spec_file, "tune", "no `tune:` block for `orchestrator run` (run the sweep with "
                        "`orchestrator sweep`, or its base experiment once with --set tune=null name=NEW_NAME)",
                        Shown("a sweep"))
    run_dir = RunDir(spec.storage_path, spec.name)
    check_same_experiment(spec, run_dir)
    prepare_data_on_driver(spec)
    tracker = Tracker(resolve_tracking_uri(spec.tracking.tracking_uri))
    run_id, resumed = open_mlflow_run(tracker, spec, run_dir, spec_file)
    log.info("%s run %s (MLflow run %s)", "resuming" if resumed else "starting", run_dir, run_id)
    if spec.trainer.run is not None:
        return _launch_method_run(spec, tracker, run_id, run_dir, resumed)

    board = ProgressBoard.remote()
    watcher = ProgressWatcher(board, spec.optim.steps)
    loop_config = {"spec_yaml": spec_mod.to_yaml(spec), "tracking_uri": tracker.uri, "run_id": run_id, "board": board}
    watcher.start()
    result = None
    try:
        result = torch_trainer(spec, loop_config).fit()
    finally:
        watcher.stop()
        ray.kill(board)
        metrics = finish_mlflow_run(tracker, run_id, result)
    return RunOutcome(metrics, run_id, tracker.uri, str(run_dir), resumed)


def _launch_method_run(spec: ExperimentSpec, tracker: Any, run_id: str, run_dir: RunDir, resumed: bool) -> RunOutcome:
    from orchestrator.method_run import run_as_task

    metrics: dict[str, float] = {}
    try:
        metrics = run_as_task(spec, tracker.uri, run_id)
    finally:
        tracker.close(run_id, bool(metrics))
        if metrics:
            tracker.log_dict(run_id, metrics, "final_metrics.json")
    return RunOutcome(metrics, run_id, tracker.uri, str(run_dir), resumed)


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
        params.update(tracking.flatten(_asdict(spec.method_config()), "config."))
        tracker.log_params(run_id, params)
        tracker.log_text(run_id, _public_yaml(spec), "experiment.yaml")
    return run_id, resumed


def torch_trainer(spec: ExperimentSpec, loop_config: dict[str, Any], name: str | None = None,
                  storage_path: str | None = None, callbacks: tuple[Any, ...] = ()) -> Any:
    """The TorchTrainer of one run: `name` and `storage_path` default to the experiment's (a sweep gives each
    trial's runs their own), `callbacks` are Ray Train UserCallbacks. A non-finite loss is never retried."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name, storage_path = name or spec.name, storage_path or spec.storage_path
    loop_config = {**loop_config, "checkpoint_root": f"{storage_path.rstrip('/')}/{name}"}
    resources = {"CPU": spec.resources.cpus_per_worker}
    if spec.resources.gpus_per_worker:
        resources["GPU"] = spec.resources.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=spec.resources.workers,
            use_gpu=spec.resources.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=spec.resources.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress replaces Ray Train's info lines
            callbacks=[*callbacks, no_retry_callback()],
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
    """Resuming `name` with a different recipe would silently mix two experiments: refuse it."""
    current = yaml.safe_load(_public_yaml(spec))
    saved = run_dir.read("experiment.yaml")
    if saved is None:
        run_dir.write("experiment.yaml", _public_yaml(spec))
        return
    saved_spec = yaml.safe_load(saved)
    for key in COMPARED_ON_RESUME:
        if saved_spec.get(key) != current.get(key):
            raise SpecError(f"{run_dir}/experiment.yaml", key,
                            f"the same `{key}` as the run being resumed (or a new `name`)", current.get(key))


def _public_yaml(spec: ExperimentSpec) -> str:
    """The resolved experiment with secrets (API keys, tokens) replaced by ***: what is written and logged."""
    from orchestrator.tracking import redact

    return yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False)


def _asdict(config: Any) -> dict[str, Any]:
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


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker function that Ray Train runs on every rank."""
    import ray.train
    import ray.train.torch

    spec = spec_mod.validate(yaml.safe_load(loop_config["spec_yaml"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray sets OMP_NUM_THREADS, but torch may already have sized its pool
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    seed_everything(spec.seed, rank)
    setup = Setup.build(spec, device)
    engine = _engine(setup, device, rank, world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("initial_checkpoint"):  # a sweep trial restarted by Tune
        checkpoint = ray.train.Checkpoint(loop_config["initial_checkpoint"])
    position, last_checkpoint = Position(), None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            position = engine.restore(Path(directory), rank)
        last_checkpoint = (position.step, checkpoint.path)
        log.info("rank %d resumed at step %d", rank, position.step)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None, step: int) -> str | None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:09d}")
        return f"{loop_config['checkpoint_root']}/checkpoint_{step:09d}" if checkpoint_dir else None

    logger = _metric_logger(loop_config, rank, setup.data.artifacts)
    if logger is not None and position.step:
        logger.set_tag("resumed_from_step", str(position.step))
    loop = StepLoop(setup, engine, device, rank, world, report, logger, loop_config["board"], last_checkpoint)
    loop.run(position)


def _engine(setup: Setup, device: torch.device, rank: int, world: int) -> Any:
    """DeepSpeed when the experiment asks for it, else the method's module under DDP (gloo on CPU, NCCL on GPU)."""
    import ray.train.torch

    if setup.spec.resources.deepspeed is not None:
        from orchestrator.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(setup, device, world)
    step_module = ray.train.torch.prepare_model(
        TrainStep(setup.model, setup.method.train_step, setup.cfg), move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": setup.method.dynamic_graph})
    return TorchEngine(setup, step_module, device)


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
        kept = Path(checkpoint_root) / f"checkpoint_{step:09d}"
        shutil.copytree(checkpoint_dir, kept)
        return str(kept)

    engine = TorchEngine(setup, TrainStep(setup.model, setup.method.train_step, setup.cfg), device)
    StepLoop(setup, engine, device, 0, 1, report).run(Position())
    return reported


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def _metric_logger(loop_config: dict[str, Any], rank: int, artifacts: dict[str, Any]) -> Any:
    if rank != 0:
        return None
    from orchestrator.tracking import MetricLogger

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"])
    for name, obj in artifacts.items():
        logger.log_dict(obj, name)
    return logger


# (metrics, checkpoint dir or None, step) -> where the checkpoint was kept, or None
Report = Callable[[dict[str, float], Path | None, int], str | None]


class TorchEngine:
    """One optimizer step of the method's module, plain or under DDP: gradient accumulation (no_sync between
    micro-batches), bf16 autocast on GPU, clipping, optimizer and schedule; and its checkpoints (rank 0 writes the
    model and training state, every rank its RNG). The step's loss is the mean over its micro-batches, so a NaN in
    any of them shows."""

    even_eval_shards = False  # eval needs no collective inside the forward pass

    def __init__(self, setup: Setup, step_module: nn.Module, device: torch.device):
        self.setup, self.step_module, self.device = setup, step_module, device
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
        ckpt_io.save_rng(directory, rank)
        if rank == 0:
            setup = self.setup
            train_state = {"optimizer": setup.optimizer.state_dict(), "scheduler": setup.scheduler.state_dict(),
                           "step": position.step, "micro": position.micro}
            ckpt_io.save_main(directory, setup.model.state_dict(), train_state)

    def restore(self, directory: Path, rank: int) -> Position:
        model_state, train_state, rng = ckpt_io.load(directory, rank)
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
    and before each report (orchestrator/divergence.py); `last_checkpoint` is (step, path) of the checkpoint the
    run resumed from, named when it stops.
    """

    def __init__(self, setup: Setup, engine: Any, device: torch.device, rank: int, world: int,
                 report: Report, logger: Any = None, board: Any = None,
                 last_checkpoint: tuple[int, str] | None = None):
        self.setup, self.spec, self.engine, self.device = setup, setup.spec, engine, device
        self.rank, self.world, self.report, self.logger, self.board = rank, world, report, logger, board
        self.last_train: dict[str, float] = {}  # the latest logged train/* means, sent with every report
        self.micro_batch = self.spec.optim.batch_size // (world * self.spec.optim.grad_accum)
        self.guard = LossGuard(("loss", *setup.method.finite_metrics), device, world)
        self.last_checkpoint = last_checkpoint

    def run(self, position: Position) -> None:
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
        self._stop_if_diverged(position.step, weights=True)
        final = self.evaluate(position.step)
        self._report(final, position, with_checkpoint=True)
        if self.rank == 0:
            log.info("finished at step %d: %s", position.step, json.dumps(final))

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
        logs the method's figure of its first batch (`eval_figure`) as the artifact eval/figure_<step>.png."""
        setup = self.setup
        if setup.method.eval_step is None:
            return {}
        setup.model.eval()
        totals: dict[str, torch.Tensor] = {}
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

    def _report(self, metrics: dict[str, float], position: Position, with_checkpoint: bool) -> None:
        """With a checkpoint, each rank writes its part (engine.save) into its own directory, then all report: Ray
        merges the ranks' directories into one checkpoint."""
        if self.rank == 0 and metrics and self.logger is not None:
            self.logger.log(metrics, position.step)
        metrics = {**self.last_train, **metrics, "step": position.step}
        if not with_checkpoint:
            self.report(metrics, None, position.step)
            return
        directory = Path(tempfile.mkdtemp(prefix="ckpt-"))
        try:
            self.engine.save(directory, self.rank, position)
            kept = self.report(metrics, directory, position.step)
            self.last_checkpoint = (position.step, kept or "a temporary directory, since deleted")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


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
