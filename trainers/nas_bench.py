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

A table is checked against the space before Ray starts (`check`, which `orchestrator` preflight calls): it is JSON
(the official NAS-Bench-201 `.pth`, a PyTorch pickle, is refused with what to convert it to: no installed package
reads it), every key is the space's table key of one of its codes, there is one entry per code, and where the file
lists FLOPs and parameters, a sample of entries (the smallest network and SAMPLED_COUNTS seeded others) agrees with
the space's own count of the network, so a table of another space with the same fields and size (Channel-Bench
ResNet for MobileNet) is refused, naming the space whose counts it matches. `table_counts` gives a searcher the
file's FLOPs and parameters, so it need not build each candidate to count them.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from trainers._common.contract import ConfigError, RunContext, TrainerSpec
from trainers.nas import SPACES, InvalidArchitecture, SearchSpace, get_space, parse_arch_value


@dataclass(frozen=True)
class TableFormat:
    """Field names of one benchmark's JSON file: {key: {field: value}}."""

    accuracy: str  # what a searcher optimises
    test_accuracy: str | None = None  # reported separately when it differs
    std: str | None = None
    flops: str | None = None  # in FLOPs (MACs) as the file counts them
    params: str | None = None  # in parameters


SAMPLED_COUNTS = 2  # entries (besides the smallest network) whose FLOPs and params `check` compares with the space's
COUNT_TOLERANCE = 1e-4  # relative: the tables' integer counts against ours in millions
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # a torch.save file: a zip archive, or a bare pickle (protocol >= 2)
NB201_JSON = ('{"|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|": '
              '{"val_acc_200": 91.2, "test_acc_200": 94.1, "rank": 12}, ...}')
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
    codes: tuple[str, ...]  # the code of each entry, in the file's order
    sorted_accuracies: tuple[float, ...]  # ascending, for ranks

    def rank(self, accuracy: float) -> int:
        higher = len(self.sorted_accuracies) - bisect.bisect_right(self.sorted_accuracies, accuracy)
        return 1 + higher


def check(cfg: Config) -> None:
    """The architecture names a known space and the table is that space's benchmark (module docstring)."""
    try:
        space, _ = parse_arch_value(cfg.arch)
    except (KeyError, InvalidArchitecture) as err:
        raise ConfigError("arch", "<space>:<code> of a known space", f"{cfg.arch} ({err.args[0]})") from None
    check_counts(load_table(cfg.table, space.name), cfg.table)


def check_counts(table: Table, path: str) -> None:
    """ConfigError when a sampled entry's FLOPs or params differ from the space's count of its network; the
    message names another space whose counts the entry matches, if one does."""
    fmt, space = table.format, table.space
    if not (fmt.flops and fmt.params):
        return
    for code in sampled_codes(table):
        listed = _listed_counts(table.entries[space.table_key(code)], fmt)
        if _same_counts(listed, (space.flops(code), space.params(code))):
            continue
        likely = [name for name in _twin_spaces(space.name) if _counts_match(name, code, listed)]
        hint = f"; they match {likely[0]}'s network: is this the {likely[0]} table?" if likely else ""
        raise ConfigError("table", f"the {space.name} benchmark, whose entries list the FLOPs and params of "
                          f"{space.name}'s networks", f"{path} (entry {space.table_key(code)!r} lists "
                          f"{listed[0]:.3f} MFLOPs and {listed[1]:.4f} M params; {space.name}'s network of code "
                          f"{code} has {space.flops(code):.3f} and {space.params(code):.4f}{hint})")


def sampled_codes(table: Table) -> list[str]:
    """The smallest network (every position at its first option) and SAMPLED_COUNTS seeded others."""
    space = table.space
    smallest = space.encode([0] * len(space.choices))
    others = random.Random(0).sample(sorted(table.codes), SAMPLED_COUNTS)
    return [smallest] + [code for code in others if code != smallest]


def table_counts(table: Table) -> dict[str, tuple[float, float]]:
    """code -> (MFLOPs, M params) as the file lists them; empty when its format has no such fields."""
    fmt = table.format
    if not (fmt.flops and fmt.params):
        return {}
    return {code: _listed_counts(entry, fmt) for code, entry in zip(table.codes, table.entries.values())}


def _listed_counts(entry: dict[str, Any], fmt: TableFormat) -> tuple[float, float]:
    return float(entry[fmt.flops]) / 1e6, float(entry[fmt.params]) / 1e6


def _same_counts(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(x, y, rel_tol=COUNT_TOLERANCE) for x, y in zip(a, b))


def _twin_spaces(name: str) -> list[str]:
    """Other spaces with a table of the same fields and size (whose file could be mistaken for this one's)."""
    fmt, size = TABLE_FORMATS[name], get_space(name).size()
    return [other for other, f in TABLE_FORMATS.items()
            if other != name and other in SPACES and f == fmt and get_space(other).size() == size]


def _counts_match(name: str, code: str, listed: tuple[float, float]) -> bool:
    space = get_space(name)
    try:
        return _same_counts(listed, (space.flops(code), space.params(code)))
    except InvalidArchitecture:
        return False


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
    _refuse_torch_file(path, space_name)
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
    codes = tuple(_code_of_key(space, key, path) for key in entries)
    if len(entries) != space.size():
        raise ConfigError("table", f"the {space_name} benchmark: {space.size()} architectures",
                          f"{path} ({len(entries)} entries)")
    accuracies = tuple(sorted(float(e[fmt.accuracy]) for e in entries.values()))
    return Table(space, fmt, entries, codes, accuracies)


def _code_of_key(space: SearchSpace, key: str, path: str) -> str:
    """The code whose table key is `key`; ConfigError naming the key when there is none."""
    try:
        code = space.from_table_key(key)
    except InvalidArchitecture as err:
        example = space.table_key(space.encode([0] * len(space.choices)))
        raise ConfigError("table", f"the {space.name} benchmark: keys that are {space.name} architectures, e.g. "
                          f"{example!r}", f"{path} (key {key!r}: {err})") from None
    return code


def _refuse_torch_file(path: str, space_name: str) -> None:
    """A PyTorch file (the official NAS-Bench-201 .pth) is refused with the JSON expected and how to make it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_MAGIC):
        return
    expected = f"the {space_name} benchmark as JSON"
    how = "a PyTorch file, not JSON"
    if space_name == "nas_bench_201":
        expected = f"a NAS-Bench-201 JSON table keyed by cell string: {NB201_JSON}"
        how = ("the official .pth, which needs the nas_201_api package (not installed here) to read; convert it once "
               "where that package is installed: for each index of api (NASBench201API(path)), key api[index] "
               "(the cell string) to the 200-epoch 'cifar10-valid' valid accuracy (val_acc_200), the 'cifar10' "
               "test accuracy (test_acc_200) and the rank by test accuracy, and json.dump the dict; or use GENIUS's "
               "benchmark/nasbench201_cifar10.json")
    raise ConfigError("table", expected, f"{path} ({how})")


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
