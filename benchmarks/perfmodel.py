"""Accuracy of the performance model: predicted vs measured step time of the lm trainer under Ray, on configurations
the profile never sampled. Measures, does not assert.

    .venv/bin/python benchmarks/perfmodel.py [--profile benchmarks/results/profile_cpu.parquet] [--steps 220]
        [--sets test,validation,noise]

1. Profile this machine (`orchestrator profile`, one thread per rank as the runs below use), unless --profile names
   an existing table; fit the regressors (their cross-validated error per operator is printed).
2. For each configuration of the chosen sets (model width, depth, sequence, micro-batches, DDP or ZeRO 0-3, 1-2
   workers): predict the step time, then run experiments/lm/stdlib_rope.yaml with those overrides through `launch` on
   a local Ray, logging every 20 steps as the file does, and take the median of the logged windows' step times
   (global batch / train/samples_per_s) without the first window (start-up): 220 steps give 10 windows.
   - `test`: frozen before the model's changes of issue 31 and never used to develop it: its error is the model's.
   - `validation`: the configurations the model's error sources were studied on; use these to develop it.
   - `noise`: the first four test configurations run again, for the measurement's run-to-run spread; each row also
     has its windows' spread within the run.
3. Mean and max absolute percentage error per set, and the time `orchestrator plan` takes for a 128-GPU,
   13B-parameter layout search on the H100 datasheet (and on this machine's profile, fitting included).
Writes benchmarks/results/perfmodel.{md,json} after each set. `--repredict` runs nothing: it predicts the measured
rows of the results file again with the current model (a new profile, or --profile's), e.g. after a model change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict
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
TEST = [  # frozen on 2026-12-07, before the model changes of issue 31; do not tune the model on these
    (64, 2, 2, 64, 32, 1, 1, None),
    (160, 3, 4, 128, 16, 2, 1, None),
    (224, 2, 7, 64, 24, 1, 2, None),
    (96, 6, 4, 192, 8, 1, 2, 0),
    (128, 2, 4, 256, 8, 4, 2, 1),
    (192, 3, 6, 96, 16, 1, 2, 2),
    (144, 4, 4, 160, 12, 2, 2, 3),
    (288, 1, 8, 128, 16, 1, 1, 3),
    (80, 5, 5, 320, 4, 2, 1, None),
    (256, 3, 8, 48, 64, 1, 2, None),
    (112, 7, 4, 64, 32, 1, 2, 2),
    (384, 2, 6, 64, 8, 2, 2, 1),
    (48, 4, 3, 384, 8, 1, 1, 0),
    (176, 2, 4, 224, 8, 1, 2, 3),
]
VALIDATION = [  # the held-out set of the first model, whose errors were then studied on it
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
SETS = {"test": TEST, "validation": VALIDATION, "noise": TEST[:4]}


def config_name(config: tuple) -> str:
    d, layers, heads, seq, batch, accum, workers, zero = config
    return f"perf-d{d}-l{layers}-s{seq}-b{batch}-m{accum}-w{workers}-z{'ddp' if zero is None else zero}"


def overrides(config: tuple, steps: int, storage: str, run_name: str) -> list[str]:
    d, layers, heads, seq, batch, accum, workers, zero = config
    return [f"name={run_name}", f"config.d_model={d}", f"config.n_layers={layers}", f"config.n_heads={heads}",
            f"data.seq_len={seq}", f"optim.batch_size={batch}", f"optim.grad_accum={accum}", f"optim.steps={steps}",
            f"resources.workers={workers}", "resources.cpus_per_worker=1", "resources.max_failures=0",
            "resources.deepspeed=null" if zero is None else f"resources.deepspeed.zero_stage={zero}",
            f"eval.every={steps}", "eval.batch_size=8", f"checkpoint.every={steps}", f"storage_path={storage}",
            "tracking.experiment=perfmodel-validation"]


def window_steps(run_id: str, tracking_uri: str, batch: int) -> list[float]:
    """Seconds per step of each logged window but the first (start-up)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/samples_per_s")
    return [batch / m.value for m in sorted(history, key=lambda m: m.step)][1:]


def prediction(config: tuple, model: FittedModel, steps: int, storage: str, set_name: str) -> tuple:
    """(spec, workload, predicted breakdown) of a configuration."""
    spec = spec_mod.load(BASE, overrides(config, steps, storage, f"{config_name(config)}-{set_name}") +
                         [f"tracking.tracking_uri=sqlite:///{storage}/mlflow.db"])
    workload = from_spec(spec)
    return spec, workload, step_time(workload, model, plan_mod.overlap_of(model))


