"""Architecture search through Ray Tune: `orchestrator search FILE` (or `sweep`) on an `architecture` space.

    config: {arch: nas_bench_macro:00000000, table: ../shared/data/nas-bench-macro_cifar10.json}
    tune:
      metric: eval/acc
      mode: max
      num_samples: 100                                 # architectures evaluated
      space: {config.arch: {architecture: nas_bench_macro}}
      searcher: {name: evolution, population_size: 20, sample_size: 5}

Searchers, all `ray.tune.search.Searcher`s drawing "<space>:<code>" values for the one architecture key:
- random: uniform over the space, without repeating a network (canonical form) and inside the FLOPs window.
- evolution: regularised evolution (Real et al., AAAI 2019): a population of the last `population_size`
  evaluated architectures; each child mutates one position of the best of `sample_size` random members; the
  oldest member dies (aging).
- tpe (alias optuna): Tune's OptunaSearch (TPE) over one categorical parameter per position. A proposal that
  repeats an evaluated network is answered from the history at once (Optuna learns from it, no evaluation is
  spent); one outside the FLOPs window is told to Optuna as a failed trial.
- nsga2: NSGA-II (Deb et al. 2002) for the metric against MFLOPs, steady-state: the first `population_size`
  architectures are random; then each child is bred from the elite (the best `population_size` evaluated ones by
  non-dominated rank, then crowding distance) by binary tournaments, uniform crossover and a one-position mutation.
  Tune's trials finish asynchronously, so the elite is recomputed after every evaluation instead of once per
  generation (ViTAS searches with generational NSGA-II, population 50, 40 generations: num_samples 2000).
- exhaustive: every network of the space once (canonical forms in order, inside the FLOPs window): the ground
  truth of a small space (benchmarks/ground_truth.py); num_samples at least the number of networks.
- genius: the LLM-driven search (orchestrator/genius.py).

Every searcher counts an evaluation per trial; `num_samples` is the budget. MFLOPs and parameters (the FLOPs window,
NSGA-II's objective, GENIUS's records, the results below) come from `ArchCounts`: the benchmark table's own numbers
when a `nas_bench` experiment's `config.table` lists them, else the space's count on the built network. The sweep's
MLflow parent run gets the candidates in order (architectures.csv / .md: code, MFLOPs, params, metric, best so far),
the search trajectory plot and the best architecture (tags best_arch, best_arch_mflops; also `search/best.json` in
the sweep directory, which `config.arch: best:run:<sweep name>` of a retraining experiment reads); the table marks
the candidates on the Pareto front of metric against MFLOPs. GENIUS adds its chat.
"""

from __future__ import annotations

import inspect
import itertools
import pickle
import random
from collections import deque
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from orchestrator.search_space import Distribution, parse_space
from orchestrator.spec import ExperimentSpec, SpecError, did_you_mean
from trainers.nas import SearchSpace, arch_value, get_space, parse_arch_value

SEARCHER_NAMES = {"random": "random", "evolution": "evolution", "regularized_evolution": "evolution",
                  "tpe": "tpe", "optuna": "tpe", "nsga2": "nsga2", "nsga-ii": "nsga2", "exhaustive": "exhaustive",
                  "genius": "genius"}


class SearchError(RuntimeError):
    """A searcher cannot go on (e.g. GENIUS's endpoint fails); the sweep stops with its state kept for a resume.
    `orchestrator search` prints the one-line message and exits with status 1."""


def architecture_key(spec: ExperimentSpec) -> tuple[str, Distribution] | None:
    """The dotted key and distribution of the experiment's architecture, or None for a hyperparameter sweep."""
    found = [(k, d) for k, d in parse_space(spec.tune.space, None).items() if d.kind == "architecture"]
    return found[0] if found else None


