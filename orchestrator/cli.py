"""`orchestrator run | check | ls`: the command line.

Exit status: 0 on success, 1 when a run fails, 2 when the experiment file (or an override) is invalid; a bad
file is always reported before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from orchestrator import spec as spec_mod
from orchestrator.spec import ExperimentSpec, SpecError

log = logging.getLogger("orchestrator")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run (or resume) an experiment file on Ray and track it in MLflow")
    _add_file_args(run)
    run.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate an experiment file without running it")
    _add_file_args(check)
    check.set_defaults(func=cmd_check)

    ls = commands.add_parser("ls", help="list the methods, their papers and their experiment files")
    ls.add_argument("--experiments", default=None, help="experiments directory (default: ./experiments)")
    ls.set_defaults(func=cmd_ls)
    return parser


def _add_file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override dotted keys, e.g. --set optim.lr=0.01 config.arch=small_cnn")


def cmd_check(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.file, args.overrides)
    print(f"ok: {args.file}: {_summary(spec)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.file, args.overrides)
    _check_data_root(spec, args.file)
    log.info("%s", _summary(spec))
    import ray
    import ray.train

    from orchestrator.launch import launch

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = args.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, ignore_reinit_error=True)
    try:
        outcome = launch(spec, str(args.file))
    except ray.train.TrainingFailedError as err:
        print(f"error: run {spec.name} failed: {err}\nrun the same command again to resume it from its last "
              "checkpoint", file=sys.stderr)
        return 1
    _print_outcome(outcome)
    return 0


def _check_data_root(spec: ExperimentSpec, file: str) -> None:
    """A missing dataset directory fails here, before Ray starts (not checked by `check`: the file may be meant
    for a cluster whose nodes have the data)."""
    root = spec.data.root
    if root and "://" not in root and not spec.data.download and not Path(root).expanduser().exists():
        raise SpecError(file, "data.root", "an existing dataset directory (or data.download: true)", root)


def _summary(spec: ExperimentSpec) -> str:
    o, r = spec.optim, spec.resources
    return (f"{spec.name}: method {spec.method} on {spec.data.dataset} ({spec.views} views), {o.steps} steps of "
            f"batch {o.batch_size} with {o.name} lr {o.lr}, {r.workers} worker(s) x {r.cpus_per_worker} CPU"
            f"{f' + {r.gpus_per_worker} GPU' if r.gpus_per_worker else ''}")


def _print_outcome(outcome) -> None:  # noqa: ANN001 - launch.RunOutcome, imported lazily
    from orchestrator.tracking import display_uri

    evals = {k: v for k, v in outcome.metrics.items() if k.startswith("eval/")}
    for key, value in sorted(evals.items()):
        print(f"{key.replace('eval/', 'test ')}: {value:.4f}")
    uri = display_uri(outcome.tracking_uri)
    print(f"run directory: {outcome.run_dir}")
    print(f"MLflow run {outcome.run_id} in {uri}")
    if uri.startswith("sqlite:"):
        print(f"open the UI with: mlflow ui --backend-store-uri {uri}")


def cmd_ls(args: argparse.Namespace) -> int:
    import trainers

    experiments = _experiments_by_method(Path(args.experiments or "experiments"))
    for name in sorted(trainers.TRAINERS):
        spec = trainers.get(name)
        print(f"{name:<16} {spec.paper}")
        for path in experiments.get(name, []):
            print(f"{'':<16}   {path}")
    return 0


def _experiments_by_method(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        try:
            method = (yaml.safe_load(path.read_text()) or {}).get("method")
        except yaml.YAMLError:
            continue
        if isinstance(method, str):
            found.setdefault(method, []).append(str(path))
    return found