def predicted_fields(predicted, measured: float) -> dict:
    return {"predicted_s": predicted.step, "error_pct": 100 * (predicted.step / measured - 1),
            **{f"pred_{k}": v for k, v in predicted.as_dict().items() if k != "step"}}


def row(config: tuple, workload, predicted, windows: list[float]) -> dict:
    measured = statistics.median(windows)
    return {"config": config_name(config), "params_m": workload.params() / 1e6, "measured_s": measured,
            "windows": len(windows), "window_spread_pct": 100 * statistics.pstdev(windows) / measured,
            "window_s": windows, **predicted_fields(predicted, measured)}


def measure(set_name: str, model: FittedModel, steps: int, storage: str) -> list[dict]:
    """One run per configuration of the set on the local Ray: predicted and measured seconds per step. Run names
    carry the set, so a configuration measured again is a new run rather than a resumed one."""
    from orchestrator.launch import launch

    rows = []
    for config in SETS[set_name]:
        spec, workload, predicted = prediction(config, model, steps, storage, set_name)
        outcome = launch(spec, str(BASE))
        rows.append(row(config, workload, predicted,
                        window_steps(outcome.run_id, outcome.tracking_uri, spec.optim.batch_size)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def repredicted(rows: list[dict], set_name: str, model: FittedModel, steps: int) -> list[dict]:
    """The set's measured rows with the predictions of `model` (the measurements stand as they are)."""
    configs = {config_name(config): config for config in SETS[set_name]}
    out = []
    for measured in rows:
        _, _, predicted = prediction(configs[measured["config"]], model, steps, "/nonexistent", set_name)
        out.append({**measured, **predicted_fields(predicted, measured["measured_s"])})
    return out


def summary(rows: list[dict]) -> dict:
    errors = [abs(r["error_pct"]) for r in rows]
    return {"rows": rows, "mape": statistics.mean(errors), "max_ape": max(errors)}


def run_to_run(noise: list[dict], test: list[dict]) -> list[dict]:
    """Each noise run against the test run of the same configuration: their difference over their mean."""
    first = {r["config"]: r["measured_s"] for r in test}
    return [{"config": r["config"], "first_s": first[r["config"]], "again_s": r["measured_s"],
             "spread_pct": 200 * abs(r["measured_s"] - first[r["config"]]) / (r["measured_s"] + first[r["config"]])}
            for r in noise if r["config"] in first]


def plan_time(table: Path) -> dict:
    """Seconds for `plan` over every layout of a 13B-parameter model on 128 H100s (16 nodes) from the datasheet
    (the tracer's one-time import apart), and over the layouts of 13B on 128 ranks of this machine's profile
    (reading and fitting it included)."""
    spec = spec_mod.load(REPO / "experiments" / "lm" / "gpt13b_zero3.yaml")
    started = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401 (imports torch._dynamo, once a process)

    imports = time.perf_counter() - started
    started = time.perf_counter()
    rows = plan_mod.plan(spec, plan_mod.predictor_for("h100"), devices=128, nodes=16)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    plan_mod.plan(spec, plan_mod.predictor_for(str(table)), devices=128, nodes=64)
    return {"seconds": seconds, "trace_imports_s": imports, "layouts": len(rows), "fits": sum(r["fits"] for r in rows),
            "best": next(r for r in rows if r["fits"]), "seconds_with_profile_fit": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="an existing profile table (default: profile now)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=220, help="logged every 20: 220 steps give 10 windows after "
                        "the first")
    parser.add_argument("--sets", default="test,validation,noise", help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--repredict", action="store_true", help="run nothing: predict the measured rows of "
                        "benchmarks/results/perfmodel.json again, with the model of --profile (or a new profile)")
    args = parser.parse_args()
    names = args.sets.split(",")
    if unknown := set(names) - set(SETS):
        parser.error(f"--sets: unknown {sorted(unknown)}; expected some of {', '.join(SETS)}")
    table = Path(args.profile) if args.profile else RESULTS / "profile_cpu.parquet"
    if not args.profile:
        import ray

        ray.init(num_cpus=2, ignore_reinit_error=True)  # 2 ranks of 1 thread, as the 2-worker runs below
        started = time.perf_counter()
        profile(table, samples=args.samples, threads=1)
        print(f"profiled in {time.perf_counter() - started:.0f} s -> {table}")
        ray.shutdown()
    model = FittedModel(*read_table(table))
    result = {"hardware": model.hardware, "profile_sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
              "steps": args.steps, "regressors": model.summary(), "overheads": asdict(model.overheads),
              "node_factors": {"busy": model.busy_factor, "sync_skew": model.sync_skew}, "plan": plan_time(table)}
    if args.repredict:
        write(repredict_sets(result, model, names))
        return
    result["sets"] = earlier_sets(result)
    from orchestrator.ray_session import init_ray

    init_ray(num_cpus=4)
    with tempfile.TemporaryDirectory() as storage:
        for name in names:
            result["sets"][name] = summary(measure(name, model, args.steps, storage))
            if {"noise", "test"} <= set(result["sets"]):
                result["run_to_run"] = run_to_run(result["sets"]["noise"]["rows"], result["sets"]["test"]["rows"])
            write(result)


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "perfmodel.json").write_text(json.dumps(result, indent=1, default=float))
    (RESULTS / "perfmodel.md").write_text(markdown(result))
    print(markdown(result))


def repredict_sets(result: dict, model: FittedModel, names: list[str]) -> dict:
    """The earlier results' measurements of the named sets, predicted by `model`; the run-to-run spread kept."""
    earlier = json.loads((RESULTS / "perfmodel.json").read_text())
    if earlier["steps"] != result["steps"]:
        raise SystemExit(f"--repredict: the results were measured over {earlier['steps']} steps, not {result['steps']}")
    sets = {name: summary(repredicted(earlier["sets"][name]["rows"], name, model, result["steps"]))
            for name in names if name in earlier["sets"]}
    return {**result, "sets": sets, "repredicted": True,
            **({"run_to_run": earlier["run_to_run"]} if "run_to_run" in earlier else {})}


def earlier_sets(result: dict) -> dict:
    """The sets of benchmarks/results/perfmodel.json measured with the same profile table and steps: a later
    invocation with --profile and other --sets adds to them (the same model predicted every row)."""
    path = RESULTS / "perfmodel.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    same = all(earlier.get(k) == result[k] for k in ("profile_sha256", "steps"))
    return earlier.get("sets", {}) if same else {}


def markdown(result: dict) -> str:
    lines = [f"# Performance model on {result['hardware']}", ""]
    if result.get("repredicted"):
        lines += ["The measurements are an earlier invocation's; the predictions are this model's (`--repredict`).", ""]
    for name, found in result["sets"].items():
        lines += [f"## {name} set ({len(found['rows'])} configurations, {result['steps']} steps each)", "",
                  "| configuration | params (M) | predicted s/step | measured s/step | error | windows | "
                  "window spread |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['params_m']:.2f} | {r['predicted_s']:.4f} | {r['measured_s']:.4f} | "
                  f"{r['error_pct']:+.1f}% | {r['windows']} | {r['window_spread_pct']:.1f}% |" for r in found["rows"]]
        lines += ["", f"Mean absolute percentage error {found['mape']:.1f}%, max {found['max_ape']:.1f}%.", ""]
    if result.get("run_to_run"):
        lines += ["Run-to-run spread (the noise floor): the same configuration measured twice.", "",
                  "| configuration | first s/step | again s/step | spread |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['first_s']:.4f} | {r['again_s']:.4f} | {r['spread_pct']:.1f}% |"
                  for r in result["run_to_run"]]
        spreads = [r["spread_pct"] for r in result["run_to_run"]]
        lines += ["", f"Mean run-to-run spread {statistics.mean(spreads):.1f}%, max {max(spreads):.1f}%.", ""]
    if "overheads" in result:
        o, f = result["overheads"], result["node_factors"]
        lines += [f"Fitted on the profile's calibration steps: {1e6 * o['dispatch_s']:.1f} us per traced call without "
                  f"a kernel, {1e3 * o['micro_s']:.2f} ms per micro-batch, {1e3 * o['step_s']:.2f} ms per step, "
                  f"{1e6 * o['module_s']:.1f} us per module and micro-batch under ZeRO-3; reference step: busy "
                  f"factor {f['busy']:.3f}, sync skew {f['sync_skew']:.3f}.", ""]
    lines += ["Cross-validated error per operator, time-weighted (the choice) and plain MAPE:", "",
              "| operator | key | chosen | analytic | hybrid | forest |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['kind']} | {f['key']} | {f['choice']} | " + " | ".join(
              f"{f.get(f'cv_wape_{n}', float('nan')):.1f}% ({f.get(f'cv_mape_{n}', float('nan')):.1f}%)"
              for n in ("analytic", "hybrid", "forest")) + " |" for f in result["regressors"]]
    plan = result["plan"]
    best = json.dumps(plan["best"], default=float)
    lines += ["", (f"`plan` for 128 H100s (datasheet), 13B parameters: {plan['layouts']} layouts ({plan['fits']} "
                   f"fit) in {plan['seconds']:.2f} s (and once a process {plan.get('trace_imports_s', 0):.1f} s to "
                   f"import the fake-tensor tracer); best: {best}"),
              (f"From this machine's profile (reading and fitting the regressors included): "
              f"{plan['seconds_with_profile_fit']:.1f} s.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
