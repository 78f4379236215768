"""Orchestrator overhead: the same model, data and optimizer in a plain PyTorch loop and through
`orchestrator run` with one Ray Train worker. Measures, does not assert.

    .venv/bin/python benchmarks/overhead.py [--arch small_cnn] [--image-size 32] [--steps 400]

Reports the steady-state steps/s ratio (orchestrator / plain; target >= 0.95) and the time to first step of
each, to benchmarks/results/overhead.json and to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
        "data": {"dataset": "synthetic", "image_size": args.image_size, "loader_workers": 0, "synthetic_per_class": 500},
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


def orchestrated(raw: dict, storage: Path, dashboard: bool) -> dict[str, float]:
    """Through launch() on a local Ray: rate from the logged windows, first step from the first log's time."""
    from mlflow.tracking import MlflowClient

    from orchestrator import spec as spec_mod
    from orchestrator.launch import launch
    from orchestrator.ray_session import init_ray

    init_ray(dashboard=dashboard, num_cpus=raw["resources"]["cpus_per_worker"] + 1)
    t0 = time.time()
    outcome = launch(spec_mod.validate(raw))
    client = MlflowClient(outcome.tracking_uri)
    rates = sorted(client.get_metric_history(outcome.run_id, "train/samples_per_s"), key=lambda m: m.step)
    losses = sorted(client.get_metric_history(outcome.run_id, "train/loss"), key=lambda m: m.step)
    steady = [m.value / raw["optim"]["batch_size"] for m in rates[len(rates) // 5 + 1:]]
    steps_per_s = statistics.median(steady)
    first_log_s = losses[0].timestamp / 1000 - t0
    return {"first_step_s": first_log_s - (raw["log_every"] - 1) / steps_per_s, "steps_per_s": steps_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (orchestrator run --dashboard)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    args = parser.parse_args()

    storage = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{storage / 'mlflow.db'}")
    raw = experiment(args, storage)
    before = plain_loop(raw, args.threads)
    orch = orchestrated(raw, storage, args.dashboard)
    after = plain_loop(raw, args.threads)  # before and after: the machine's drift shows in the spread
    plain = {k: (before[k] + after[k]) / 2 for k in before}
    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpus": os.cpu_count()},
        "plain": plain,
        "plain_runs_steps_per_s": [before["steps_per_s"], after["steps_per_s"]],
        "orchestrator": orch,
        "steps_per_s_ratio": orch["steps_per_s"] / plain["steps_per_s"],
        "first_step_extra_s": orch["first_step_s"] - plain["first_step_s"],
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
            "plain_steps_per_s": result["plain"]["steps_per_s"],
            "orchestrator_steps_per_s": result["orchestrator"]["steps_per_s"],
            "steps_per_s_ratio": result["steps_per_s_ratio"],
            "plain_first_step_s": result["plain"]["first_step_s"],
            "orchestrator_first_step_s": result["orchestrator"]["first_step_s"],
        })


if __name__ == "__main__":
    main()
