"""Ray Tune sweeps: `orchestrator sweep FILE` runs the experiment's `tune:` block (DESIGN.md, "Tune").

    tune:
      metric: eval/accuracy
      mode: max
      num_samples: 8
      space: {optim.lr: {loguniform: [0.01, 0.5]}, optim.weight_decay: {choice: [0.0, 5.0e-4]}}
      scheduler: {name: asha, grace_period: 100, reduction_factor: 2}
      searcher: {name: optuna}

Layout of a sweep in `<storage_path>/<name>/`: Tune's experiment state and one directory per trial (its Tune
checkpoints), plus `runs/<trial>/` (the trial's MLflow child run id, the checkpoint it was last started from) and
`runs/<trial>-<start>/` (the Ray Train run of one start of the trial).

Each trial is a small driver (`run_trial`, a Tune function) that builds a TorchTrainer for the experiment with the
trial's overrides (Tune + Train v2 interop). Every `report_every` steps the trial evaluates and checkpoints; the
Train controller hands the report to the driver (`TrialReporter`), which reports it to Tune with the checkpoint, so
schedulers act on the metric and PBT can clone one trial's checkpoint into another. A trial that Tune starts
again (PBT exploit, HyperBand pause, a new sweep driver) starts a new Train run from the checkpoint Tune gives it;
a crashed worker inside a trial is Ray Train's to restart.

MLflow: one parent run per sweep and one child per trial, nested under it (params: the trial's overrides and the
resolved config); the parent gets the trial table (CSV, Markdown) and a plot. Running the same command again
restores the sweep (Tuner.restore): trials keep their child runs and nothing is logged twice.

Repeats: `orchestrator run FILE --seeds 0,1,2` (or a `repeat: {seeds: [...]}` block) is a sweep named
`<name>-repeat` whose space is a grid over `seed` (`repeat_spec`): one trial per seed, each the experiment itself
with that seed, as many at once as the cluster holds. Its parent run (tags `repeat: "true"`, `seeds`) gets
`<metric>_mean` and `<metric>_std` of every final metric over the completed seeds and the per-seed table
(seeds.csv, seeds.md); the children are named `<name>-seed<k>`. Running the command again trains only the seeds
that have not finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune as ray_tune
from ray.tune.search import BasicVariantGenerator

from orchestrator import nas_search
from orchestrator import spec as spec_mod
from orchestrator.compare import STATUS_TAG
from orchestrator.launch import (absolute_paths, check_same_experiment, finish_mlflow_run, open_mlflow_run,
                                 placement_request, prepare_data_on_driver, torch_trainer)
from orchestrator.search_space import Distribution, check_tunable, parse_space
from orchestrator.spec import ExperimentSpec, SpecError
from orchestrator.storage import RunDir
from orchestrator.tracking import redact
from orchestrator.train_callbacks import TrialReporter
from trainers.nas import parse_arch_value

log = logging.getLogger("orchestrator")

# Our short names -> Ray's registry names (any other registry name is accepted as is).
SCHEDULER_ALIASES = {"asha": "async_hyperband", "bohb": "hb_bohb", "median": "median_stopping_rule"}
SEARCHER_ALIASES = {"random": "variant_generator", "grid": "variant_generator"}
SEARCHER_SEED_ARG = {"optuna": "seed", "hyperopt": "random_state_seed", "bohb": "seed"}
# The trial driver only waits on its TorchTrainer; the workers hold the real resources. It asks for no CPU (a
# fraction of one would leave a trial whose workers take every CPU unplaceable, e.g. the quickstart's 2 workers on a
# 2-core machine) and, as Ray needs a non-zero request, for 1 MB of Ray's logical memory.
TRIAL_DRIVER = {"CPU": 0, "memory": 2**20}
REPEAT_SUFFIX = "-repeat"  # a repeat's directory and parent run: <name>-repeat (a plain run of <name> keeps its own)


# ---------------------------------------------------------------------------------------------- the tune block


def report_every(spec: ExperimentSpec) -> int:
    return spec.tune.report_every or spec.eval.every or spec.checkpoint.every


def check(spec: ExperimentSpec, raw: dict[str, Any], path: str | Path | None) -> None:
    """Everything about `tune:` that can be checked before Ray starts (called by preflight.validate)."""
    tune = spec.tune
    if not tune.metric.startswith(("eval/", "train/")):
        raise SpecError(path, "tune.metric", "a metric the trials report: eval/<name> or train/<name>", tune.metric)
    space, mutations = parse_space(tune.space, path), pbt_mutations(spec, path)
    if not space and not mutations:
        raise SpecError(path, "tune.space", "at least one dotted key with a distribution, e.g. "
                                            "optim.lr: {loguniform: [1.0e-3, 0.3]}", tune.space)
    for where, distributions in (("tune.space", space), ("tune.scheduler.mutations", mutations)):
        for key, distribution in distributions.items():
            check_tunable(key, path, where)
            for value in distribution.probe_values():
                _checked_trial_spec(spec, {key: value}, path, f"{where}.{key}")
    build_scheduler(spec, path)
    if tune.reuse_actors and spec.trainer.run is None:
        raise SpecError(path, "tune.reuse_actors", f"false or null for method {spec.method!r} (its trials start a Ray "
                        "Train worker group each; reuse serves methods that run in the trial, such as lookups)", True)
    if nas_search.architecture_key(spec) is not None:
        nas_search.check(spec, path)
        return
    if _registry_name(tune.searcher.name, SEARCHER_ALIASES) != "variant_generator":
        grid = [k for k, d in space.items() if d.kind == "grid"]
        if grid:
            raise SpecError(path, f"tune.space.{grid[0]}", "choice instead of grid with searcher "
                                                          f"{tune.searcher.name!r} (grid needs searcher random)", "grid")
    build_searcher(spec, path)


def trial_spec(spec: ExperimentSpec, overrides: dict[str, Any], path: str | Path | None = None) -> ExperimentSpec:
    """The experiment one trial runs: the file without `tune:`, the trial's overrides, `tune.resources`, and an
    evaluation + checkpoint every `report_every` steps (what the schedulers see)."""
    every = report_every(spec)
    raw = {k: v for k, v in spec.model_dump(mode="json").items() if k not in ("tune", "repeat")}
    resources = {f"resources.{k}": v for k, v in spec.tune.resources.model_dump().items() if v is not None}
    fixed = {"eval.every": every, "checkpoint.every": every, "log_every": min(spec.log_every, every)}
    if spec.repeat is not None:  # no scheduler looks at a repeat's reports: each seed runs the experiment as is
        fixed = {}
    return spec_mod.validate(spec_mod.with_overrides(raw, {**overrides, **resources, **fixed}, path), path)


def repeat_spec(spec: ExperimentSpec, path: str | Path | None = None) -> ExperimentSpec:
    """The sweep that runs `spec` once per seed of its `repeat:` block: named `<name>-repeat`, a grid over `seed`
    (one trial per seed, FIFO), with the experiment's own resources."""
    tune = {"metric": "train/loss", "mode": "min", "space": {"seed": {"grid": list(spec.repeat.seeds)}},
            "scheduler": {"name": "fifo"}, "searcher": {"name": "random"}}
    overrides = {"name": spec.name + REPEAT_SUFFIX, "tune": tune}
    return spec_mod.validate(spec_mod.with_overrides(spec.model_dump(mode="json"), overrides, path), path)