def check(spec: ExperimentSpec, path: str | Path | None) -> None:
    """A NAS search space holds one architecture key and nothing else; the searcher is a NAS searcher."""
    space = parse_space(spec.tune.space, path)
    keys = [k for k, d in space.items() if d.kind == "architecture"]
    if len(keys) > 1:
        raise SpecError(path, f"tune.space.{keys[1]}", "one architecture key per search", keys)
    others = [k for k in space if k not in keys]
    if others:
        raise SpecError(path, f"tune.space.{others[0]}", "only the architecture key in an architecture search (fix "
                        "other values in the file, or sweep them in a separate sweep)", spec.tune.space[others[0]])
    name = spec.tune.searcher.name
    if name.lower() not in SEARCHER_NAMES:
        raise SpecError(path, "tune.searcher.name", f"an architecture searcher{did_you_mean(name, SEARCHER_NAMES)} "
                        f"({', '.join(SEARCHER_NAMES)})", name)
    build_searcher(spec, path, log_dir=None)


def preflight(spec: ExperimentSpec, path: str | Path | None) -> None:
    """A GENIUS search has the API key it needs (when it is not a local server)."""
    if architecture_key(spec) is None or SEARCHER_NAMES.get(spec.tune.searcher.name.lower()) != "genius":
        return
    from orchestrator.genius import GeniusError

    try:
        build_searcher(spec, path, log_dir=None).check_credentials()
    except GeniusError as err:
        raise SpecError(path, "tune.searcher.api_key_env", f"an API key in the environment ({err})",
                        spec.tune.searcher.model_dump().get("api_key_env", "OPENAI_API_KEY")) from None


class ArchCounts:
    """MFLOPs and M params of a space's codes: as the benchmark table lists them (`table`: a `nas_bench` table file
    with FLOPs and params fields, read on first use), else counted on the built network (space.flops / params)."""

    def __init__(self, space: SearchSpace, table: str | None = None):
        self.space, self.table = space, table
        self._listed: dict[str, tuple[float, float]] | None = None  # code -> (MFLOPs, M params), not pickled

    def flops(self, code: str) -> float:
        listed = self._counts().get(code)
        return listed[0] if listed else self.space.flops(code)

    def params(self, code: str) -> float:
        listed = self._counts().get(code)
        return listed[1] if listed else self.space.params(code)

    def _counts(self) -> dict[str, tuple[float, float]]:
        if self._listed is None:
            from trainers.nas_bench import load_table, table_counts

            self._listed = table_counts(load_table(self.table, self.space.name)) if self.table else {}
        return self._listed

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_listed": None}


def arch_counts(spec: ExperimentSpec) -> ArchCounts:
    """The counts of the experiment's architecture space, from its benchmark table when it is a `nas_bench` one
    (on a space that has a table format: the table was checked against the space before Ray started)."""
    from trainers.nas_bench import TABLE_FORMATS

    _, distribution = architecture_key(spec)
    space = get_space(distribution.args[0])
    table = spec.config.get("table") if spec.method == "nas_bench" and space.name in TABLE_FORMATS else None
    return ArchCounts(space, table)


def searcher_class(name: str) -> type:
    name = SEARCHER_NAMES[name.lower()]
    if name == "genius":
        from orchestrator.genius import GeniusSearcher

        return GeniusSearcher
    return {"random": RandomSearch, "evolution": RegularizedEvolution, "tpe": TPESearch, "nsga2": NSGA2,
            "exhaustive": ExhaustiveSearch}[name]


def build_searcher(spec: ExperimentSpec, path: str | Path | None, log_dir: str | None) -> Searcher:
    """The searcher of the file's `tune.searcher` (its keys are the class's keyword arguments)."""
    key, distribution = architecture_key(spec)
    space = get_space(distribution.args[0])
    cls = searcher_class(spec.tune.searcher.name)
    kwargs = dict(spec.tune.searcher.model_extra or {})
    accepted = {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}
    automatic = {"seed": spec.seed, "log_dir": log_dir, "counts": arch_counts(spec)}
    for name in kwargs:
        if name not in accepted or name in automatic:
            choices = sorted(accepted - set(automatic))
            raise SpecError(path, f"tune.searcher.{name}", f"an argument of searcher {spec.tune.searcher.name!r}"
                            f"{did_you_mean(name, choices)} ({', '.join(choices)})", kwargs[name])
    kwargs.update({k: v for k, v in automatic.items() if k in accepted})
    try:
        return cls(space, key, spec.tune.metric, spec.tune.mode, **kwargs)
    except (TypeError, ValueError) as err:
        raise SpecError(path, "tune.searcher", f"arguments that searcher {spec.tune.searcher.name!r} accepts: {err}",
                        spec.tune.searcher.model_dump()) from None


