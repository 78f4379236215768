"""The trainer contract (DESIGN.md): what a method module exposes as `SPEC`.

A method is pure PyTorch. The orchestrator owns devices, DDP/DeepSpeed, the optimizer and schedule, AMP,
gradient accumulation, data loaders, checkpoints and tracking; the method owns its networks and its loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What a method may know about its data when it builds its networks."""

    num_classes: int
    image_size: int
    in_channels: int
    num_train: int  # training images (labeled + unlabeled); sizes memory banks
    num_labeled: int
    vocab_size: int = 0  # text: the tokenizer's vocabulary
    seq_len: int = 0  # text: tokens per training window
    mean: tuple[float, ...] = ()  # images: the per-channel normalisation, on the 0..1 pixel scale
    std: tuple[float, ...] = ()
    class_counts: tuple[int, ...] = ()  # images: real training images per class (long-tailed sets: the tail)


class RunContext(Protocol):
    """What a `run(cfg, ctx)` method sees of the orchestrator (a Ray-backed one, or a local one in tests). A saved
    state holds only tensors, dicts, lists, tuples, numbers and strings (it is loaded with weights_only=True).
    Outputs that other runs read (generated data) go to files of the run's directory with `write_file`."""

    is_main: bool
    device: torch.device
    rank: int  # a sharded method's process index, 0..world_size - 1
    world_size: int

    def report(self, metrics: dict[str, float], step: int) -> None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any] | None: ...

    def write_file(self, name: str, data: bytes) -> None:
        """Write `data` to `name` (a relative path, e.g. "generated/shard.parquet") in the run's directory,
        atomically: a reader sees the whole file or none."""

    def read_file(self, name: str) -> bytes | None:
        """The file `name` of the run's directory, or None when it does not exist (a resumed run skips work)."""

    def log_artifact(self, name: str, data: bytes) -> None:
        """Log `data` as the artifact `name` of the run's MLflow run (a PNG, a JSON manifest)."""

    def data(self) -> RunData:
        """The experiment's `data:` block, built for the method's views (ValueError when it has none)."""


class RunData(Protocol):
    """What `RunContext.data()` gives: torch Datasets of dict items, as a step method's batches hold them."""

    train: Any  # the method's train view
    test: Any  # {"x", "y", "idx"}
    info: DataInfo


class ConfigError(ValueError):
    """A Config value that its type cannot reject (a missing or wrong file): `check` raises it, the orchestrator
    reports it as an error in `config.<field>` of the experiment file."""

    def __init__(self, field: str, expected: str, found: Any):
        super().__init__(f"config.{field}: expected {expected}, found {found!r}")
        self.field, self.expected, self.found = field, expected, found


@dataclass(frozen=True)
class TrainerSpec:
    """One method. Either the step contract (build + train_step) or a whole-run `run(cfg, ctx)`.

    - build(cfg, info) -> nn.Module: every network, EMA teacher, queue and bank (as buffers); never `.cuda()`.
    - train_step(model, batch, cfg, step) -> (loss, metrics): pure, scalar loss, detached scalar metrics.
    - eval_step(model, batch, cfg) -> sums: per-batch sums of each metric plus the count `n`;
      the orchestrator adds them over batches and ranks and reports `eval/<key> = sum / n`.
    - on_step_end(model, cfg, step): after the optimizer step (EMA updates, queue pushes).
    - param_groups(model, cfg) -> list of dicts for the optimizer (e.g. no weight decay on norms).
    - eval_summary(means) -> more eval metrics computed from the averaged ones (e.g. perplexity = exp(loss)).
      Sums whose key starts with "_" reach eval_summary only; they are not reported (e.g. per-class pixel counts).
    - eval_figure(model, batch, cfg) -> PNG bytes of the first eval batch (e.g. predictions beside the ground
      truth), logged at each evaluation as the artifact eval/figure_<step>.png.
    - views: the data views the method trains on ("plain", "weak_strong", "two_crop", "multi_crop").
    - run(cfg, ctx) -> final metrics: the whole run, for methods that are not a step over batches; they need no
      `data:` or `optim:` block.
    - check(cfg): raises ConfigError for values the Config's types cannot reject (checked before Ray starts).
    - path_fields: Config fields holding file paths; relative ones are resolved against the driver's working
      directory (workers run elsewhere).
    - finite_metrics: train metrics that, like the loss, stop the run when NaN or Inf (the loss is always
      checked; list parts of it only where a NaN part would not already make the loss NaN).
    - sharded: a run(cfg, ctx) method that splits its work by ctx.rank (e.g. a prompt set): it runs on
      `resources.workers` processes, ctx.rank of ctx.world_size each, then once more with world_size 1, which finds
      the work done (it resumes) and gathers the results. Without it a run method is one process.
    - dynamic_graph: a step may leave parameters unused (a supernet runs one path per step): DDP then looks for
      them (find_unused_parameters). The method must run the same graph on every rank in a step.

    A param group may carry "lr_scale": its learning rate is the experiment's lr times it.
    """

    name: str
    paper: str
    Config: type
    TINY: Any
    views: str = "plain"
    build: Callable[[Any, DataInfo], nn.Module] | None = None
    train_step: Callable[[nn.Module, Batch, Any, int], tuple[torch.Tensor, dict[str, float]]] | None = None
    eval_step: Callable[[nn.Module, Batch, Any], dict[str, torch.Tensor]] | None = None
    on_step_end: Callable[[nn.Module, Any, int], None] | None = None
    param_groups: Callable[[nn.Module, Any], list[dict[str, Any]]] | None = None
    eval_summary: Callable[[dict[str, float]], dict[str, float]] | None = None
    eval_figure: Callable[[nn.Module, Batch, Any], bytes] | None = None
    run: Callable[[Any, RunContext], dict[str, float]] | None = None
    check: Callable[[Any], None] | None = None
    path_fields: tuple[str, ...] = ()
    finite_metrics: tuple[str, ...] = ()
    dynamic_graph: bool = False
    sharded: bool = False

    def __post_init__(self) -> None:
        step_contract = self.build is not None and self.train_step is not None
        if step_contract == (self.run is not None):
            raise TypeError(f"trainer {self.name!r} must define either build+train_step or run, not both or neither")