def _checked_trial_spec(spec: ExperimentSpec, overrides: dict[str, Any], path: str | Path | None, where: str) -> None:
    try:
        trial_spec(spec, overrides, path)
    except SpecError as err:
        (key, value), = overrides.items()
        raise SpecError(path, where, f"values the experiment accepts; with {key} = {value!r}: {err.key}: "
                                     f"expected {err.expected}", value) from None


def pbt_mutations(spec: ExperimentSpec, path: str | Path | None) -> dict[str, Distribution]:
    extra = spec.tune.scheduler.model_extra or {}
    if "mutations" not in extra:
        return {}
    if not isinstance(extra["mutations"], dict):
        raise SpecError(path, "tune.scheduler.mutations", "a search space (dotted key -> distribution)",
                        extra["mutations"])
    return parse_space(extra["mutations"], path, "tune.scheduler.mutations")


def param_space(spec: ExperimentSpec) -> dict[str, Any]:
    """Tune's search space; architectures are left to the NAS searchers, which suggest them."""
    return {key: d.to_ray() for key, d in parse_space(spec.tune.space, None).items() if d.kind != "architecture"}


def _registry_name(name: str, aliases: dict[str, str]) -> str:
    return aliases.get(name.lower(), name.lower())


def build_scheduler(spec: ExperimentSpec, path: str | Path | None = None) -> Any:
    """The Tune scheduler, with time measured in optimizer steps (the `step` every report carries)."""
    from ray.tune.schedulers import SCHEDULER_IMPORT, create_scheduler

    tune = spec.tune
    name = _registry_name(tune.scheduler.name, SCHEDULER_ALIASES)
    known = sorted({*SCHEDULER_IMPORT, "asha", "bohb", "median"})
    if name not in SCHEDULER_IMPORT:
        raise SpecError(path, "tune.scheduler.name", f"a Tune scheduler ({', '.join(known)})", tune.scheduler.name)
    kwargs = _scheduler_defaults(spec, name)
    kwargs.update({k: v for k, v in (tune.scheduler.model_extra or {}).items() if k != "mutations"})
    if name in ("pbt", "pbt_replay", "pb2"):
        kwargs.update(_pbt_arguments(spec, name, path))
    scheduler_cls = SCHEDULER_IMPORT[name]
    scheduler_cls = scheduler_cls() if inspect.isfunction(scheduler_cls) else scheduler_cls  # lazy imports
    accepted = inspect.signature(scheduler_cls).parameters
    if "time_attr" not in accepted:
        kwargs.pop("time_attr", None)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise SpecError(path, f"tune.scheduler.{unknown[0]}",
                        f"an argument of {scheduler_cls.__name__} ({', '.join(p for p in accepted if p != 'self')})",
                        kwargs[unknown[0]])
    try:
        return create_scheduler(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise SpecError(path, "tune.scheduler", f"arguments that {scheduler_cls.__name__} accepts: {err}",
                        tune.scheduler.model_dump()) from None


def _scheduler_defaults(spec: ExperimentSpec, name: str) -> dict[str, Any]:
    every, steps = report_every(spec), spec.optim.steps if spec.optim is not None else 1
    defaults: dict[str, dict[str, Any]] = {
        "async_hyperband": {"max_t": steps, "grace_period": every},
        "asynchyperband": {"max_t": steps, "grace_period": every},
        "hyperband": {"max_t": steps},
        "hb_bohb": {"max_t": steps},
        "median_stopping_rule": {"grace_period": every},
        "medianstopping": {"grace_period": every},
        "pbt": {"perturbation_interval": 4 * every},
        "pb2": {"perturbation_interval": 4 * every},
    }
    return {"time_attr": "step", **defaults.get(name, {})}


def _pbt_arguments(spec: ExperimentSpec, name: str, path: str | Path | None) -> dict[str, Any]:
    """PBT explores `mutations` (default: the search space); PB2 needs numeric bounds of the same keys."""
    mutations = pbt_mutations(spec, path) or parse_space(spec.tune.space, path)
    if name == "pb2":
        bounds = {k: list(d.numeric_bounds) for k, d in mutations.items() if d.numeric_bounds}
        return {} if "hyperparam_bounds" in (spec.tune.scheduler.model_extra or {}) else {"hyperparam_bounds": bounds}
    if name == "pbt_replay":
        return {}
    return {"hyperparam_mutations": {k: list(d.args[0]) if d.numeric_bounds is None else d.to_ray()
                                     for k, d in mutations.items()}}


def build_searcher(spec: ExperimentSpec, path: str | Path | None = None, max_concurrent: int = 0,
                   log_dir: str | None = None) -> Any:
    """The search algorithm; random search is Tune's variant generator, seeded by the experiment's seed (Tune
    limits its concurrency only when it is told here; other searchers it wraps in a ConcurrencyLimiter).
    Architecture spaces get a NAS searcher (orchestrator/nas_search.py), which writes its logs to `log_dir`."""
    from ray.tune.search import SEARCH_ALG_IMPORT, create_searcher

    if nas_search.architecture_key(spec) is not None:
        return nas_search.build_searcher(spec, path, log_dir)
    searcher = spec.tune.searcher
    name = _registry_name(searcher.name, SEARCHER_ALIASES)
    kwargs = dict(searcher.model_extra or {})
    if name == "variant_generator":
        try:
            return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent, **kwargs)
        except TypeError as err:
            raise _bad_searcher_arguments(path, name, searcher, err) from None
    if name not in SEARCH_ALG_IMPORT:
        known = ", ".join(sorted({*SEARCH_ALG_IMPORT, "random", "grid"}))
        raise SpecError(path, "tune.searcher.name", f"a Tune searcher ({known})", searcher.name)
    if name == "bohb" and _registry_name(spec.tune.scheduler.name, SCHEDULER_ALIASES) != "hb_bohb":
        raise SpecError(path, "tune.scheduler.name", "bohb (searcher bohb runs with scheduler bohb)",
                        spec.tune.scheduler.name)
    if name in SEARCHER_SEED_ARG:
        kwargs.setdefault(SEARCHER_SEED_ARG[name], spec.seed)
    try:
        return create_searcher(name, **kwargs)
    except (ImportError, AssertionError) as err:
        raise SpecError(path, "tune.searcher.name", f"a searcher whose package is installed ({err})", name) from None
    except (TypeError, ValueError) as err:
        raise _bad_searcher_arguments(path, name, searcher, err) from None