# ---------------------------------------------------------------------------------------------- searchers


class ArchitectureSearcher(Searcher):
    """What the baselines share: the space, the trial key, networks already proposed (canonical codes), the
    FLOPs window (MFLOPs from `counts`, by default counted on the network), and the evaluated history. Subclasses
    define `propose` and may define `observe`."""

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 seed: int = 0, flops: tuple[float, float] | None = None, max_draws: int = 10_000,
                 counts: ArchCounts | None = None):
        super().__init__(metric=metric, mode=mode)
        self.space, self.key, self.rng, self.max_draws = space, key, random.Random(seed), max_draws
        self.counts = counts or ArchCounts(space)
        self.window = tuple(flops) if flops else space.flops_window
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"flops: a window [low, high] in MFLOPs with low < high, got {list(self.window)}")
        self.proposed: set[str] = set()  # canonical codes
        self.live: dict[str, str] = {}  # trial id -> code
        self.history: list[tuple[str, float | None]] = []  # (code, metric) in completion order

    def propose(self) -> str | None:
        raise NotImplementedError

    def observe(self, code: str, value: float | None) -> None:
        """A finished evaluation (value None: the trial failed)."""

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        code = self.propose()
        if code is None:
            return Searcher.FINISHED if len(self.proposed) == self.space.size() else None
        self.proposed.add(self.space.canonical(code))
        self.live[trial_id] = code
        return {self.key: arch_value(self.space, code)}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        code = self.live.pop(trial_id, None)
        if code is None:
            return
        value = None if error or not result or result.get(self.metric) is None else float(result[self.metric])
        self.history.append((code, value))
        self.observe(code, value)

    def score(self, value: float) -> float:
        """Higher is better, whatever the mode."""
        return value if self.mode == "max" else -value

    def is_new(self, code: str) -> bool:
        return self.space.canonical(code) not in self.proposed and self.in_window(code)

    def in_window(self, code: str) -> bool:
        return self.window is None or self.window[0] <= self.counts.flops(code) <= self.window[1]

    def fresh(self, draw: Any) -> str | None:
        """The first of up to `max_draws` draws that is a new network inside the window."""
        for _ in range(self.max_draws):
            code = draw()
            if self.is_new(code):
                return code
        return None

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class RandomSearch(ArchitectureSearcher):
    def propose(self) -> str | None:
        return self.fresh(lambda: self.space.sample(self.rng))


class RegularizedEvolution(ArchitectureSearcher):
    """Regularised (aging) evolution; the first `population_size` architectures are random."""

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 population_size: int = 20, sample_size: int = 5, seed: int = 0,
                 flops: tuple[float, float] | None = None, counts: ArchCounts | None = None):
        if not 1 <= sample_size <= population_size:
            raise ValueError(f"1 <= sample_size <= population_size, got {sample_size} and {population_size}")
        super().__init__(space, key, metric, mode, seed=seed, flops=flops, counts=counts)
        self.population_size, self.sample_size = population_size, sample_size
        self.population: deque[tuple[str, float]] = deque(maxlen=population_size)  # oldest first

    def propose(self) -> str | None:
        if len(self.population) + len(self.live) < self.population_size or not self.population:
            return self.fresh(lambda: self.space.sample(self.rng))
        contestants = self.rng.sample(list(self.population), min(self.sample_size, len(self.population)))
        parent = max(contestants, key=lambda member: self.score(member[1]))[0]
        return self.fresh(lambda: self.space.mutate(parent, self.rng))

    def observe(self, code: str, value: float | None) -> None:
        if value is not None:
            self.population.append((code, value))  # a full deque drops its oldest member


