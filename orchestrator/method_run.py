"""Methods that provide `run(cfg, ctx)` instead of a training step (DESIGN.md, "The trainer contract").

`MethodContext` is the Ray-side `ctx`: `report` logs to the run's MLflow run (and, in a sweep, reports to Tune),
`save`/`load` keep the method's state in the run directory. A state is written to a temporary name and renamed,
so a process that dies while saving leaves the previous state, never half of a new one. A state may hold only
tensors, dicts, lists, tuples, numbers and strings: it is read with torch.load(weights_only=True), so a state
file cannot run code when loaded, and `save` refuses a state that could not be read back.

`orchestrator run` runs the method as one Ray task with the experiment's resources; Ray retries the task
`resources.max_failures` times after a crash, and the method resumes from what it saved. A sharded method
(`TrainerSpec.sharded`, e.g. a generation job over a prompt set) runs as `resources.workers` such tasks at once,
task r with ctx.rank = r, each doing its share of the work; then one more task, of world size 1, finds every
share done and gathers the results (its metrics are the run's). Other run methods take `resources.workers: 1`.
In a sweep the trial process runs the method directly, as one process (see orchestrator/tune.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import torch
import yaml

from orchestrator import spec as spec_mod
from orchestrator.checkpoint import safe_load
from orchestrator.spec import ExperimentSpec
from orchestrator.storage import RunDir

log = logging.getLogger("orchestrator")
STATE_FILE = "method_state.pt"


class MethodContext:
    """trainers.RunContext for one process (process `rank` of `world_size` for a sharded method)."""

    def __init__(self, run_dir: RunDir, logger: Any, on_report: Callable[[dict[str, float], int], None] | None = None,
                 rank: int = 0, world_size: int = 1):
        self.run_dir, self.logger, self.on_report = run_dir, logger, on_report
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.spec: ExperimentSpec | None = None  # set by run_method: where `data()` comes from
        self._data: Any = None

    def report(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:  # None: a context without tracking (tests, benchmarks)
            self.logger.log(metrics, step)
        if self.on_report is not None:
            self.on_report(metrics, step)

    def save(self, state: dict[str, Any]) -> None:
        """Raises CheckpointError for a state that weights_only cannot load, now rather than at the resume."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        safe_load(io.BytesIO(buffer.getvalue()), "the method state to save")
        self.write_file(STATE_FILE, buffer.getvalue())

    def load(self) -> dict[str, Any] | None:
        data = self.read_file(STATE_FILE)
        return None if data is None else safe_load(io.BytesIO(data), f"{self.run_dir.path}/{STATE_FILE}")

    def write_file(self, name: str, data: bytes) -> None:
        """Written to `<name>.partial`, then renamed: a crash leaves the previous file or none, never half."""
        fs, path = self.run_dir.fs, f"{self.run_dir.path}/{name}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(f"{path}.partial") as stream:
            stream.write(data)
        fs.move(f"{path}.partial", path)

    def read_file(self, name: str) -> bytes | None:
        import pyarrow.fs as pafs

        fs, path = self.run_dir.fs, f"{self.run_dir.path}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read()

    def log_artifact(self, name: str, data: bytes) -> None:
        if self.logger is not None:
            self.logger.log_bytes(data, name)

    def data(self) -> Any:
        """The experiment's data (orchestrator.data.DataBundle), built once."""
        if self.spec is None or self.spec.data is None:
            raise ValueError(f"method {self.spec.method if self.spec else '?'!r} reads data: the experiment needs "
                             "a `data:` block")
        if self._data is None:
            from orchestrator.data import build_data

            self._data = build_data(self.spec.data, seed=self.spec.seed, views=self.spec.views)
        return self._data


def run_method(spec: ExperimentSpec, ctx: MethodContext) -> dict[str, float]:
    """The method's run(cfg, ctx) with the experiment's config; returns its final metrics."""
    torch.manual_seed(spec.seed)
    ctx.spec = spec
    return dict(spec.trainer.run(spec.method_config(), ctx))


def _run_task(spec_yaml: str, tracking_uri: str, run_id: str, run_dir: tuple[str, str], rank: int = 0,
              world_size: int = 1) -> dict[str, float]:
    from orchestrator.tracking import MetricLogger

    spec = spec_mod.validate(yaml.safe_load(spec_yaml))
    ctx = MethodContext(RunDir(*run_dir), MetricLogger(tracking_uri, run_id), rank=rank, world_size=world_size)
    return run_method(spec, ctx)


def run_as_task(spec: ExperimentSpec, tracking_uri: str, run_id: str) -> dict[str, float]:
    """Run the method as Ray tasks with the experiment's resources (one, or a sharded method's `workers` and its
    gathering pass); its state lives in the run directory."""
    import ray

    resources = spec.resources
    task = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                      max_retries=resources.max_failures, retry_exceptions=False)(_run_task)
    args = (spec_mod.to_yaml(spec), tracking_uri, run_id, (spec.storage_path, spec.name))
    if resources.workers > 1:
        ray.get([task.remote(*args, rank, resources.workers) for rank in range(resources.workers)])
    return ray.get(task.remote(*args))