def _bad_searcher_arguments(path: str | Path | None, name: str, searcher: Any, err: Exception) -> SpecError:
    """The error shows the searcher block with its secrets (an `api_key`) as ***: it goes to the terminal."""
    return SpecError(path, "tune.searcher", f"arguments that searcher {name!r} accepts: {err}",
                     redact(searcher.model_dump()))


# ---------------------------------------------------------------------------------------------- the sweep driver


@dataclass
class SweepContext:
    """What every trial driver needs, passed through tune.with_parameters."""

    spec_yaml: str  # the resolved experiment, `tune:` included
    spec_file: str
    tracking_uri: str
    parent_run_id: str
    runs_root: str  # <storage_path>/<name>/runs


@dataclass
class SweepOutcome:
    parent_run_id: str
    tracking_uri: str
    sweep_dir: str
    rows: list[dict[str, Any]]  # one per trial (orchestrator.compare.trial_rows)
    best: dict[str, Any] | None
    resumed: bool
    interrupted: bool  # some trials did not finish (the driver was interrupted); run the command again


def sweep(spec: ExperimentSpec, spec_file: str = "<memory>") -> SweepOutcome:
    """Run (or resume) the sweep on the current Ray cluster and track it in MLflow."""
    from orchestrator import compare
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    spec = absolute_paths(spec)
    sweep_dir = RunDir(spec.storage_path, spec.name)
    check_same_experiment(spec, sweep_dir)
    _check_trials_fit(spec)
    prepare_data_on_driver(spec)
    tracker = Tracker(resolve_tracking_uri(spec.tracking.tracking_uri))
    parent_id, resumed = _open_parent_run(tracker, spec, sweep_dir, spec_file)
    context = SweepContext(spec_mod.to_yaml(spec), spec_file, tracker.uri, parent_id, f"{sweep_dir.display}/runs")
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, sweep=context), _trial_resources(spec))
    search_logs = nas_search.log_dir(sweep_dir)
    experiment_path = sweep_dir.display
    if _restorable(sweep_dir):
        log.info("resuming sweep %s (MLflow parent run %s)", experiment_path, parent_id)
        _close_orphaned_children(tracker, parent_id)
        tuner = ray_tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        log.info("starting sweep %s (MLflow parent run %s)", experiment_path, parent_id)
        tuner = ray_tune.Tuner(trainable, param_space=param_space(spec), tune_config=_tune_config(spec, search_logs),
                               run_config=_run_config(spec, tracker.uri, context.runs_root))
    status = "FAILED"
    try:
        tuner.fit()
        status = "FINISHED"
    finally:
        rows = compare.trial_rows(tracker.client, parent_id, spec.tune.metric)
        unstarted = spec.repeat is not None and len(rows) < len(spec.repeat.seeds)  # a seed still pending
        if any(r["status"] == "running" for r in rows) or unstarted:  # Ctrl-C: Tune saved its state and returned
            status = "KILLED"
            _close_orphaned_children(tracker, parent_id)
            rows = compare.trial_rows(tracker.client, parent_id, spec.tune.metric)
        best = None if spec.repeat is not None else compare.best_row(rows, spec.tune.metric, spec.tune.mode)
        if nas_search.architecture_key(spec) is not None:
            nas_search.log_search(tracker, parent_id, spec, rows, best, search_logs)
            if status == "FINISHED" and best is not None:  # what `best:run:<name>` of a retraining reads
                nas_search.write_best(sweep_dir, spec, best, parent_id)
        if spec.repeat is not None:
            rows = _finish_repeat_run(tracker, parent_id, status)
        else:
            _finish_parent_run(tracker, parent_id, spec, rows, best, status)
    return SweepOutcome(parent_id, tracker.uri, sweep_dir.display, rows, best, resumed, status == "KILLED")


