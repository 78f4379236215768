"""Orchestrator overhead, measured in one run (does not assert):

1. the same model, data and optimizer in a plain PyTorch loop and through `launch()` with one Ray Train worker using
   every core: the steady-state steps/s ratio (orchestrator / plain; target >= 0.95) and the time to the first
   step after Ray is up (target <= 8 s), split into the driver's preparation, Ray Train's start of the worker
   group (`startup/workers_s`) and the worker's setup (`startup/setup_s`);
2. `orchestrator run experiments/quickstart.yaml` end to end, as a user types it (target <= 30 s);
3. a table-lookup search (experiments/nas_bench/macro_evolution.yaml, NAS-Bench-Macro from ../shared/data):
   `--lookups` trials with trial processes reused (the default for lookups) against `--baseline-lookups` trials
   with a process per trial (tune.reuse_actors=false); seconds per trial over the sweep's trials (target: 100
   lookups in <= 20 s end to end).

    .venv/bin/python benchmarks/overhead.py [--arch small_cnn] [--image-size 32] [--steps 400] [--lookups 100]

Writes benchmarks/results/overhead.json and logs to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def experiment(args: argparse.Namespace, storage: Path) -> dict:
    return {
        "name": f"overhead-{args.arch}-{int(time.time())}",
        "method": "supervised",
        "seed": 0,
        "data": {"dataset": "synthetic", "image_size": args.image_size, "loader_workers": 0,
                 "synthetic_per_class": 500},
        "config": {"arch": args.arch},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant", "steps": args.steps,
                  "batch_size": args.batch_size},
        "resources": {"workers": 1, "cpus_per_worker": args.threads},
        "checkpoint": {"every": args.steps},
        "log_every": args.log_every,
        "storage_path": str(storage),
        "tracking": {"experiment": "benchmarks-overhead-runs"},
    }


def plain_loop(raw: dict, threads: int) -> dict[str, float]:
    """The baseline: build data and model, then a bare loop with the same batches, model and optimizer."""
    from orchestrator import spec as spec_mod
    from orchestrator.data import build_data
    from orchestrator.launch import step_batches

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec = spec_mod.validate(raw)
    torch.manual_seed(0)
    data = build_data(spec.data, spec.seed, spec.views)
    method, cfg = spec.trainer, spec.method_config()
    model = method.build(cfg, data.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.optim.lr, momentum=spec.optim.momentum)
    batches = step_batches(data.train, spec.optim.batch_size, 0, 1, 0, 0, 0, torch.device("cpu"))
    stamps = []
    for step in range(spec.optim.steps):
        loss, _ = method.train_step(model, next(batches), cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    warm = len(stamps) // 5
    return {"first_step_s": stamps[0] - t0, "steps_per_s": (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm])}


def orchestrated(raw: dict, storage: Path) -> dict[str, float]:
    """Through launch() on a local Ray: rate from the logged windows, first step from the first log's time."""
    from mlflow.tracking import MlflowClient

    from orchestrator import spec as spec_mod
    from orchestrator.launch import launch
    from orchestrator.ray_session import init_ray

    init_ray(num_cpus=raw["resources"]["cpus_per_worker"] + 1)
    t0 = time.time()
    outcome = launch(spec_mod.validate(raw))
    client = MlflowClient(outcome.tracking_uri)
    history = {key: sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)
               for key in ("train/samples_per_s", "train/loss", "startup/workers_s", "startup/setup_s")}
    rates = history["train/samples_per_s"]
    steady = [m.value / raw["optim"]["batch_size"] for m in rates[len(rates) // 5 + 1:]]
    steps_per_s = statistics.median(steady)
    first_step_s = history["train/loss"][0].timestamp / 1000 - t0 - (raw["log_every"] - 1) / steps_per_s
    workers_s, setup_s = history["startup/workers_s"][0].value, history["startup/setup_s"][0].value
    return {"first_step_s": first_step_s, "steps_per_s": steps_per_s, "startup_workers_s": workers_s,
            "startup_setup_s": setup_s, "driver_and_first_step_s": first_step_s - workers_s - setup_s}


def command_seconds(args: list[str], storage: Path) -> float:
    """Wall seconds of `orchestrator ARGS` in a fresh process, as a user runs it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{storage}/q.db"})
    return time.perf_counter() - start


def search(lookups: int, reuse: bool, storage: Path) -> dict[str, float]:
    """The lookup search with `lookups` trials: the command's wall seconds and seconds per trial over the sweep
    (first trial's start to last trial's end, from Tune's results)."""
    name = f"lookups-{lookups}-{'reuse' if reuse else 'fresh'}"
    seconds = command_seconds(["search", "experiments/nas_bench/macro_evolution.yaml", "--set",
                               f"tune.num_samples={lookups}", f"tune.reuse_actors={str(reuse).lower()}",
                               f"storage_path={storage}", f"name={name}"], storage)
    results = [json.loads(line) for path in (storage / name).glob("*/result.json")
               for line in path.read_text().splitlines()]
    window = max(r["timestamp"] for r in results) - min(r["timestamp"] - r["time_total_s"] for r in results)
    return {"trials": len(results), "command_s": seconds, "sweep_s": window, "s_per_trial": window / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="orchestrated runs (each between two plain loops) and "
                        "quickstarts")
    parser.add_argument("--lookups", type=int, default=100)
    parser.add_argument("--baseline-lookups", type=int, default=20, help="with a process per trial (slow)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args()

    storage = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{storage / 'mlflow.db'}")
    plains, orchs = [plain_loop(experiment(args, storage), args.threads)], []
    for _ in range(args.repeats):  # alternated: the machine's speed drifts by several % within minutes
        orchs.append(orchestrated(experiment(args, storage), storage))
        plains.append(plain_loop(experiment(args, storage), args.threads))
    ratios = [o["steps_per_s"] * 2 / (before["steps_per_s"] + after["steps_per_s"])
              for o, before, after in zip(orchs, plains, plains[1:])]
    import ray

    ray.shutdown()  # the commands below start their own local Ray, as a user's do
    quickstart_s = [command_seconds(["run", "experiments/quickstart.yaml", "--set", f"storage_path={storage}",
                                     f"name=quickstart-{i}"], storage) for i in range(args.repeats)]
    reused = search(args.lookups, True, storage)
    fresh = search(args.baseline_lookups, False, storage)
    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count()},
        "plain_runs": plains,
        "orchestrator_runs": orchs,
        "steps_per_s_ratios": ratios,
        "steps_per_s_ratio": statistics.median(ratios),
        "first_step_s": statistics.median(o["first_step_s"] for o in orchs),
        "plain_first_step_s": statistics.median(p["first_step_s"] for p in plains),
        "quickstart_runs_s": quickstart_s,
        "quickstart_s": statistics.median(quickstart_s),
        "search_reused": reused,
        "search_process_per_trial": fresh,
        "s_per_trial_ratio": fresh["s_per_trial"] / reused["s_per_trial"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log_to_mlflow(result)
    print(json.dumps(result, indent=2))


def log_to_mlflow(result: dict) -> None:
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="overhead"):
        mlflow.log_params(result["config"])
        mlflow.log_metrics({
            "steps_per_s_ratio": result["steps_per_s_ratio"],
            "first_step_s": result["first_step_s"],
            "plain_first_step_s": result["plain_first_step_s"],
            "quickstart_s": result["quickstart_s"],
            "search_s_per_trial": result["search_reused"]["s_per_trial"],
            "search_command_s": result["search_reused"]["command_s"],
            "search_process_per_trial_s_per_trial": result["search_process_per_trial"]["s_per_trial"],
        })


if __name__ == "__main__":
    main()