class ExhaustiveSearch(ArchitectureSearcher):
    """Every canonical network of the space once, in code order (for spaces small enough to train every member)."""

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 seed: int = 0, flops: tuple[float, float] | None = None, counts: ArchCounts | None = None):
        super().__init__(space, key, metric, mode, seed=seed, flops=flops, counts=counts)
        self.position = 0  # index into the space's codes in order

    def propose(self) -> str | None:
        while self.position < self.space.size():
            code = self.space.encode(_digits(self.position, self.space.choices))
            self.position += 1
            if code == self.space.canonical(code) and self.is_new(code):
                return code
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        suggestion = super().suggest(trial_id)
        return Searcher.FINISHED if suggestion is None else suggestion


def _digits(index: int, choices: tuple[int, ...]) -> list[int]:
    """The `index`-th option list in code order (the last position varies fastest)."""
    options = []
    for n in reversed(choices):
        index, option = divmod(index, n)
        options.append(option)
    return options[::-1]


class NSGA2(ArchitectureSearcher):
    """Steady-state NSGA-II maximising the metric and minimising MFLOPs (see the module docstring)."""

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 population_size: int = 50, crossover_prob: float = 0.9, seed: int = 0,
                 flops: tuple[float, float] | None = None, counts: ArchCounts | None = None):
        if population_size < 2 or not 0 <= crossover_prob <= 1:
            raise ValueError(f"population_size >= 2 and 0 <= crossover_prob <= 1, got {population_size} and "
                             f"{crossover_prob}")
        super().__init__(space, key, metric, mode, seed=seed, flops=flops, counts=counts)
        self.population_size, self.crossover_prob = population_size, crossover_prob
        self.evaluated: list[tuple[str, float, float]] = []  # (code, score: higher is better, MFLOPs)

    def observe(self, code: str, value: float | None) -> None:
        if value is not None:
            self.evaluated.append((code, self.score(value), self.counts.flops(code)))

    def propose(self) -> str | None:
        if len(self.evaluated) + len(self.live) < self.population_size or len(self.evaluated) < 2:
            return self.fresh(lambda: self.space.sample(self.rng))
        elite = nsga2_select([(s, -f) for _, s, f in self.evaluated], self.population_size)
        members = [(self.evaluated[i][0], rank, crowding) for i, rank, crowding in elite]
        return self.fresh(lambda: self._child(members))

    def _child(self, members: list[tuple[str, int, float]]) -> str:
        first, second = self._tournament(members), self._tournament(members)
        options = list(self.space.decode(first))
        if self.rng.random() < self.crossover_prob:
            other = self.space.decode(second)
            options = [a if self.rng.random() < 0.5 else b for a, b in zip(options, other)]
        return self.space.mutate(self.space.encode(options), self.rng)

    def _tournament(self, members: list[tuple[str, int, float]]) -> str:
        a, b = self.rng.sample(members, 2)
        return min(a, b, key=lambda m: (m[1], -m[2]))[0]


def nsga2_select(objectives: list[tuple[float, float]], n: int) -> list[tuple[int, int, float]]:
    """NSGA-II's survivor selection over points whose objectives are all maximised: (index, front rank from 0,
    crowding distance) of the best `n`, by rank, then larger crowding distance."""
    chosen: list[tuple[int, int, float]] = []
    for rank, front in enumerate(non_dominated_fronts(objectives)):
        distance = crowding_distances([objectives[i] for i in front])
        ranked = sorted(zip(front, distance), key=lambda item: -item[1])
        chosen += [(i, rank, d) for i, d in ranked[:n - len(chosen)]]
        if len(chosen) == n:
            break
    return chosen


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated_fronts(objectives: list[tuple[float, ...]]) -> list[list[int]]:
    """Indices grouped into fronts: the first is not dominated by any point, the next only by the first, ..."""
    remaining, fronts = set(range(len(objectives))), []
    while remaining:
        front = sorted(i for i in remaining if not any(dominates(objectives[j], objectives[i]) for j in remaining))
        fronts.append(front)
        remaining -= set(front)
    return fronts