def finished_repeat(spec: ExperimentSpec) -> SweepOutcome | None:
    """A repeat (`repeat_spec`) whose seeds all completed, read from MLflow without starting Ray; else None."""
    import mlflow.exceptions

    from orchestrator import compare
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    sweep_dir = RunDir(absolute_paths(spec).storage_path, spec.name)
    remembered = sweep_dir.read("mlflow_run.json")
    if remembered is None:
        return None
    tracker, parent_id = Tracker(resolve_tracking_uri(spec.tracking.tracking_uri)), json.loads(remembered)["run_id"]
    try:
        finished = tracker.client.get_run(parent_id).info.status == "FINISHED"
        rows = compare.seed_rows(compare.children(tracker.client, parent_id))
    except mlflow.exceptions.MlflowException:  # another MLflow store than the repeat's: run it
        return None
    if not finished or [r["status"] for r in rows] != ["completed"] * len(spec.repeat.seeds):
        return None
    return SweepOutcome(parent_id, tracker.uri, sweep_dir.display, rows, None, True, False)


def _restorable(sweep_dir: RunDir) -> bool:
    """Tune saved the sweep's state (tuner.pkl and an experiment_state-*.json). With tuner.pkl alone (a sweep that
    stopped before Tune's first checkpoint, e.g. GENIUS's endpoint failed at the first request) Tuner.restore would
    start a new experiment of a single trial (it does not pass num_samples on), so the sweep starts afresh instead."""
    import pyarrow.fs as pafs

    if not ray_tune.Tuner.can_restore(sweep_dir.display):
        return False
    found = sweep_dir.fs.get_file_info(pafs.FileSelector(sweep_dir.path))
    return any(info.base_name.startswith("experiment_state-") for info in found)


