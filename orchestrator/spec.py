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
        found_txt = "" if found is dataclasses.MISSING else f", found {found!r}"
        super().__init__(f"{where}: expected {expected}{found_txt}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DATASETS_NEEDING_ROOT = {"cifar10", "cifar100", "stl10", "imagefolder", "parquet", "jsonl", "voc", "cityscapes"}
SEGMENTATION_DATASETS = ("voc", "cityscapes", "shapes_seg")


class DataSpec(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet", "synthetic", "text", "arithmetic",
                     "jsonl", "voc", "cityscapes", "shapes_seg"]
    root: str | None = None
    download: bool = False  # cifar10/cifar100/stl10 only, on machines with internet
    image_size: int | None = Field(default=None, gt=0)  # None: the dataset's native size
    labeled_per_class: int | None = Field(default=None, gt=0)
    labeled_fraction: float | None = Field(default=None, gt=0, le=1)
    imbalance_factor: float | None = Field(default=None, ge=1)  # long tail: n_c = n_max * IF ** (-c / (C - 1))
    # None: the method's views
    views: Literal["plain", "weak_strong", "weak_strong_multicrop", "two_crop", "weak_contrastive", "byol_two_crop",
                   "multi_crop", "sau", "tokens", "problems", "segmentation"] | None = None
    # generated images joining the training set: a folder of Parquet shards, or run:<name> / mlflow:<run_id> of a
    # `generate` run (its `generated` folder); to_head fills each class up to the largest class count
    generated: str | None = None
    generated_fill: Literal["to_head", "all"] = "to_head"
    unlabeled_ratio: int = Field(default=7, gt=0)  # mu: unlabeled images per labeled one (weak_strong*)
    num_local_crops: int = Field(default=6, ge=0)  # multi_crop, weak_strong_multicrop
    loader_workers: int = Field(default=2, ge=0)
    synthetic_per_class: int = Field(default=200, gt=0)
    image_column: str = "image"  # parquet
    label_column: str = "label"  # parquet
    # text: documents under `root` matching text_pattern, or (root null) the Python standard library's source
    text_pattern: str = "**/*.txt"
    max_documents: int | None = Field(default=None, gt=1)  # the first N documents only (quick runs)
    vocab_size: int = Field(default=8192, gt=256)  # byte-level BPE trained on the train documents
    seq_len: int = Field(default=256, gt=0)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    cache_dir: str | None = None  # tokenizer + Parquet shards; default ~/.cache/lab-orchestrator/text
    # arithmetic (generated problems, orchestrator/data/reasoning.py); jsonl reads root/train.jsonl, root/test.jsonl
    num_problems: int = Field(default=20000, gt=0)
    num_test: int = Field(default=500, gt=0)
    max_operands: int = Field(default=4, ge=2)
    max_number: int = Field(default=99, gt=0)
    # segmentation (voc, cityscapes, shapes_seg; orchestrator/data/segmentation.py): the labeled images are the ids of
    # labeled_list (a paper's split file, one id or image path a line; relative to root), or num_labeled (or
    # labeled_fraction) drawn from the seed; unset sizes take the dataset's (voc 321 / 0.5-1.5 / 512x512,
    # cityscapes 769 / 0.5-2.0 / 1024x2048, shapes_seg image_size / 0.5-1.5 / image_size)
    labeled_list: str | None = None
    num_labeled: int | None = Field(default=None, gt=0)
    crop_size: int | None = Field(default=None, gt=0)  # training crops are crop_size x crop_size
    scale_range: tuple[float, float] | None = None  # random rescale of training images before the crop
    eval_size: tuple[int, int] | None = None  # (H, W): test images shrink to fit, then are padded to it

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        subsets = [key for key in ("labeled_per_class", "labeled_fraction", "num_labeled", "labeled_list")
                   if getattr(self, key) is not None]
        if len(subsets) > 1:
            raise ValueError(f"at most one of labeled_per_class, labeled_fraction, num_labeled and labeled_list, found "
                             f"{' and '.join(subsets)}")
        self._check_segmentation()
        if self.dataset in DATASETS_NEEDING_ROOT and not self.root:
            raise ValueError(f"a `root` directory for dataset {self.dataset!r}")
        if self.generated and (self.labeled_per_class is not None or self.labeled_fraction is not None):
            raise ValueError("`generated` images join a fully labeled training set: no labeled_per_class or "
                             "labeled_fraction with it")
        return self

    def _check_segmentation(self) -> None:
        """The segmentation keys only with a segmentation dataset, and the classification keys that mean nothing
        there (labeled_per_class; image_size but for shapes_seg) not with one."""
        keys = ("labeled_list", "num_labeled", "crop_size", "scale_range", "eval_size")
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
    warmup_steps: int = Field(default=0, ge=0)
    milestones: list[int] = []  # step schedule: multiply lr by gamma at these steps
    gamma: float = Field(default=0.1, gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # global: split over workers and accumulation steps
    grad_accum: int = Field(default=1, gt=0)
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
    workers: int = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(default=3, ge=-1)  # -1: retry forever
    deepspeed: DeepSpeedSpec | None = None  # None: DDP


class TrialResources(_Strict):
    """Per-trial overrides of `resources:` in a sweep (unset keys keep the experiment's values)."""

    workers: int | None = Field(default=None, gt=0)
    cpus_per_worker: float | None = Field(default=None, gt=0)
    gpus_per_worker: float | None = Field(default=None, ge=0)


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
    num_samples: int = Field(default=1, gt=0)  # with grid values: repeats of the whole grid
    max_concurrent_trials: int | None = Field(default=None, gt=0)  # None: as many as the cluster fits
    report_every: int | None = Field(default=None, gt=0)  # steps between evaluations+checkpoints; None: eval.every
    space: dict[str, Any] = {}  # dotted key -> {distribution: args} (orchestrator.search_space)
    scheduler: SchedulerSpec = SchedulerSpec()
    searcher: SearcherSpec = SearcherSpec()
    resources: TrialResources = TrialResources()
    max_failures: int = Field(default=1, ge=-1)  # restarts of a crashed trial from its last checkpoint
    time_budget_s: float | None = Field(default=None, gt=0)


class EvalSpec(_Strict):
    every: int | None = Field(default=None, gt=0)  # None: only at the end
    batch_size: int = Field(default=256, gt=0)


class CheckpointSpec(_Strict):
    every: int = Field(default=500, gt=0)
    keep: int = Field(default=2, gt=0)


class TrackingSpec(_Strict):
    experiment: str | None = None  # MLflow experiment; default: the method name
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    tags: dict[str, str] = {}


class ExperimentSpec(_Strict):
    name: str
    method: str
    seed: int = 0
    data: DataSpec | None = None  # required by methods that train over batches; run(cfg, ctx) methods may omit it
    config: dict[str, Any] = {}
    optim: OptimSpec | None = None  # required by methods that train over batches
    resources: ResourcesSpec = ResourcesSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    log_every: int = Field(default=10, gt=0)
    storage_path: str = "runs"
    tune: TuneSpec | None = None  # `orchestrator sweep` runs it; `orchestrator run` ignores it
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("a name of letters, digits, '_', '.' and '-' (it names the run directory)")
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
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise _spec_error(err, raw, path) from None
    if spec.method not in trainers.TRAINERS:
        known = ", ".join(sorted(trainers.TRAINERS))
        raise SpecError(path, "method", f"one of the known methods ({known}){did_you_mean(spec.method, trainers.TRAINERS)}", spec.method)
    method_config(spec.trainer.Config, spec.config, path)
    _check_method(spec, path)
    if spec.tune is not None:
        from orchestrator.tune import check

        check(spec, raw, path)
    return spec


def preflight(spec: ExperimentSpec, path: str | Path | None) -> None:
    """The checks that read this machine, made by `run`, `sweep` and `search` before Ray starts (not by `check`
    or `validate`: a file may be meant for a cluster whose nodes have the data): the dataset directory, the
    method's own files (`TrainerSpec.check`, e.g. a benchmark table) and a search's credentials."""
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


def to_yaml(spec: ExperimentSpec) -> str:
    """The fully resolved experiment (defaults filled in), as re-read by the workers."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _merged_yaml(path: Path) -> dict[str, Any]:
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise SpecError(path, "base", "a path to another experiment file", base)
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise SpecError(path, "base", "an existing file", str(base_path))
    parent = _read_yaml(base_path)
    if "base" in parent:
        raise SpecError(base_path, "base", "no `base:` in a base file (one level only)", parent["base"])
    return _deep_merge(parent, raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(path, "", "an existing experiment file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(path, "", f"valid YAML{line}: {getattr(err, 'problem', err)}") from None
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
    if not sep or not key.strip():
        raise SpecError(None, item, "an override of the form dotted.key=value", item)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return key.strip(), value


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
    if message.startswith("Value error, "):
        return SpecError(path, key, message.removeprefix("Value error, "), first.get("input"))
    expected = re.sub(r"^Input should (be )?", "", message)
    return SpecError(path, key, expected, first.get("input"))


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = ExperimentSpec
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = next(t for t in (annotation, *getattr(annotation, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel))
    return list(model.model_fields)


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