def crowding_distances(points: list[tuple[float, ...]]) -> list[float]:
    """Per point, the sum over objectives of the normalised gap between its neighbours (boundary points: inf)."""
    distance = [0.0] * len(points)
    for m in range(len(points[0]) if points else 0):
        order = sorted(range(len(points)), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = float("inf")
        if high == low:
            continue
        for before, i, after in zip(order, order[1:], order[2:]):
            distance[i] += (points[after][m] - points[before][m]) / (high - low)
    return distance


class TPESearch(ArchitectureSearcher):
    """Tune's OptunaSearch (TPE sampler, seeded) over one categorical parameter per position."""

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 n_startup_trials: int = 10, seed: int = 0, flops: tuple[float, float] | None = None,
                 counts: ArchCounts | None = None):
        super().__init__(space, key, metric, mode, seed=seed, flops=flops, counts=counts)
        self.n_startup_trials, self.seed = n_startup_trials, seed
        self.inner: Any = None  # OptunaSearch, created on first use
        self.asked = itertools.count()  # Optuna's own trial ids: ask0, ask1, ...
        self.inner_ids: dict[str, str] = {}  # Tune trial id -> Optuna trial id
        self.last_asked = ""

    def _optuna(self) -> Any:
        if self.inner is None:
            import optuna
            from ray import tune
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)
            positions = {f"p{i:02d}": tune.choice(list(range(n))) for i, n in enumerate(self.space.choices)}
            self.inner = OptunaSearch(positions, metric="objective", mode="max", sampler=sampler)
        return self.inner

    def propose(self) -> str | None:
        known = {self.space.canonical(c): v for c, v in self.history}
        for _ in range(self.max_draws):
            inner_id = f"ask{next(self.asked)}"
            options = self._optuna().suggest(inner_id)
            code = self.space.encode([options[f"p{i:02d}"] for i in range(len(self.space.choices))])
            if self.is_new(code):
                self.last_asked = inner_id
                return code
            canonical = self.space.canonical(code)
            if known.get(canonical) is not None:  # an evaluated network: answer from the history
                self.inner.on_trial_complete(inner_id, {"objective": self.score(known[canonical])})
            else:  # outside the window, or still being evaluated
                self.inner.on_trial_complete(inner_id, error=True)
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        suggestion = super().suggest(trial_id)
        if isinstance(suggestion, dict):
            self.inner_ids[trial_id] = self.last_asked
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        inner_id = self.inner_ids.pop(trial_id, None)
        super().on_trial_complete(trial_id, result, error)
        if inner_id is None:
            return
        value = self.history[-1][1]
        if value is None:
            self.inner.on_trial_complete(inner_id, error=True)
        else:
            self.inner.on_trial_complete(inner_id, {"objective": self.score(value)})


# ---------------------------------------------------------------------------------------------- results


BEST_FILE = "search/best.json"


def write_best(sweep_dir: Any, spec: ExperimentSpec, best: dict[str, Any], parent_id: str) -> None:
    """The best architecture of a finished search as `BEST_FILE` of its sweep directory (a RunDir), written to a
    temporary name and renamed."""
    import json

    key, _ = architecture_key(spec)
    _, code = parse_arch_value(best[key])
    record = {"arch": best[key], spec.tune.metric: best.get(spec.tune.metric),
              "mflops": arch_counts(spec).flops(code), "parent_run_id": parent_id}
    path = f"{sweep_dir.path}/{BEST_FILE}"
    sweep_dir.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with sweep_dir.fs.open_output_stream(f"{path}.partial") as stream:
        stream.write(json.dumps(record, indent=1).encode())
    sweep_dir.fs.move(f"{path}.partial", path)


def log_dir(sweep_dir: Any) -> str | None:
    """Where a searcher writes its own logs (GENIUS's chat): `<sweep>/search/` on local storage."""
    from orchestrator.storage import is_uri

    return None if is_uri(sweep_dir.display) else f"{sweep_dir.path}/search"