def _close_orphaned_children(tracker: Any, parent_id: str) -> None:
    """Child runs still RUNNING when no trial runs (a sweep driver that was interrupted or killed left them so) are
    marked KILLED; a trial that the restored sweep resumes reopens its run as RUNNING."""
    from orchestrator.compare import children

    for run in children(tracker.client, parent_id):
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, status="KILLED")


def _open_parent_run(tracker: Any, spec: ExperimentSpec, sweep_dir: RunDir, spec_file: str) -> tuple[str, bool]:
    from orchestrator import tracking

    if spec.repeat is not None:
        return open_mlflow_run(tracker, spec, sweep_dir, spec_file, run_name=spec.name,
                               extra_tags={"orchestrator.kind": "repeat", "repeat": "true", "sweep": spec.name,
                                           "seeds": ",".join(map(str, spec.repeat.seeds))})
    return open_mlflow_run(tracker, spec, sweep_dir, spec_file, run_name=f"{spec.name} (sweep)",
                           extra_tags={"orchestrator.kind": "sweep", "sweep": spec.name,
                                       "tune.metric": spec.tune.metric, "tune.mode": spec.tune.mode,
                                       "tune.space": json.dumps(tracking.redact(spec.tune.space))})


def _check_trials_fit(spec: ExperimentSpec) -> None:
    """A trial whose workers the cluster can never place stops the sweep at once (PlacementError)."""
    from orchestrator.placement import check_fits

    check_fits(*placement_request(trial_spec(spec, {})), f"each trial of sweep {spec.name}")


def _trial_resources(spec: ExperimentSpec) -> dict[str, float]:
    """A trial driver only waits on its TorchTrainer; a run(cfg, ctx) method runs in it, with the run's
    resources."""
    if spec.trainer.run is None:
        return TRIAL_DRIVER
    resources = trial_spec(spec, {}).resources
    return {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}


