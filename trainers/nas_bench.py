"""Tabular NAS benchmarks as a method: a trial "trains" an architecture by looking it up in the benchmark's file.

NAS-Bench-Macro, Channel-Bench-Macro and NAS-Bench-201 (../shared/papers/methods_nas_gen_llm.md section 2) list
the accuracy every architecture of their space reached when trained stand-alone. Searching on them costs seconds,
so searchers (GENIUS, random, evolution, TPE) can be compared over many seeds. The experiment names the
architecture as `config.arch: <space>:<code>` (a search sets it per trial) and the benchmark's own file as
`config.table`; users point it at their copies of the files.

Reported (accuracies as fractions, like the training methods' eval/acc):
- eval/acc: the accuracy a searcher sees. NAS-Bench-Macro `mean_acc` and Channel-Bench `mean` (mean test
  accuracy over 3 seeds); NAS-Bench-201 `val_acc_200` (selection on validation, as GENIUS does).
- eval/test_acc: NAS-Bench-201's `test_acc_200` (the number papers report); for the others the same as eval/acc.
- eval/acc_std (where the file has it), eval/mflops and eval/params_m (the file's, else counted on the network).
- eval/rank: 1 + the number of table entries with a strictly higher eval/acc (ties share a rank; the official
  GENIUS code's argsort().argsort() gives tied duplicates arbitrary distinct ranks), and eval/top_percent.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from trainers._common.contract import ConfigError, RunContext, TrainerSpec
from trainers.nas import InvalidArchitecture, SearchSpace, get_space, parse_arch_value


@dataclass(frozen=True)
class TableFormat:
    """Field names of one benchmark's JSON file: {key: {field: value}}."""

    accuracy: str  # what a searcher optimises
    test_accuracy: str | None = None  # reported separately when it differs
    std: str | None = None
    flops: str | None = None  # in FLOPs (MACs) as the file counts them
    params: str | None = None  # in parameters


TABLE_FORMATS: dict[str, TableFormat] = {
    "nas_bench_macro": TableFormat("mean_acc", std="std", flops="flops", params="params"),
    "channel_bench_res": TableFormat("mean", std="std", flops="flops", params="params"),
    "channel_bench_mob": TableFormat("mean", std="std", flops="flops", params="params"),
    "nas_bench_201": TableFormat("val_acc_200", test_accuracy="test_acc_200"),
}


@dataclass
class Config:
    """Which architecture to look up, in which benchmark file (no training hyperparameters: nothing is trained)."""

    arch: str = "nas_bench_macro:00000000"  # <space>:<code>; a search sets it per trial
    table: str = "../shared/data/nas-bench-macro_cifar10.json"  # the benchmark's own JSON file


TINY = Config()


@dataclass(frozen=True)
class Table:
    space: SearchSpace
    format: TableFormat
    entries: dict[str, dict[str, Any]]
    sorted_accuracies: tuple[float, ...]  # ascending, for ranks

    def rank(self, accuracy: float) -> int:
        higher = len(self.sorted_accuracies) - bisect.bisect_right(self.sorted_accuracies, accuracy)
        return 1 + higher


def check(cfg: Config) -> None:
    try:
        space, _ = parse_arch_value(cfg.arch)
    except (KeyError, InvalidArchitecture) as err:
        raise ConfigError("arch", "<space>:<code> of a known space", f"{cfg.arch} ({err.args[0]})") from None
    load_table(cfg.table, space.name)


def load_table(path: str, space_name: str) -> Table:
    """The benchmark file at `path`, checked against the space (cached per file version)."""
    if space_name not in TABLE_FORMATS:
        raise ConfigError("arch", f"a space with a benchmark table ({', '.join(TABLE_FORMATS)})", space_name)
    try:
        stat = os.stat(path)
    except OSError as err:
        raise ConfigError("table", f"the {space_name} benchmark's JSON file", f"{path} ({err.strerror})") from None
    return _load_table(os.path.abspath(path), space_name, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_table(path: str, space_name: str, _mtime: int, _size: int) -> Table:
    space, fmt = get_space(space_name), TABLE_FORMATS[space_name]
    try:
        with open(path) as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("table", f"a JSON file (the {space_name} benchmark)", f"{path} ({err})") from None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError("table", "a JSON object {architecture: {field: value}}", f"{path} ({type(entries).__name__})")
    first_key, first = next(iter(entries.items()))
    if not isinstance(first, dict) or fmt.accuracy not in first:
        fields = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ConfigError("table", f"the {space_name} benchmark: entries with the field {fmt.accuracy!r}",
                          f"{path} (entry {first_key!r} has {fields})")
    if len(entries) != space.size():
        raise ConfigError("table", f"the {space_name} benchmark: {space.size()} architectures",
                          f"{path} ({len(entries)} entries)")
    accuracies = tuple(sorted(float(e[fmt.accuracy]) for e in entries.values()))
    return Table(space, fmt, entries, accuracies)


def lookup(table: Table, code: str) -> dict[str, float]:
    """The eval/* metrics of architecture `code`."""
    key = table.space.table_key(code)
    if key not in table.entries:
        raise KeyError(f"{key!r} is not in the {table.space.name} table")
    entry, fmt = table.entries[key], table.format
    accuracy = float(entry[fmt.accuracy])
    rank = table.rank(accuracy)
    metrics = {
        "eval/acc": accuracy / 100,
        "eval/test_acc": float(entry[fmt.test_accuracy or fmt.accuracy]) / 100,
        "eval/rank": float(rank),
        "eval/top_percent": 100 * rank / len(table.entries),
        "eval/mflops": float(entry[fmt.flops]) / 1e6 if fmt.flops else table.space.flops(code),
        "eval/params_m": float(entry[fmt.params]) / 1e6 if fmt.params else table.space.params(code),
    }
    if fmt.std:
        metrics["eval/acc_std"] = float(entry[fmt.std]) / 100
    return metrics


def run(cfg: Config, ctx: RunContext) -> dict[str, float]:
    space, code = parse_arch_value(cfg.arch)
    metrics = lookup(load_table(cfg.table, space.name), code)
    ctx.report(metrics, step=1)
    return metrics


SPEC = TrainerSpec(
    name="nas_bench",
    paper="NAS-Bench-Macro / Channel-Bench-Macro / NAS-Bench-201 table lookup",
    Config=Config,
    TINY=TINY,
    run=run,
    check=check,
    path_fields=("table",),
)
