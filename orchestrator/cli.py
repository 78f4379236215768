"""`orchestrator run | sweep | search | submit | compare | profile | plan | check | ls`: the command line.

Exit status: 0 on success, 1 when a run fails (or a search's searcher cannot go on, e.g. GENIUS's endpoint fails: a
one-line error, the sweep's state kept), 2 when the experiment file (or an override) is invalid or another live
driver runs the same `storage_path/name` (orchestrator/run_lock.py); both are reported before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from orchestrator import preflight, run_lock
from orchestrator import spec as spec_mod
from orchestrator.placement import PlacementError
from orchestrator.spec import ExperimentSpec, Shown, SpecError

log = logging.getLogger("orchestrator")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _file_after_overrides(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (SpecError, run_lock.RunLocked, PlacementError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="orchestrator", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run (or resume) an experiment file on Ray and track it in MLflow")
    _add_file_args(run)
    _add_ray_args(run)
    run.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2", help="run it once per seed, as "
                     "one repeat (mean +- std in MLflow; overrides the file's `repeat:` block)")
    run.add_argument("--reeval", action="store_true", help="evaluate a finished run's final checkpoint again "
                     "(without it, a finished run's stored result is printed and Ray is not started)")
    run.set_defaults(func=cmd_run)

    sweep = commands.add_parser("sweep", help="run (or resume) the Ray Tune sweep of an experiment file's `tune:` block")
    _add_file_args(sweep)
    _add_ray_args(sweep)
    sweep.set_defaults(func=cmd_sweep)

    search = commands.add_parser("search", help="run (or resume) an architecture search: a sweep whose `tune.space` "
                                 "holds an `architecture` key, searched by GENIUS, evolution, TPE or random")
    _add_file_args(search)
    _add_ray_args(search)
    search.set_defaults(func=cmd_search)

    submit = commands.add_parser("submit", help="run an experiment file (run, sweep or search) as a Ray job on a "
                                 "cluster, streaming its logs")
    _add_file_args(submit)
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265 (do not "
                        "expose it without authentication)")
    submit.add_argument("--working-dir", default=".", help="the project directory to upload (default: .)")
    submit.add_argument("--python", default="python", help="the Python on the cluster that has the project's "
                        "dependencies (default: python)")
    submit.add_argument("--tracking-uri", default=None, help="MLflow for the job (default: $MLFLOW_TRACKING_URI, "
                        "else the file's tracking.tracking_uri)")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.set_defaults(func=cmd_submit)

    compare = commands.add_parser("compare", help="compare MLflow runs: differing params, final metrics, curves")
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids")
    compare.add_argument("--experiment", default=None, help="every run of this MLflow experiment")
    compare.add_argument("--sweep", default=None, metavar="ID_OR_NAME", help="the trials of a sweep (parent run id or name)")
    compare.add_argument("--repeat", nargs="+", default=[], metavar="ID_OR_NAME", help="the seeds of repeats (parent "
                         "run id or name <name>-repeat), as mean +- std")
    compare.add_argument("--by-seed", action="store_true", help="one row per group of runs that differ only by seed, "
                         "mean +- std (the default when a repeat is named)")
    compare.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: eval/* and train/loss)")
    compare.add_argument("--out", default="compare", help="directory for compare.csv, compare.md, compare.png")
    compare.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    compare.set_defaults(func=cmd_compare)

    profile = commands.add_parser("profile", help="micro-benchmark the performance model's operators on this "
                                  "hardware and the collectives over the Ray cluster's nodes, into a Parquet table")
    profile.add_argument("--out", default=None, help="the table (default: profiles/<host>-<cpu|cuda>.parquet)")
    profile.add_argument("--samples", type=_positive_int, default=40, help="shapes per operator kind (default: 40)")
    profile.add_argument("--threads", type=_positive_int, default=1, help="CPU threads per rank on a CPU cluster, "
                         "as the runs to predict use (their resources.cpus_per_worker; default: 1)")
    profile.add_argument("--quick", action="store_true", help="tiny shapes only, in seconds: checks a cluster's "
                         "set-up, too small to plan with")
    _add_ray_args(profile)
    profile.set_defaults(func=cmd_profile)

    plan = commands.add_parser("plan", help="predict the step time, memory and run time of an lm experiment under "
                               "every parallel layout on N GPUs, and write the fastest as an override")
    _add_file_args(plan)
    plan.add_argument("--gpus", "--devices", dest="devices", type=_positive_int, required=True, help="devices in all")
    plan.add_argument("--nodes", type=_positive_int, default=1, help="nodes they are spread over (default: 1)")
    plan.add_argument("--hardware", default="h100", help="a profile table from `orchestrator profile`, or a "
                      "datasheet: a100, h100, h200, gh200 (default: h100)")
    plan.add_argument("--out", default=None, help="directory for plan.csv, plan.md and the override (default: "
                      "plans/<name>)")
    plan.add_argument("--top", type=_positive_int, default=15, help="layouts to print (default: 15)")
    plan.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the file's "
                      "tracking.tracking_uri, else sqlite:///mlflow.db")
    plan.set_defaults(func=cmd_plan)

    check = commands.add_parser("check", help="validate an experiment file without running it")
    _add_file_args(check)
    check.set_defaults(func=cmd_check)

    ls = commands.add_parser("ls", help="list the methods, their papers and their experiment files")
    ls.add_argument("--experiments", default=None, help="experiments directory (default: ./experiments)")
    ls.set_defaults(func=cmd_ls)
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors on one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def _seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2` (range and uniqueness are checked with the file, as `repeat.seeds`)."""
    try:
        return [int(word) for word in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integer seeds such as 0,1,2, found {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _add_file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override dotted keys, e.g. --set optim.lr=0.01 config.arch=small_cnn (before or after "
                        "the file)")


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def _file_after_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--set a=1 FILE`: --set takes every following word, so the file is the override without a `=`."""
    if "overrides" not in args or args.file is not None:
        return
    words = [word for word in args.overrides if "=" not in word]
    if len(words) != 1:
        parser.error("the following arguments are required: file")
    args.file = words[0]
    args.overrides = [word for word in args.overrides if word != args.file]


def cmd_check(args: argparse.Namespace) -> int:
    spec = preflight.load(args.file, args.overrides)
    print(f"ok: {args.file}: {_summary(spec)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator import references

    seeds = [] if args.seeds is None else [f"repeat.seeds={args.seeds}"]
    spec = references.resolve(preflight.load(args.file, [*args.overrides, *seeds]), args.file)
    if spec.repeat is not None and spec.tune is None:
        return _run_repeat(args, spec)
    preflight.before_ray(spec, args.file, "run")
    log.info("%s", _summary(spec))
    import ray.train

    from orchestrator.checkpoint import CheckpointWriteError
    from orchestrator.launch import find_error, finished_outcome, launch

    finished = finished_outcome(spec)
    if finished is not None and not args.reeval:
        _print_finished(*finished)
        return 0
    with run_lock.hold(spec.storage_path, spec.name):
        _init_ray(args)
        try:
            outcome = launch(spec, str(args.file))
        except ray.train.TrainingFailedError as err:
            reason = find_error(err, CheckpointWriteError) or err  # its own message, without Ray's wrapping
            print(f"error: run {spec.name} failed: {reason}\n{_failure_hint(str(reason))}", file=sys.stderr)
            return 1
    _print_outcome(outcome)
    return 0


def _run_repeat(args: argparse.Namespace, spec: ExperimentSpec) -> int:
    """The experiment once per seed, as a sweep over `seed` (orchestrator/tune.py, "Repeats"); 0 when every seed
    completed."""
    from orchestrator.tune import finished_repeat, repeat_spec

    spec = repeat_spec(spec, args.file)
    preflight.before_ray(spec, args.file, "repeat")
    finished = finished_repeat(spec)
    if finished is not None:
        print(f"every seed of repeat {spec.name} has finished; its stored result:")
        _print_repeat(finished)
        return 0
    log.info("repeat over seeds %s of %s", spec.repeat.seeds, _summary(spec))
    outcome = _sweep_under_lock(args, spec, "repeat")
    if outcome is None:
        return 1
    _print_repeat(outcome)
    if _interrupted(outcome, spec, "repeat"):
        return 1
    return 0 if all(r["status"] == "completed" for r in outcome.rows) else 1


def _sweep_under_lock(args: argparse.Namespace, spec: ExperimentSpec, kind: str):
    """tune.sweep(spec) holding the run's lock on a started Ray; None, after a one-line error, when it failed (its
    state is kept: the same command resumes it)."""
    from ray.tune import TuneError

    from orchestrator.nas_search import SearchError
    from orchestrator.tune import sweep

    with run_lock.hold(spec.storage_path, spec.name):
        _init_ray(args)
        try:
            return sweep(spec, str(args.file))
        except TuneError as err:
            print(f"error: {kind} {spec.name} failed: {err}\nrun the same command again to resume it", file=sys.stderr)
        except SearchError as err:  # e.g. GENIUS's endpoint failed: one line, the sweep's state kept
            print(f"error: {kind} {spec.name} stopped: {' '.join(str(err).split())} (its state is kept: run the same "
                  "command again to resume it)", file=sys.stderr)
    return None


def _interrupted(outcome, spec: ExperimentSpec, kind: str) -> bool:
    if outcome.interrupted:
        print(f"{kind} {spec.name} was interrupted: run the same command again to resume it", file=sys.stderr)
    return outcome.interrupted


def _print_repeat(outcome) -> None:
    from orchestrator.compare import aggregate, format_table
    from orchestrator.tracking import display_uri, ui_link

    print(format_table([{k: v for k, v in r.items() if k != "run_id"} for r in outcome.rows]))
    summary = aggregate([r for r in outcome.rows if r["status"] == "completed"])
    for key in sorted(k.removesuffix("_mean") for k in summary if k.endswith("_mean")):
        print(f"{key}: {summary[key + '_mean']:.4f} ± {summary[key + '_std']:.4f}")
    print(f"repeat directory: {outcome.sweep_dir}")
    print(f"MLflow parent run {outcome.parent_run_id} in {display_uri(outcome.tracking_uri)}")
    print(f"the repeat in the UI: {ui_link(outcome.tracking_uri, outcome.parent_run_id)}")


def _print_finished(outcome, finished_at: float) -> None:
    import time

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(finished_at))
    print(f"run {Path(outcome.run_dir).name} finished on {when}; its stored result (add --reeval to evaluate its "
          "final checkpoint again):")
    _print_outcome(outcome)


def _failure_hint(error: str) -> str:
    if "non-finite" in error:
        return ("the loss diverged: running it again meets the same step; change `optim` or `config` and give a new "
                "`name`, or resume the last verified checkpoint")
    if "checkpoint write failed" in error:
        return ("free space (or fix the permissions) where it names, then run the same command again to resume from "
                "the last verified checkpoint")
    if "worker group startup timed out" in error:
        return ("the cluster did not place the workers within resources.placement_timeout_s: free resources or "
                "raise it, then run the same command again to resume")
    if "unreadable dataset file" in error:
        return "repair or remove that file, then run the same command again to resume from the last checkpoint"
    return "run the same command again to resume it from its last checkpoint"


def cmd_search(args: argparse.Namespace) -> int:
    from orchestrator.nas_search import architecture_key

    spec = preflight.load(args.file, args.overrides)
    if spec.tune is None or architecture_key(spec) is None:
        raise SpecError(args.file, "tune.space", "an architecture key for `orchestrator search`, e.g. "
                        "config.arch: {architecture: nas_bench_macro}", spec.tune.space if spec.tune else None)
    return cmd_sweep(args, spec)


def cmd_sweep(args: argparse.Namespace, spec: ExperimentSpec | None = None) -> int:
    spec = spec or preflight.load(args.file, args.overrides)
    if spec.tune is None:
        raise SpecError(args.file, "tune", "a `tune:` block (metric, mode, space, ...) for `orchestrator sweep`",
                        None)
    from orchestrator import references

    spec = references.resolve(spec, args.file)
    preflight.before_ray(spec, args.file, "sweep")
    log.info("sweep of %s", _summary(spec))
    outcome = _sweep_under_lock(args, spec, "sweep")
    if outcome is None:
        return 1
    _print_sweep(outcome, spec)
    if _interrupted(outcome, spec, "sweep"):
        return 1
    return 0 if any(r["status"] != "error" for r in outcome.rows) else 1


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate here (exit 2 before anything is sent), then submit; 0 when the job succeeds."""
    from orchestrator.submit import prepare, submit

    spec = preflight.load(args.file, args.overrides)
    submission = prepare(spec, args.file, list(args.overrides), Path(args.working_dir), args.python,
                         args.tracking_uri)
    preflight.check_server(args.address, "orchestrator submit", "--address")
    status = submit(args.address, submission, wait=not args.no_wait)
    print(f"job {submission.submission_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator import compare

    uri = preflight.check_mlflow("orchestrator compare", args.tracking_uri, existing=True)
    try:
        client = MlflowClient(uri)
        runs = compare.resolve_runs(client, args.run_ids, args.experiment, args.sweep, args.repeat)
        by_seed = args.by_seed or bool(args.repeat) or any(compare.is_repeat(client.get_run(i)) for i in args.run_ids)
    except (LookupError, MlflowException) as err:
        print(f"error: orchestrator compare: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    preflight.check_writable(args.out, "orchestrator compare", "--out")
    table, files = compare.compare(client, runs, args.metrics, Path(args.out), by_seed)
    print(table)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import socket

    import ray

    from orchestrator.perfmodel.profile import CALIBRATION, profile, read_table
    from orchestrator.perfmodel.regress import FittedModel

    if args.out and Path(args.out).is_dir():
        raise SpecError("orchestrator profile", "--out", "a Parquet file to write", Shown("a directory"))
    preflight.check_writable(Path(args.out).parent if args.out else "profiles", "orchestrator profile", "--out")
    _init_ray(args)
    device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    out = Path(args.out or f"profiles/{socket.gethostname()}-{device}.parquet")
    if args.quick:
        profile(out, samples=min(args.samples, 12), collective_points=3, threads=args.threads, cap_scale=1e-3,
                calibration=CALIBRATION[:2], zero3_calibration=CALIBRATION[:1], calibration_steps=(6, 2))
    else:
        profile(out, samples=args.samples, threads=args.threads)
    model = FittedModel(*read_table(out))
    print(f"{'operator':<18} {'key':<9} {'chosen':<9} cross-validated time-weighted error: analytic / hybrid / forest")
    for row in model.summary():
        errors = " / ".join(f"{row.get(f'cv_wape_{n}', float('nan')):.1f}%" for n in ("analytic", "hybrid", "forest"))
        print(f"{row['kind']:<18} {row['key']:<9} {row['choice']:<9} {errors}")
    print(f"wrote {out} ({model.hardware})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import time

    from orchestrator.compare import format_table
    from orchestrator.perfmodel import plan as plan_mod
    from orchestrator.tracking import display_uri

    spec = preflight.load(args.file, args.overrides)
    uri = preflight.check_mlflow(args.file, from_flag=args.tracking_uri, from_file=spec.tracking.tracking_uri)
    preflight.check_writable(args.out or f"plans/{spec.name}", "orchestrator plan", "--out")
    if args.devices % args.nodes:
        print(f"error: --gpus {args.devices} must be a positive multiple of --nodes {args.nodes}", file=sys.stderr)
        return 2
    try:
        predictor = plan_mod.predictor_for(args.hardware)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.nodes > 1 and getattr(predictor, "meta", {}).get("nodes", 0) == 1:
        print(f"note: {args.hardware} profiled one node: collectives across nodes are predicted from its one-node "
              "samples (profile a multi-node cluster for that tier)", file=sys.stderr)
    started = time.perf_counter()
    rows = plan_mod.plan(spec, predictor, args.devices, args.nodes, str(args.file))
    seconds = time.perf_counter() - started
    files = plan_mod.write(spec, str(args.file), list(args.overrides), rows, Path(args.out or f"plans/{spec.name}"))
    print(f"{spec.name} on {args.devices} x {predictor.hardware} over {args.nodes} node(s): {len(rows)} layouts, "
          f"{sum(r['fits'] for r in rows)} fit in memory, predicted in {seconds:.2f} s")
    print(format_table(plan_mod.summary_rows(rows, args.top)))
    if "override" in files:
        print(f"fastest layout the orchestrator runs: {files['override']} (run it with `orchestrator run "
              f"{files['override']}`)")
    else:
        print("no data-parallel layout fits in memory: see the tp/pp rows, or add devices", file=sys.stderr)
    run_id = plan_mod.log_to_mlflow(uri, spec, str(args.file), predictor.hardware, args.devices, args.nodes, rows,
                                    files, seconds)
    print(f"wrote {files['csv'].parent}; MLflow run {run_id} in {display_uri(uri)}")
    return 0


def _init_ray(args: argparse.Namespace) -> None:
    from orchestrator.ray_session import init_ray

    init_ray(args.address)


def _summary(spec: ExperimentSpec) -> str:
    o, r = spec.optim, spec.resources
    if o is None or spec.data is None:
        from orchestrator.tracking import redact

        return f"{spec.name}: method {spec.method} ({spec.trainer.paper}), config {redact(spec.config)}"
    return (f"{spec.name}: method {spec.method} on {spec.data.dataset} ({spec.views} views), {o.steps} steps of "
            f"batch {o.batch_size} with {o.name} lr {o.lr}, {r.workers} worker(s) x {r.cpus_per_worker} CPU"
            f"{f' + {r.gpus_per_worker} GPU' if r.gpus_per_worker else ''}")


def _print_outcome(outcome) -> None:
    from orchestrator.tracking import display_uri, ui_link

    evals = {k: v for k, v in outcome.metrics.items() if k.startswith("eval/")}
    for key, value in sorted(evals.items()):
        print(f"{key.replace('eval/', 'test ')}: {value:.4f}")
    uri = display_uri(outcome.tracking_uri)
    print(f"run directory: {outcome.run_dir}")
    print(f"MLflow run {outcome.run_id} in {uri}")
    if uri.startswith("sqlite:"):
        print(f"open the UI with: mlflow ui --backend-store-uri {uri}")
    print(f"the run in the UI: {ui_link(outcome.tracking_uri, outcome.run_id)}")


def _print_sweep(outcome, spec: ExperimentSpec) -> None:
    from orchestrator.compare import format_table
    from orchestrator.tracking import display_uri, ui_link

    print(format_table([{k: v for k, v in r.items() if k != "run_id"} for r in outcome.rows]))
    stopped = sum(r["status"] == "stopped early" for r in outcome.rows)
    print(f"{len(outcome.rows)} trials, {stopped} stopped early by the scheduler")
    if outcome.best is not None:
        print(f"best trial {outcome.best['trial']}: {spec.tune.metric} = {outcome.best[spec.tune.metric]:.4f} "
              f"(MLflow run {outcome.best['run_id']})")
        _print_best_architecture(outcome.best, spec)
    uri = display_uri(outcome.tracking_uri)
    print(f"sweep directory: {outcome.sweep_dir}")
    print(f"MLflow parent run {outcome.parent_run_id} in {uri}")
    if uri.startswith("sqlite:"):
        print(f"open the UI with: mlflow ui --backend-store-uri {uri}")
    print(f"the sweep in the UI: {ui_link(outcome.tracking_uri, outcome.parent_run_id)}")


def _print_best_architecture(best: dict, spec: ExperimentSpec) -> None:
    from orchestrator.nas_search import arch_counts, architecture_key
    from trainers.nas import parse_arch_value

    found = architecture_key(spec)
    if found is None or found[0] not in best:
        return
    space, code = parse_arch_value(best[found[0]])
    counts = arch_counts(spec)
    print(f"best architecture: {best[found[0]]} ({counts.flops(code):.1f} MFLOPs, {counts.params(code):.3f} M params"
          f"; as a list {space.answer_list(code)})")


def cmd_ls(args: argparse.Namespace) -> int:
    import trainers

    if args.experiments and not Path(args.experiments).is_dir():
        raise SpecError("orchestrator ls", "--experiments", "a directory of experiment files", args.experiments)
    experiments = _experiments_by_method(Path(args.experiments or "experiments"))
    for name in sorted(trainers.TRAINERS):
        spec = trainers.get(name)
        print(f"{name:<16} {spec.paper}")
        for path in experiments.pop(name, []):
            print(f"{'':<16}   {path}")
    for name, paths in sorted(experiments.items()):  # an unknown method, or a file that does not load
        print(f"{name:<16} {'not a known method' if name != '?' else 'files that do not load or name no method'}")
        for path in paths:
            print(f"{'':<16}   {path}")
    return 0


def _experiments_by_method(root: Path) -> dict[str, list[str]]:
    """Every experiment file under root by its method, read with its `base:` (files that do not load, or name no
    method, under "?")."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        try:
            method = spec_mod.load_raw(path).get("method")
        except SpecError:
            method = None
        found.setdefault(method if isinstance(method, str) else "?", []).append(str(path))
    return found
