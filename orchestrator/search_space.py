"""Search spaces over dotted experiment keys, as written in an experiment file's `tune.space`:

    space:
      optim.lr: {loguniform: [1.0e-3, 0.3]}
      optim.weight_decay: {choice: [0.0, 5.0e-4]}
      config.threshold: {quniform: [0.7, 0.99, 0.01]}
      optim.warmup_steps: {randint: [0, 100]}          # high excluded
      config.arch: {grid: [small_cnn, wrn28_2]}        # every value, in every sample
      config.arch: {architecture: nas_bench_macro}     # a member of a NAS search space (trainers/nas), as
                                                       # "<space>:<code>"; only the NAS searchers draw these

Each entry is parsed into a `Distribution` (pure Python; Ray is imported only by `to_ray`). `probe_values` gives
values at the edges of each distribution, which are set into the experiment and validated, so a misspelled key
or a value the experiment would refuse is reported before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import SpecError, did_you_mean

# name -> (argument names, what they are)
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),
    "grid": ("values",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "qloguniform": ("low", "high", "q"),
    "qrandint": ("low", "high", "q"),
    "architecture": ("space",),
}
UNTUNABLE = ("name", "method", "tune", "storage_path", "tracking", "resources")


@dataclass(frozen=True)
class Distribution:
    kind: str  # a key of DISTRIBUTIONS
    args: tuple[Any, ...]  # (values,) for choice/grid, else (low, high[, q])

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "architecture":
            raise TypeError("architectures are drawn by the NAS searchers (orchestrator/nas_search.py), not by Tune")
        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def probe_values(self) -> list[Any]:
        """Values to validate the experiment with: every option, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args[0])
        if self.kind == "architecture":
            return architecture_probes(self.args[0])
        low, high = self.args[0], self.args[1]
        if self.kind in ("randint", "qrandint"):
            return [int(low), int(high) - (1 if self.kind == "randint" else 0)]
        return [float(low), float(high)]

    @property
    def numeric_bounds(self) -> tuple[float, float] | None:
        """(low, high) of a numeric range, None for choice/grid."""
        return None if self.kind in ("choice", "grid", "architecture") else (float(self.args[0]), float(self.args[1]))


def parse_space(space: dict[str, Any], file: str | Path | None, where: str = "tune.space") -> dict[str, Distribution]:
    """Dotted keys -> distributions. Nested mappings are read as dotted keys too ({optim: {lr: {uniform: ..}}} is
    optim.lr), which is also what `--set tune.space.optim.lr=...` writes."""
    return {key: parse_distribution(value, file, f"{where}.{key}") for key, value in _dotted(space).items()}


def _dotted(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in space.items():
        one = isinstance(value, dict) and len(value) == 1
        is_distribution = one and (next(iter(value)) in DISTRIBUTIONS or isinstance(next(iter(value.values())), list))
        if isinstance(value, dict) and value and not is_distribution:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_distribution(value: Any, file: str | Path | None, key: str) -> Distribution:
    names = ", ".join(DISTRIBUTIONS)
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(file, key, f"one distribution as a one-key mapping, e.g. {{loguniform: [1.0e-4, 0.1]}} "
                                   f"(distributions: {names})", value)
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise SpecError(file, f"{key}.{kind}", f"a distribution{did_you_mean(kind, DISTRIBUTIONS)} ({names})", kind)
    if kind == "architecture":
        return Distribution(kind, (_space_name(args, file, f"{key}.{kind}"),))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpecError(file, f"{key}.{kind}", "a non-empty list of values", args)
        return Distribution(kind, (tuple(args),))
    return Distribution(kind, _range_args(kind, args, file, f"{key}.{kind}"))


def _space_name(name: Any, file: str | Path | None, key: str) -> str:
    from trainers.nas import SPACES

    if name not in SPACES:
        raise SpecError(file, key, f"a search space{did_you_mean(str(name), SPACES)} ({', '.join(sorted(SPACES))})",
                        name)
    return name


def architecture_probes(space_name: str) -> list[str]:
    """The smallest and the largest member (every position at its first, then its last option)."""
    from trainers.nas import arch_value, get_space

    space = get_space(space_name)
    return [arch_value(space, space.encode([0] * len(space.choices))),
            arch_value(space, space.encode([n - 1 for n in space.choices]))]


def _range_args(kind: str, args: Any, file: str | Path | None, key: str) -> tuple[Any, ...]:
    wanted = DISTRIBUTIONS[kind]
    shape = f"[{', '.join(wanted)}]"
    if not isinstance(args, list) or len(args) != len(wanted):
        raise SpecError(file, key, f"a list {shape}", args)
    integer = kind in ("randint", "qrandint")
    for name, number in zip(wanted, args):
        ok = isinstance(number, int) if integer else isinstance(number, (int, float))
        if not ok or isinstance(number, bool) or not math.isfinite(number):
            raise SpecError(file, key, f"{'an integer' if integer else 'a number'} for `{name}` in {shape}", number)
    low, high = args[0], args[1]
    if not low < high:
        raise SpecError(file, key, f"low < high in {shape}", args)
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise SpecError(file, key, f"low > 0 for a log scale in {shape}", args)
    if len(args) == 3 and args[2] <= 0:
        raise SpecError(file, key, f"q > 0 in {shape}", args)
    return tuple(float(a) if not integer else int(a) for a in args)


def check_tunable(key: str, file: str | Path | None, where: str) -> None:
    root = key.split(".", 1)[0]
    if root in UNTUNABLE:
        raise SpecError(file, f"{where}.{key}", f"a key outside {', '.join(UNTUNABLE)} (a sweep cannot vary "
                                                f"`{root}`; per-trial resources go in tune.resources)", key)