def trajectory_rows(client: Any, spec: ExperimentSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated architectures in the order their trials started, with MFLOPs, params and the best so far."""
    key, _ = architecture_key(spec)
    counts = arch_counts(spec)
    metric, better = spec.tune.metric, max if spec.tune.mode == "max" else min
    started = {r["run_id"]: client.get_run(r["run_id"]).info.start_time for r in rows}
    out, best = [], None
    for number, row in enumerate(sorted((r for r in rows if key in r), key=lambda r: started[r["run_id"]]), 1):
        _, code = parse_arch_value(row[key])
        value = row.get(metric)
        best = value if best is None else (best if value is None else better(best, value))
        out.append({"evaluation": number, "trial": row["trial"], "arch": code, "mflops": round(counts.flops(code), 3),
                    "params_m": round(counts.params(code), 4), metric: value, "best_so_far": best,
                    "status": row["status"]})
    sign = 1 if spec.tune.mode == "max" else -1
    scored = [r for r in out if r[metric] is not None]
    front = set(non_dominated_fronts([(sign * r[metric], -r["mflops"]) for r in scored])[0]) if scored else set()
    for index, row in enumerate(scored):
        row["pareto"] = index in front
    return out


def log_search(tracker: Any, parent_id: str, spec: ExperimentSpec, rows: list[dict[str, Any]],
               best: dict[str, Any] | None, logs: str | None) -> None:
    """The search's table, trajectory plot, best architecture and the searcher's own logs on the parent run."""
    import json

    from orchestrator import compare

    table = trajectory_rows(tracker.client, spec, rows)
    key, distribution = architecture_key(spec)
    with compare.scratch_dir() as tmp:
        for file in compare.write_tables(table, tmp / "architectures"):
            tracker.client.log_artifact(parent_id, str(file))
        if table:
            plot_trajectory(table, spec.tune.metric, spec.tune.mode, tmp / "search_trajectory.png")
            tracker.client.log_artifact(parent_id, str(tmp / "search_trajectory.png"))
    if best is not None and key in best:
        _, code = parse_arch_value(best[key])
        counts = arch_counts(spec)
        tracker.client.set_tag(parent_id, "best_arch", best[key])
        tracker.client.log_metric(parent_id, "best/arch_mflops", counts.flops(code))
        tracker.client.log_metric(parent_id, "best/arch_params_m", counts.params(code))
    tracker.client.set_tag(parent_id, "search.space", distribution.args[0])
    tracker.client.set_tag(parent_id, "search.searcher", spec.tune.searcher.name)
    if logs and Path(logs).is_dir():
        tracker.client.log_artifacts(parent_id, logs, "search")
        usage = Path(logs) / "usage.json"
        if usage.exists():
            numbers = {k: v for k, v in json.loads(usage.read_text()).items() if isinstance(v, (int, float))}
            for name, value in numbers.items():
                tracker.client.log_metric(parent_id, f"search/{name}", float(value))


def plot_trajectory(table: list[dict[str, Any]], metric: str, mode: str, path: Path) -> None:
    """Left: each evaluated architecture's metric by evaluation number, with the best so far. Right: metric
    against MFLOPs."""
    from orchestrator.compare import pyplot

    plt = pyplot()
    fig, (trajectory, cost) = plt.subplots(1, 2, figsize=(12, 4.2))
    scored = [r for r in table if r[metric] is not None]
    trajectory.scatter([r["evaluation"] for r in scored], [r[metric] for r in scored], s=14, label="candidate")
    trajectory.step([r["evaluation"] for r in table], [r["best_so_far"] for r in table], where="post",
                    color="black", label=f"best so far ({mode})")
    trajectory.set(xlabel="architectures evaluated", ylabel=metric, title="search trajectory")
    trajectory.legend(fontsize=8)
    trajectory.grid(alpha=0.3)
    cost.scatter([r["mflops"] for r in scored], [r[metric] for r in scored], s=14,
                 c=[r["evaluation"] for r in scored], cmap="viridis")
    cost.set(xlabel="MFLOPs", ylabel=metric, title="candidates by cost (colour: evaluation order)")
    cost.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
