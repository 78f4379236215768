"""Experiment files: YAML -> a validated, typed `ExperimentSpec` (DESIGN.md, "Experiment files").

    name: supervised-digits
    method: supervised            # a key of trainers.TRAINERS
    base: ../common.yaml          # optional; one level only
    data: {dataset: digits, image_size: 32}
    config: {arch: small_cnn}     # checked against the trainer's Config dataclass
    optim: {name: sgd, lr: 0.05, steps: 600, batch_size: 64}
    resources: {workers: 2}
    tracking: {experiment: quickstart}

Every error names the file, the dotted key, what was expected and what was found (`SpecError`), and the CLI
exits with status 2 before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

import trainers


class Shown(str):
    """A `found` value shown as written, not quoted (e.g. "an unknown key")."""

    def __repr__(self) -> str:
        return str(self)


class SpecError(ValueError):
    """A problem with an experiment file: where it is, what was expected, what was found."""

    def __init__(self, file: str | Path | None, key: str, expected: str, found: Any = dataclasses.MISSING):
        self.file, self.key, self.expected, self.found = str(file or "<overrides>"), key, expected, found
        where = f"{self.file}: {key}" if key else self.file
        shown = "" if found is dataclasses.MISSING else repr(found)
        if len(shown) > 200 and not isinstance(found, Shown):  # a long value is not echoed back in full
            shown = f"{shown[:160]}... ({len(shown)} characters)"
        found_txt = f", found {shown}" if shown else ""
        super().__init__(f"{where}: expected {expected}{found_txt}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds of counts: far above any real run, low enough that a typo (steps: 1.0e+30) is refused here rather
# than overflowing int64 or hanging a worker.
MAX_STEPS = 10**9  # optimizer steps, and intervals counted in steps: 11 days at 1 ms a step
MAX_BATCH = 2**24  # examples in a global batch (16.7 M; the largest published batches are below 2**22)
MAX_WORKERS = 2**16  # Ray Train workers (one per GPU on the largest clusters)
MAX_SEED = 2**63  # torch.manual_seed takes seeds in [0, 2**63) (and numpy's generators non-negative ones)
MAX_NAME = 128  # `name` names the run directory and MLflow run: room under the 255-byte file-name limit for the
# suffixes added to it (checkpoint_000000000, -planned, sweep trial ids, .lock)


DATASETS_NEEDING_ROOT = {"cifar10", "cifar100", "stl10", "imagefolder", "parquet", "jsonl", "voc", "cityscapes"}
SEGMENTATION_DATASETS = ("voc", "cityscapes", "shapes_seg")
NO_VALIDATION_SPLIT = (*SEGMENTATION_DATASETS, "text", "arithmetic", "jsonl")


class DataSpec(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet", "synthetic", "text", "arithmetic",
                     "jsonl", "voc", "cityscapes", "shapes_seg"]
    root: str | None = None
    download: bool = False  # cifar10/cifar100/stl10 only, on machines with internet
    image_size: int | None = Field(default=None, gt=0, le=2**16)  # None: the dataset's native size
    labeled_per_class: int | None = Field(default=None, gt=0, le=MAX_BATCH)
    labeled_fraction: float | None = Field(default=None, gt=0, le=1)
    imbalance_factor: float | None = Field(default=None, ge=1)  # long tail: n_c = n_max * IF ** (-c / (C - 1))
    # a validation split: val_per_class images of each class held out of the train set before anything else (long
    # tail, labeled subset, generated fill), drawn from the seed; eval_on: val evaluates on them instead of the test
    # set (choose hyperparameters with it, then report the test set once with the same val_per_class). shapes_seg
    # has its own validation images (below)
    val_per_class: int | None = Field(default=None, gt=0, le=MAX_BATCH)
    eval_on: Literal["test", "val"] = "test"
    # None: the method's views
    views: Literal["plain", "weak_strong", "weak_strong_multicrop", "two_crop", "weak_contrastive", "byol_two_crop",
                   "multi_crop", "sau", "tokens", "problems", "segmentation"] | None = None
    # generated images joining the training set: a folder of Parquet shards, or run:<name> / mlflow:<run_id> of a
    # `generate` run (its `generated` folder); to_head fills each class up to the largest class count
    generated: str | None = None
    generated_fill: Literal["to_head", "all"] = "to_head"
    unlabeled_ratio: int = Field(default=7, gt=0, le=1024)  # mu: unlabeled images per labeled one (weak_strong*)
    num_local_crops: int = Field(default=6, ge=0, le=256)  # multi_crop, weak_strong_multicrop
    loader_workers: int = Field(default=2, ge=0, le=1024)
    synthetic_per_class: int = Field(default=200, gt=0, le=MAX_BATCH)
    image_column: str = "image"  # parquet
    label_column: str = "label"  # parquet
    # text: documents under `root` matching text_pattern, or (root null) the Python standard library's source
    text_pattern: str = "**/*.txt"
    max_documents: int | None = Field(default=None, gt=1, le=MAX_STEPS)  # the first N documents only (quick runs)
    vocab_size: int = Field(default=8192, gt=256, le=MAX_BATCH)  # byte-level BPE trained on the train documents
    seq_len: int = Field(default=256, gt=0, le=MAX_BATCH)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    cache_dir: str | None = None  # tokenizer + Parquet shards; default ~/.cache/lab-orchestrator/text
    # arithmetic (generated problems, orchestrator/data/reasoning.py); jsonl reads root/train.jsonl, root/test.jsonl
    num_problems: int = Field(default=20000, gt=0, le=MAX_STEPS)
    num_test: int = Field(default=500, gt=0, le=MAX_STEPS)
    max_operands: int = Field(default=4, ge=2, le=64)
    max_number: int = Field(default=99, gt=0, le=10**18)
    # segmentation (voc, cityscapes, shapes_seg; orchestrator/data/segmentation.py): the labeled images are the ids of
    # labeled_list (a paper's split file, one id or image path a line; relative to root), or num_labeled (or
    # labeled_fraction) drawn from the seed; unset sizes take the dataset's (voc 321 / 0.5-1.5 / 512x512,
    # cityscapes 769 / 0.5-2.0 / 1024x2048, shapes_seg image_size / 0.5-1.5 / image_size)
    labeled_list: str | None = None
    num_labeled: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    crop_size: int | None = Field(default=None, gt=0, le=2**16)  # training crops are crop_size x crop_size
    scale_range: tuple[float, float] | None = None  # random rescale of training images before the crop
    eval_size: tuple[int, int] | None = None  # (H, W): test images shrink to fit, then are padded to it
    # shapes_seg only: the generated shapes' difficulty (the defaults: all ten shapes, radii 0.12-0.25 of the side,
    # 1-3 shapes an image, textured backgrounds); its eval_on: val scores held-out images of generator seed 2
    shapes_classes: int = Field(default=10, ge=1, le=10)  # the first k of the ten shapes (1 + k classes)
    shapes_radius: tuple[float, float] = (0.12, 0.25)
    shapes_per_image: int = Field(default=3, ge=1, le=16)
    shapes_textured: bool = True

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        subsets = [key for key in ("labeled_per_class", "labeled_fraction", "num_labeled", "labeled_list")
                   if getattr(self, key) is not None]
        if len(subsets) > 1:
            raise ValueError(f"at most one of labeled_per_class, labeled_fraction, num_labeled and labeled_list, found "
                             f"{' and '.join(subsets)}")
        self._check_segmentation()
        self._check_validation()
        if self.dataset in DATASETS_NEEDING_ROOT and not self.root:
            raise ValueError(f"a `root` directory for dataset {self.dataset!r}")
        if self.generated and (self.labeled_per_class is not None or self.labeled_fraction is not None):
            raise ValueError("`generated` images join a fully labeled training set: no labeled_per_class or "
                             "labeled_fraction with it")
        return self

    def _check_validation(self) -> None:
        if self.eval_on == "val" and self.val_per_class is None and self.dataset != "shapes_seg":
            raise ValueError("eval_on: val needs a validation split: set data.val_per_class (shapes_seg needs none: "
                             "it scores held-out generated images)")
        if self.val_per_class is not None and self.dataset in NO_VALIDATION_SPLIT:
            raise ValueError(f"val_per_class: dataset {self.dataset!r} has no classes to hold out per class "
                             f"(only the image classification datasets have a validation split)")

    def _check_segmentation(self) -> None:
        """The segmentation keys only with a segmentation dataset (the shapes_* keys: shapes_seg), and
        the classification keys that mean nothing there (labeled_per_class; image_size but for shapes_seg) not with
        one."""
        keys = ("labeled_list", "num_labeled", "crop_size", "scale_range", "eval_size")
        shapes = [key for key in ("shapes_classes", "shapes_radius", "shapes_per_image", "shapes_textured")
                  if getattr(self, key) != type(self).model_fields[key].default]
        if shapes and self.dataset != "shapes_seg":
            raise ValueError(f"{', '.join(shapes)} with dataset shapes_seg only")
        if self.dataset not in SEGMENTATION_DATASETS:
            found = [key for key in keys if getattr(self, key) is not None]
            if found:
                raise ValueError(f"{', '.join(found)} with a segmentation dataset ({', '.join(SEGMENTATION_DATASETS)})")
            return
        if self.labeled_per_class is not None:
            raise ValueError("num_labeled, labeled_fraction or labeled_list for a segmentation dataset (its images "
                             "have no single class): not labeled_per_class")
        if self.image_size is not None and self.dataset != "shapes_seg":
            raise ValueError(f"crop_size (and eval_size) for {self.dataset!r}: image_size sets shapes_seg's images")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range (low, high) with 0 < low <= high, found {list(self.scale_range)}")
        if self.eval_size is not None and min(self.eval_size) <= 0:
            raise ValueError(f"eval_size (H, W) of positive sides, found {list(self.eval_size)}")
        if not 0 < self.shapes_radius[0] <= self.shapes_radius[1] <= 0.5:
            raise ValueError(f"shapes_radius (low, high) with 0 < low <= high <= 0.5, found {list(self.shapes_radius)}")


class OptimSpec(_Strict):
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(default=0.1, gt=0)  # for the global batch size below
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    # cosine_fixmatch: cos(7πk/16K); poly: (1 - k/K) ** power (DeepLab's PolyLR, the segmentation recipes')
    schedule: Literal["cosine", "cosine_fixmatch", "poly", "step", "constant"] = "cosine"
    power: float = Field(default=0.9, gt=0)  # poly
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    # step schedule: multiply lr by gamma at these steps
    milestones: list[typing.Annotated[int, Field(ge=0, le=MAX_STEPS)]] = []
    gamma: float = Field(default=0.1, gt=0)
    steps: int = Field(gt=0, le=MAX_STEPS)
    batch_size: int = Field(gt=0, le=MAX_BATCH)  # global: split over workers and accumulation steps
    grad_accum: int = Field(default=1, gt=0, le=MAX_BATCH)
    clip_grad_norm: float | None = Field(default=None, gt=0)
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU


class DeepSpeedSpec(_Strict):
    """Train the method's module with DeepSpeed ZeRO: the DeepSpeed config is generated from `optim` (batch split,
    accumulation, clipping, bf16 on GPU when optim.amp) and these keys; `config` holds raw DeepSpeed keys, merged
    over the generated ones."""

    zero_stage: int = Field(default=2, ge=0, le=3)
    offload_optimizer: bool = False  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-Infinity; stage 3 only)
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("zero_stage 3 for offload_params")
        return self


class ResourcesSpec(_Strict):
    workers: int = Field(default=1, gt=0, le=MAX_WORKERS)
    cpus_per_worker: float = Field(default=1, gt=0, le=1024)
    gpus_per_worker: float = Field(default=0, ge=0, le=64)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(default=3, ge=-1, le=MAX_STEPS)  # -1: retry forever
    # how long the workers may wait to be placed (a busy cluster, nodes booting) before the run stops
    placement_timeout_s: float = Field(default=900, gt=0, le=7 * 24 * 3600)
    deepspeed: DeepSpeedSpec | None = None  # None: DDP


class TrialResources(_Strict):
    """Per-trial overrides of `resources:` in a sweep (unset keys keep the experiment's values)."""

    workers: int | None = Field(default=None, gt=0, le=MAX_WORKERS)
    cpus_per_worker: float | None = Field(default=None, gt=0, le=1024)
    gpus_per_worker: float | None = Field(default=None, ge=0, le=64)


class SchedulerSpec(BaseModel):
    """`name` (fifo, asha, hyperband, bohb, median, pbt, or any name in Ray's scheduler registry) plus that
    scheduler's own keyword arguments; for pbt, `mutations:` is a search space (default: `tune.space`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "fifo"


class SearcherSpec(BaseModel):
    """`name` (random, grid, optuna, hyperopt, bohb, or any name in Ray's searcher registry) plus its keyword
    arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "random"


class TuneSpec(_Strict):
    metric: str  # a reported key: eval/<name> or train/<name>
    mode: Literal["min", "max"]
    num_samples: int = Field(default=1, gt=0, le=10**6)  # with grid values: repeats of the whole grid
    max_concurrent_trials: int | None = Field(default=None, gt=0, le=10**6)  # None: as many as the cluster fits
    # steps between evaluations+checkpoints; None: eval.every
    report_every: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    space: dict[str, Any] = {}  # dotted key -> {distribution: args} (orchestrator.search_space)
    scheduler: SchedulerSpec = SchedulerSpec()
    searcher: SearcherSpec = SearcherSpec()
    resources: TrialResources = TrialResources()
    max_failures: int = Field(default=1, ge=-1, le=MAX_STEPS)  # restarts of a crashed trial from its last checkpoint
    time_budget_s: float | None = Field(default=None, gt=0)
    # one process serves trial after trial; None: yes for methods that run in the trial (table lookups, path
    # evaluation), which otherwise paid a process start and its imports each (about 3.5 s), no for Ray Train trials
    reuse_actors: bool | None = None


class RepeatSpec(_Strict):
    """`orchestrator run` trains the experiment once per seed, as one repeat (orchestrator/tune.py, "Repeats");
    `--seeds 0,1,2` overrides it."""

    seeds: list[typing.Annotated[int, Field(ge=0, lt=MAX_SEED, strict=True)]] = Field(max_length=1024)

    @field_validator("seeds")
    @classmethod
    def _each_seed_once(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("at least one seed, e.g. [0, 1, 2]")
        twice = [seed for i, seed in enumerate(seeds) if seed in seeds[:i]]
        if twice:
            raise ValueError(f"each seed once (seed {twice[0]} is listed twice)")
        return seeds


class EvalSpec(_Strict):
    every: int | None = Field(default=None, gt=0, le=MAX_STEPS)  # None: only at the end
    batch_size: int = Field(default=256, gt=0, le=MAX_BATCH)


class CheckpointSpec(_Strict):
    every: int = Field(default=500, gt=0, le=MAX_STEPS)
    keep: int = Field(default=2, gt=0, le=10**4)


class TrackingSpec(_Strict):
    experiment: str | None = None  # MLflow experiment; default: the method name
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    tags: dict[str, str] = {}
    log_model: bool = True  # a finished run logs its final model as an MLflow model (orchestrator/logged_model.py)
    # ... and registers it as a new version of this model name (the key `register`; a pydantic model's class has a
    # `register` attribute of its own, so the field takes another name)
    model_name: str | None = Field(default=None, alias="register")

    model_config = ConfigDict(**_Strict.model_config, serialize_by_alias=True, validate_by_name=False)

    @field_validator("model_name")
    @classmethod
    def _a_model_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("a registered model name of letters, digits, '_', '.' and '-'")
        return name

    @model_validator(mode="after")
    def _registering_needs_the_model(self) -> TrackingSpec:
        if self.model_name is not None and not self.log_model:
            raise ValueError(f"register: {self.model_name} needs log_model: true (the registered version is the "
                             "logged model)")
        return self


class ExperimentSpec(_Strict):
    name: str
    method: str
    seed: int = Field(default=0, ge=0, lt=MAX_SEED)
    data: DataSpec | None = None  # required by methods that train over batches; run(cfg, ctx) methods may omit it
    config: dict[str, Any] = {}
    optim: OptimSpec | None = None  # required by methods that train over batches
    resources: ResourcesSpec = ResourcesSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    log_every: int = Field(default=10, gt=0, le=MAX_STEPS)
    storage_path: str = "runs"
    tune: TuneSpec | None = None  # `orchestrator sweep` runs it; `orchestrator run` ignores it
    repeat: RepeatSpec | None = None  # `orchestrator run` trains once per seed (a repeat)
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("a name of letters, digits, '_', '.' and '-' (it names the run directory)")
        if len(name) > MAX_NAME:
            raise ValueError(f"a name of at most {MAX_NAME} characters (it names the run directory)")
        return name

    @property
    def trainer(self) -> trainers.TrainerSpec:
        return trainers.get(self.method)

    def method_config(self) -> Any:
        """The trainer's Config dataclass instance: its paper defaults overridden by `config:`."""
        return method_config(self.trainer.Config, self.config)

    @property
    def views(self) -> str:
        return (self.data.views if self.data else None) or self.trainer.views


# ---------------------------------------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Read `path` (and its `base:`), apply `--set key=value` overrides, validate everything."""
    return validate(load_raw(path, overrides), path)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys `path` sets (merged over its `base:`) with the `--set` overrides applied, not yet validated."""
    path = Path(path)
    raw = _merged_yaml(path)
    for item in overrides:
        key, value = _parse_override(item)
        set_dotted(raw, key, value, path)
    return raw


def validate(raw: dict[str, Any], path: str | Path | None = None) -> ExperimentSpec:
    """The schema: keys, types, ranges and the method's config (the `tune:` block's search space and the
    machine are checked by orchestrator.preflight)."""
    _check_values(raw, path)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise _spec_error(err, raw, path) from None
    if spec.method not in trainers.TRAINERS:
        known = ", ".join(sorted(trainers.TRAINERS))
        raise SpecError(path, "method", f"one of the known methods ({known}){did_you_mean(spec.method, trainers.TRAINERS)}", spec.method)
    method_config(spec.trainer.Config, spec.config, path)
    _check_method(spec, path)
    return spec


def _check_values(tree: Any, path: str | Path | None, key: str = "") -> None:
    """No inf or nan anywhere in the file (a learning rate, a search space, a DeepSpeed config), and no NUL
    character in a string (no path or name holds one)."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise SpecError(path, key, "a finite number", tree)
    if isinstance(tree, str) and "\0" in tree:
        raise SpecError(path, key, "text without NUL characters", tree)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for child_key, child in items:
        _check_values(child, path, f"{key}.{child_key}" if key else str(child_key))


def to_yaml(spec: ExperimentSpec) -> str:
    """The fully resolved experiment (defaults filled in), as re-read by the workers."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _merged_yaml(path: Path) -> dict[str, Any]:
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise SpecError(path, "base", "a path to another experiment file", base)
    base_path = (path.parent / base).resolve()
    if _kind(base_path) != "a file":
        raise SpecError(path, "base", "an existing file", str(base_path))
    parent = read_yaml(base_path)
    if "base" in parent:
        raise SpecError(base_path, "base", "no `base:` in a base file (one level only)", parent["base"])
    return _deep_merge(parent, raw)


def read_yaml(path: Path) -> dict[str, Any]:
    """An experiment file's keys, read by the hardened loader (`parse_yaml`)."""
    raw = parse_yaml(_read_text(path), path)
    if not isinstance(raw, dict):
        raise SpecError(path, "", "a mapping of keys at the top level", raw)
    return raw


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(None, item, "an override of the form dotted.key=value", item)
    parts = key.split(".")
    if not all(part.strip() for part in parts) or len(parts) > MAX_DEPTH:
        raise SpecError(None, key, f"a dotted key of at most {MAX_DEPTH} non-empty names (e.g. optim.lr)", key)
    if len(text.encode()) > MAX_FILE_BYTES:
        raise SpecError(None, key, f"a value of at most {MAX_FILE_BYTES // 1024} KiB", Shown(f"{len(text)} characters"))
    try:
        value = parse_yaml(text, None, tuple(parts))
    except yaml.YAMLError:
        value = text
    return key, value


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """A deep copy of `raw` with each dotted key of `overrides` set."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        set_dotted(raw, key, value, path)
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any, path: str | Path | None) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(path, ".".join(parts[: i + 1]), "a mapping to set a key inside", child)
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------- reading YAML


# Experiment files are a few KiB (the largest shipped one is under 4 KiB); PyYAML's pure-Python loader reads about
# 64 KiB a second at worst (a flow list of small numbers), so a larger file or --set value is refused, not parsed.
MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 32  # levels of nesting; the deepest real block (a DeepSpeed config in `resources`) uses about 6
YAML_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map")}


def _read_text(path: Path) -> str:
    """The file's text: at most MAX_FILE_BYTES (checked before reading it all), UTF-8."""
    found = _kind(path)
    if found != "a file":
        raise SpecError(path, "", "an existing experiment file", Shown(found))
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise SpecError(path, "", "a readable experiment file", Shown(err.strerror or str(err))) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(path, "", f"an experiment file of at most {MAX_FILE_BYTES // 1024} KiB",
                        Shown(f"{path.stat().st_size} bytes"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError(path, "", "UTF-8 text", Shown(f"byte 0x{data[err.start]:02x} on line {line}")) from None


def _kind(path: Path) -> str:
    try:
        return ("a file" if path.is_file() else "a directory" if path.is_dir() else
                "something else" if path.exists() else "nothing")
    except (OSError, ValueError) as err:  # a name too long, a NUL character
        return f"a path this system cannot look up ({getattr(err, 'strerror', None) or err})"


def parse_yaml(text: str, file: str | Path | None, prefix: tuple[str, ...] = ()) -> Any:
    """YAML read by `_ExperimentLoader`; syntax errors name the line (a SpecError), unless `file` is None (an
    override's value: yaml.YAMLError, and the value is taken as a string)."""
    try:
        loader = _ExperimentLoader(text, file, prefix)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        if file is None:
            raise
        raise SpecError(file, "", f"valid YAML (line {_error_line(err, text)}): {_problem(err)}") from None


def _error_line(err: yaml.YAMLError, text: str) -> int:
    if isinstance(err, yaml.reader.ReaderError):
        return text.count("\n", 0, err.position) + 1
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return mark.line + 1 if mark else 1


def _problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.reader.ReaderError):
        return f"{err.reason}, found character #x{err.character:04x}"
    return str(getattr(err, "problem", None) or err)


class _ExperimentLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter, for experiment files and `--set` values: each key once per mapping, plain
    scalar keys, no aliases (no experiment uses them, and they make "billion laughs" files possible), only the
    standard tags (no !!binary, !!python/..., !custom), at most MAX_DEPTH levels, every scalar a valid value of its
    type. Each refusal is a SpecError naming the dotted key and the line."""

    def __init__(self, text: str, file: str | Path | None, prefix: tuple[str, ...]):
        super().__init__(text)
        self.file, self.keys = file, list(prefix)
        self.seen: dict[int, dict[Any, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if isinstance(parent, yaml.MappingNode) and index is not None:
            self._check_once(parent, index)
        self.keys.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            line = self._check_event(self.peek_event())
            node = super().compose_node(parent, index)
            if isinstance(parent, yaml.MappingNode) and index is None and not isinstance(node, yaml.ScalarNode):
                self._refuse("plain keys (a name, not a list or mapping)", f"a complex key on line {line}")
            if isinstance(node, yaml.ScalarNode):
                self._check_value(node)
            return node
        finally:
            self.keys.pop()

    def _check_event(self, event: yaml.Event) -> int:
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            self._refuse("no YAML aliases (*name) in an experiment file", f"alias *{event.anchor} on line {line}")
        if getattr(event, "tag", None) not in (None, "!", *YAML_TAGS):
            tag = event.tag.replace("tag:yaml.org,2002:", "!!")
            self._refuse("plain values (no YAML tags but the standard ones)", f"tag {tag} on line {line}")
        if len(self.keys) > MAX_DEPTH:
            self._refuse(f"at most {MAX_DEPTH} levels of nesting", f"deeper nesting on line {line}")
        return line

    def _check_once(self, mapping: yaml.MappingNode, key: yaml.ScalarNode) -> None:
        seen = self.seen.setdefault(id(mapping), {})
        value = self.construct_object(key)
        if value in seen:
            self.keys.append(key.value)
            self._refuse("each key once in a mapping", f"it on line {seen[value]} and line {key.start_mark.line + 1}")
        seen[value] = key.start_mark.line + 1

    def _check_value(self, node: yaml.ScalarNode) -> None:
        try:
            self.construct_object(node)
        except (ValueError, OverflowError, yaml.YAMLError) as err:
            kind = node.tag.replace("tag:yaml.org,2002:", "")
            problem = _problem(err) if isinstance(err, yaml.YAMLError) else str(err).partition(":")[0]
            self._refuse(f"a valid {kind} value", f"{node.value[:40]!r} on line {node.start_mark.line + 1} ({problem})")

    def _refuse(self, expected: str, found: str) -> None:
        key = ".".join(str(k) for k in self.keys if k is not None)
        raise SpecError(self.file, key, expected, Shown(found))


# ---------------------------------------------------------------------------------------------- errors


def _spec_error(err: ValidationError, raw: dict[str, Any], path: str | Path | None) -> SpecError:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = did_you_mean(loc[-1], allowed)
        return SpecError(path, key, f"a known key{hint} (allowed here: {', '.join(allowed)})", Shown("an unknown key"))
    if first["type"] == "missing":
        return SpecError(path, key, "this required key to be set", Shown("nothing"))
    message = first["msg"]
    if first["type"] == "int_parsing_size":
        return SpecError(path, key, "an integer of at most 19 digits", first.get("input"))
    if message.startswith("Value error, "):
        return SpecError(path, key, message.removeprefix("Value error, "), first.get("input"))
    if not message.startswith("Input should"):
        return SpecError(path, key, f"a valid value ({message[0].lower()}{message[1:]})", first.get("input"))
    return SpecError(path, key, re.sub(r"^Input should (be )?", "", message), first.get("input"))


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = ExperimentSpec
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = next(t for t in (annotation, *getattr(annotation, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel))
    return [field.alias or name for name, field in model.model_fields.items()]


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def method_config(config_cls: type, values: dict[str, Any], path: str | Path | None = None) -> Any:
    """`config_cls()` (the paper's defaults) with `values` checked against its fields and their types."""
    hints = typing.get_type_hints(config_cls)
    coerced = {}
    for key, value in values.items():
        if key not in hints:
            fields = ", ".join(hints)
            raise SpecError(path, f"config.{key}", f"a field of {config_cls.__module__}.Config{did_you_mean(key, hints)} (fields: {fields})", Shown("an unknown key"))
        try:
            coerced[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            raise SpecError(path, f"config.{key}", re.sub(r"^Input should (be )?", "", err.errors()[0]["msg"]), value) from None
        _check_values(coerced[key], path, f"config.{key}")
    return dataclasses.replace(config_cls(), **coerced)


def _check_method(spec: ExperimentSpec, path: str | Path | None) -> None:
    """`data:` and `optim:` blocks for methods that train over batches; one worker for a run method that is not
    sharded."""
    if spec.trainer.run is not None and spec.resources.workers != 1 and not spec.trainer.sharded:
        raise SpecError(path, "resources.workers", f"1 (method {spec.method!r} runs as one process)",
                        spec.resources.workers)
    if spec.trainer.run is None:
        for block in ("data", "optim"):
            if getattr(spec, block) is None:
                raise SpecError(path, block, f"a `{block}:` block (method {spec.method!r} trains over batches)",
                                Shown("nothing"))
        _check_batching(spec, path)


def _check_batching(spec: ExperimentSpec, path: str | Path | None) -> None:
    per_step = spec.resources.workers * spec.optim.grad_accum
    if spec.optim.batch_size % per_step:
        raise SpecError(
            path,
            "optim.batch_size",
            f"a multiple of resources.workers x optim.grad_accum = {per_step} (the global batch is split evenly)",
            spec.optim.batch_size,
        )
