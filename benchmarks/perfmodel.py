"""Validation of the performance model: predicted vs measured step time of the lm trainer under Ray, on layouts and
sizes the profile never sampled. Measures, does not assert.

    .venv/bin/python benchmarks/perfmodel.py [--profile benchmarks/results/profile_cpu.parquet] [--steps 60]

1. Profile this machine (`orchestrator profile`, one thread per rank as the runs below use), unless --profile names
   an existing table; fit the regressors (their cross-validated error per operator is printed).
2. For each held-out configuration (model size, sequence length, micro-batches, DDP or ZeRO 0-3, 1-2 workers):
   predict the step time, then run experiments/lm/stdlib_rope.yaml with those overrides through `launch` on a local
   Ray (logging every 20 steps, as the file does), and take the median of the logged windows' step times (global
   batch / train/samples_per_s), without the first window (start-up).
3. Mean and max absolute percentage error, and the time `orchestrator plan` takes for a 128-GPU, 13B-parameter
   layout search on the H100 datasheet (and on this machine's profile, fitting included).
Writes benchmarks/results/perfmodel.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator import spec as spec_mod
from orchestrator.perfmodel import plan as plan_mod
from orchestrator.perfmodel.compose import step_time
from orchestrator.perfmodel.profile import profile, read_table
from orchestrator.perfmodel.regress import FittedModel
from orchestrator.perfmodel.workload import from_spec

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASE = REPO / "experiments" / "lm" / "stdlib_rope.yaml"

# (d_model, n_layers, n_heads, seq_len, batch, grad_accum, workers, zero stage or None for DDP)
HELD_OUT = [
    (128, 4, 4, 128, 32, 1, 1, None),
    (128, 4, 4, 128, 32, 1, 2, None),
    (128, 4, 4, 128, 32, 1, 2, 0),
    (128, 4, 4, 128, 32, 1, 2, 1),
    (128, 4, 4, 128, 32, 1, 2, 2),
    (128, 4, 4, 128, 32, 1, 2, 3),
    (256, 2, 4, 64, 32, 2, 2, 2),
    (192, 6, 6, 256, 16, 1, 1, None),
    (64, 8, 4, 512, 8, 2, 2, None),
    (256, 4, 8, 128, 32, 1, 1, 3),
    (96, 3, 3, 96, 48, 3, 2, 1),
    (320, 2, 5, 128, 16, 1, 2, 0),
]


def overrides(config: tuple, steps: int, storage: str) -> list[str]:
    d, layers, heads, seq, batch, accum, workers, zero = config
    name = f"perf-d{d}-l{layers}-s{seq}-b{batch}-m{accum}-w{workers}-z{'ddp' if zero is None else zero}"
    return [f"name={name}", f"config.d_model={d}", f"config.n_layers={layers}", f"config.n_heads={heads}",
            f"data.seq_len={seq}", f"optim.batch_size={batch}", f"optim.grad_accum={accum}", f"optim.steps={steps}",
            f"resources.workers={workers}", "resources.cpus_per_worker=1", "resources.max_failures=0",
            "resources.deepspeed=null" if zero is None else f"resources.deepspeed.zero_stage={zero}",
            f"eval.every={steps}", "eval.batch_size=8", f"checkpoint.every={steps}", f"storage_path={storage}",
            "tracking.experiment=perfmodel-validation"]


def measured_step(run_id: str, tracking_uri: str, batch: int) -> float:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return statistics.median(batch / r for r in rates)


def validate(model: FittedModel, steps: int) -> list[dict]:
    import ray

    from orchestrator.launch import launch

    ray.init(num_cpus=4, ignore_reinit_error=True, runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for config in HELD_OUT:
            spec = spec_mod.load(BASE, overrides(config, steps, storage) +
                                 [f"tracking.tracking_uri=sqlite:///{storage}/mlflow.db"])
            workload = from_spec(spec)
            predicted = step_time(workload, model, plan_mod.overlap_of(model))
            outcome = launch(spec, str(BASE))
            measured = measured_step(outcome.run_id, outcome.tracking_uri, spec.optim.batch_size)
            rows.append({"config": spec.name, "params_m": workload.params() / 1e6, "predicted_s": predicted.step,
                         "measured_s": measured, "error_pct": 100 * (predicted.step / measured - 1),
                         **{f"pred_{k}": v for k, v in predicted.as_dict().items() if k != "step"}})
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    return rows


def plan_time(table: Path) -> dict:
    """Seconds for `plan` over every layout of a 13B-parameter model on 128 H100s (16 nodes) from the datasheet,
    and over the layouts of 13B on 128 ranks of this machine's profile (reading and fitting it included)."""
    spec = spec_mod.load(REPO / "experiments" / "lm" / "gpt13b_zero3.yaml")
    started = time.perf_counter()
    rows = plan_mod.plan(spec, plan_mod.predictor_for("h100"), devices=128, nodes=16)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    plan_mod.plan(spec, plan_mod.predictor_for(str(table)), devices=128, nodes=64)
    return {"seconds": seconds, "layouts": len(rows), "fits": sum(r["fits"] for r in rows),
            "best": next(r for r in rows if r["fits"]), "seconds_with_profile_fit": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="an existing profile table (default: profile now)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    table = Path(args.profile) if args.profile else RESULTS / "profile_cpu.parquet"
    if not args.profile:
        import ray

        ray.init(num_cpus=2, ignore_reinit_error=True)  # 2 ranks of 1 thread, as the 2-worker runs below
        started = time.perf_counter()
        profile(table, samples=args.samples, threads=1)
        print(f"profiled in {time.perf_counter() - started:.0f} s -> {table}")
        ray.shutdown()
    model = FittedModel(*read_table(table))
    fits = model.summary()
    rows = validate(model, args.steps)
    errors = [abs(r["error_pct"]) for r in rows]
    result = {"hardware": model.hardware, "regressors": fits, "held_out": rows,
              "mape": statistics.mean(errors), "max_ape": max(errors), "plan": plan_time(table)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "perfmodel.json").write_text(json.dumps(result, indent=1, default=float))
    (RESULTS / "perfmodel.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"# Performance model on {result['hardware']}", "",
             "| held-out configuration | params (M) | predicted s/step | measured s/step | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['params_m']:.2f} | {r['predicted_s']:.4f} | {r['measured_s']:.4f} | "
              f"{r['error_pct']:+.1f}% |" for r in result["held_out"]]
    lines += ["", f"Mean absolute percentage error {result['mape']:.1f}%, max {result['max_ape']:.1f}%.", "",
              "Cross-validated error per operator, time-weighted (the choice) and plain MAPE:", "",
              "| operator | key | chosen | analytic | hybrid | forest |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['kind']} | {f['key']} | {f['choice']} | " + " | ".join(
              f"{f.get(f'cv_wape_{n}', float('nan')):.1f}% ({f.get(f'cv_mape_{n}', float('nan')):.1f}%)"
              for n in ("analytic", "hybrid", "forest")) + " |" for f in result["regressors"]]
    plan = result["plan"]
    best = json.dumps(plan["best"], default=float)
    lines += ["", (f"`plan` for 128 H100s (datasheet), 13B parameters: {plan['layouts']} layouts ({plan['fits']} "
                   f"fit) in {plan['seconds']:.2f} s; best: {best}"),
              (f"From this machine's profile (reading and fitting the regressors included): "
              f"{plan['seconds_with_profile_fit']:.1f} s.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