def _tune_config(spec: ExperimentSpec, search_logs: str | None) -> Any:
    tune = spec.tune
    concurrency = tune.max_concurrent_trials or _concurrency_that_fits(spec)
    searcher = build_searcher(spec, max_concurrent=concurrency, log_dir=search_logs)
    limited_by_searcher = isinstance(searcher, BasicVariantGenerator)  # Tune wraps only Searchers in a limiter
    repeat = spec.repeat is not None  # no metric: a repeat's trials are never compared with each other
    return ray_tune.TuneConfig(metric=None if repeat else tune.metric, mode=None if repeat else tune.mode,
                               num_samples=tune.num_samples,
                               max_concurrent_trials=None if limited_by_searcher else concurrency,
                               scheduler=build_scheduler(spec), search_alg=searcher,
                               time_budget_s=tune.time_budget_s, trial_name_creator=trial_name,
                               trial_dirname_creator=trial_name, reuse_actors=_reuse_actors(spec))


def _reuse_actors(spec: ExperimentSpec) -> bool:
    """Whether one trial process serves trial after trial (TuneSpec.reuse_actors)."""
    reuse = spec.tune.reuse_actors
    return spec.trainer.run is not None if reuse is None else reuse


def _concurrency_that_fits(spec: ExperimentSpec) -> int:
    """As many trials at once as the cluster's CPUs (and GPUs) hold: each trial's workers need their own."""
    import ray

    resources = trial_spec(spec, {}).resources
    cluster = ray.cluster_resources()
    fits = [int(cluster.get("CPU", 1) // (resources.workers * resources.cpus_per_worker))]
    if resources.gpus_per_worker:
        fits.append(int(cluster.get("GPU", 0) // (resources.workers * resources.gpus_per_worker)))
    return max(1, min(fits))


def _run_config(spec: ExperimentSpec, tracking_uri: str, runs_root: str) -> Any:
    return ray_tune.RunConfig(
        name=spec.name,
        storage_path=spec.storage_path,
        failure_config=ray_tune.FailureConfig(max_failures=spec.tune.max_failures),
        # PBT clones a trial's latest checkpoint while that trial goes on: keep a few so it is still there
        checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=max(3, spec.checkpoint.keep)),
        callbacks=[ChildRunCloser(tracking_uri, runs_root, spec.optim.steps if spec.optim is not None else 1)],
        verbose=1,
    )


def trial_name(trial: Any) -> str:
    return trial.trial_id


def _finish_parent_run(tracker: Any, parent_id: str, spec: ExperimentSpec, rows: list[dict[str, Any]],
                       best: dict[str, Any] | None, status: str) -> None:
    from orchestrator import compare

    metric = spec.tune.metric
    counts = {status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped early", "error")}
    summary = {"trials/total": len(rows), "trials/completed": counts["completed"],
               "trials/stopped_early": counts["stopped early"], "trials/errored": counts["error"]}
    if best is not None:
        summary[f"best/{metric}"] = best[metric]
        tracker.client.set_tag(parent_id, "best_trial", best["trial"])
        tracker.client.set_tag(parent_id, "best_run_id", best["run_id"])
    tracker.client.log_batch(parent_id, metrics=_metrics(summary))
    with compare.scratch_dir() as tmp:
        compare.write_tables(rows, tmp / "trials")
        compare.plot_sweep(tracker.client, rows, metric, spec.tune.mode, tmp / "sweep.png")
        for name in ("trials.csv", "trials.md", "sweep.png"):
            tracker.client.log_artifact(parent_id, str(tmp / name))
    tracker.client.set_terminated(parent_id, status=status)


def _finish_repeat_run(tracker: Any, parent_id: str, status: str) -> list[dict[str, Any]]:
    """A repeat's parent: `<metric>_mean` / `<metric>_std` of every final metric over the completed seeds, and
    the per-seed table (seeds.csv, seeds.md). Only values that changed are logged, so a re-run logs nothing twice.
    Returns the per-seed rows."""
    from orchestrator import compare

    rows = compare.seed_rows(compare.children(tracker.client, parent_id))
    done = [row for row in rows if row["status"] == "completed"]
    summary = {**compare.aggregate(done), "seeds/completed": len(done)}
    logged = tracker.client.get_run(parent_id).data.metrics
    changed = {k: v for k, v in summary.items() if logged.get(k) != v}
    if changed:
        tracker.client.log_batch(parent_id, metrics=_metrics(changed))
    with compare.scratch_dir() as tmp:
        for table in compare.write_tables(rows, tmp / "seeds"):
            tracker.client.log_artifact(parent_id, str(table))
    tracker.client.set_terminated(parent_id, status=status)
    return rows


def _metrics(values: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


# ---------------------------------------------------------------------------------------------- one trial


def run_trial(config: dict[str, Any], sweep: SweepContext) -> None:
    """A Tune trial: one (re)start of the experiment with the trial's overrides, as a Ray Train run."""
    from ray.util.queue import Queue

    from orchestrator.tracking import Tracker

    trial_id = ray_tune.get_context().get_trial_id()
    base = ExperimentSpec.model_validate(yaml.safe_load(sweep.spec_yaml))  # checked in full by the sweep driver
    spec = trial_spec(base, config)
    tracker = Tracker(sweep.tracking_uri)
    trial_dir = RunDir(sweep.runs_root, trial_id)
    tags = {"mlflow.parentRunId": sweep.parent_run_id, "sweep": base.name, "trial_id": trial_id}
    name = _child_name(trial_id, config)
    if base.repeat is not None:  # a repeat's child: <name>-seed<k>, tagged with its seed
        name, tags["seed"] = f"{base.name.removesuffix(REPEAT_SUFFIX)}-seed{config['seed']}", str(config["seed"])
    run_id, _ = open_mlflow_run(tracker, spec, trial_dir, sweep.spec_file, run_name=name, extra_tags=tags)
    _log_architecture(tracker, run_id, base, config)
    start = _stage_start(ray_tune.get_checkpoint(), trial_dir)
    _log_start(tracker, run_id, trial_id, config, start)
    if spec.trainer.run is not None:
        _run_method_trial(spec, tracker, run_id, trial_dir)
        return
    loop_config = {"spec_yaml": spec_mod.to_yaml(spec), "tracking_uri": tracker.uri, "run_id": run_id,
                   "board": None, "initial_checkpoint": start.path}
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = torch_trainer(spec, loop_config, name=f"{trial_id}-{start.tag}", storage_path=sweep.runs_root,
                            callbacks=(TrialReporter(reports),))
    result = _fit_reporting_to_tune(trainer, reports)
    finish_mlflow_run(tracker, run_id, result)
    if result.error is not None:
        raise result.error  # ChildRunCloser tags the run "error" once Tune gives the trial up
    tracker.client.set_tag(run_id, STATUS_TAG, "completed")


def _run_method_trial(spec: ExperimentSpec, tracker: Any, run_id: str, trial_dir: RunDir) -> None:
    """A run(cfg, ctx) method (a benchmark lookup) runs here; each ctx.report goes to MLflow and Tune."""
    from orchestrator.method_run import MethodContext, run_method
    from orchestrator.tracking import MetricLogger

    def report(metrics: dict[str, float], step: int) -> None:
        ray_tune.report({**metrics, "step": step})

    metrics = run_method(spec, MethodContext(trial_dir, MetricLogger(tracker.uri, run_id), report))
    tracker.log_dict(run_id, metrics, "final_metrics.json")
    tracker.close(run_id, True)
    tracker.client.set_tag(run_id, STATUS_TAG, "completed")


def _log_architecture(tracker: Any, run_id: str, base: ExperimentSpec, config: dict[str, Any]) -> None:
    """An architecture trial's code, MFLOPs and parameters on its child run (tag `arch`, metrics arch/*)."""
    found = nas_search.architecture_key(base)
    if found is None or found[0] not in config:
        return
    _, code = parse_arch_value(config[found[0]])
    counts = nas_search.arch_counts(base)  # the benchmark table's numbers where it lists them
    tracker.client.set_tag(run_id, "arch", config[found[0]])
    tracker.client.log_batch(run_id, metrics=_metrics({"arch/mflops": counts.flops(code),
                                                       "arch/params_m": counts.params(code)}))


def _child_name(trial_id: str, overrides: dict[str, Any]) -> str:
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in redact(overrides).items())
    return f"{trial_id} {shown}"[:250]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class StartPoint:
    path: str | None  # a checkpoint directory under runs/<trial>/, or None for a fresh start
    tag: str  # names the Train run of this start: "fresh", or a digest of the Tune checkpoint
    source_trial: str | None  # whose checkpoint it is (another trial's after a PBT exploit)
    step: int


def _stage_start(checkpoint: Any, trial_dir: RunDir) -> StartPoint:
    """Copy the checkpoint Tune starts this trial from into runs/<trial>/start (the trial it came from may delete
    it soon), and name the Train run after it: a restart from the same checkpoint continues the same Train run."""
    if checkpoint is None:
        return StartPoint(None, "fresh", None, 0)
    import pyarrow.fs as pafs

    source_trial = Path(checkpoint.path).parent.name
    target = f"{trial_dir.path}/start"
    trial_dir.fs.delete_dir_contents(target, missing_dir_ok=True)
    trial_dir.fs.create_dir(target, recursive=True)
    pafs.copy_files(checkpoint.path, target, source_filesystem=checkpoint.filesystem,
                    destination_filesystem=trial_dir.fs)
    with trial_dir.fs.open_input_stream(f"{target}/manifest.json") as stream:
        step = int(json.loads(stream.read())["step"])
    digest = hashlib.sha1(checkpoint.path.encode()).hexdigest()[:8]
    return StartPoint(f"{trial_dir.display}/start", digest, source_trial, step)


def _log_start(tracker: Any, run_id: str, trial_id: str, config: dict[str, Any], start: StartPoint) -> None:
    """The trial's current overrides (PBT changes them) as the `tune.overrides` tag, numeric ones also as
    `hp/<key>` metrics at the step this start begins at (so a PBT schedule shows as curves), and where the start
    came from."""
    tracker.client.set_tag(run_id, "tune.overrides", json.dumps(redact(config)))
    numeric = {f"hp/{k}": float(v) for k, v in config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric = {k: v for k, v in numeric.items() if not _logged(tracker.client, run_id, k, v, start.step)}
    if numeric:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        tracker.client.log_batch(run_id, metrics=[Metric(k, v, now, start.step) for k, v in numeric.items()])
    if start.source_trial not in (None, trial_id):
        tracker.client.set_tag(run_id, "tune.restored_from", f"{start.source_trial} at step {start.step}")
        log.info("trial %s starts from %s's checkpoint at step %d", trial_id, start.source_trial, start.step)


def _logged(client: Any, run_id: str, key: str, value: float, step: int) -> bool:
    """The run has `key` = `value` at `step` already (a restored sweep starts the trial from the same point)."""
    return any(m.step == step and m.value == value for m in client.get_metric_history(run_id, key))


def _fit_reporting_to_tune(trainer: Any, reports: Any) -> Any:
    """Run `trainer.fit()` in a thread; here, pass each (metrics, checkpoint) it reports on to Tune."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = err
        finally:
            reports.put(None)

    thread = threading.Thread(target=fit, name="train-run", daemon=True)
    thread.start()
    while (item := reports.get()) is not None:
        metrics, checkpoint = item
        if checkpoint is not None:
            checkpoint = ray_tune.Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem)
        ray_tune.report(metrics, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class ChildRunCloser(ray_tune.Callback):
    """On the sweep driver: marks each trial's MLflow child run when Tune ends the trial, whether it completed,
    was stopped early by the scheduler (its driver is killed before it can say so) or failed."""

    def __init__(self, tracking_uri: str, runs_root: str, total_steps: int):
        self.tracking_uri, self.runs_root, self.total_steps = tracking_uri, runs_root, total_steps

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        step = int((trial.last_result or {}).get("step", 0))
        self._mark(trial.trial_id, "completed" if step >= self.total_steps else "stopped early", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._mark(trial.trial_id, "error", "FAILED")

    def _mark(self, trial_id: str, status: str, run_status: str) -> None:
        from mlflow.tracking import MlflowClient

        remembered = RunDir(self.runs_root, trial_id).read("mlflow_run.json")
        if remembered is None:
            return
        client = MlflowClient(self.tracking_uri)
        run_id = json.loads(remembered)["run_id"]
        client.set_tag(run_id, STATUS_TAG, status)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=run_status)
