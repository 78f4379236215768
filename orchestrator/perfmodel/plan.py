"""`orchestrator plan FILE --gpus N [--nodes M] [--hardware h100 | PROFILE.parquet]`: every parallel layout of
an lm experiment on N devices, with predicted step time, tokens/s, memory per device, run time and device-hours.

Layouts: tp (inside a node, dividing the heads) x pp (dividing the layers) x dp = N; micro-batches of 1, 2, 4, ...
sequences per rank; DDP or ZeRO 0-3 (ZeRO-1 only with tp or pp, as Megatron's distributed optimizer);
activation checkpointing on or off. A layout whose memory estimate exceeds 90% of the device's memory does not fit.
The fastest fitting layout the orchestrator can run (data parallel only: `runnable`) is written as an experiment
file (FILE with its base merged in and the layout set, under the name `<name>-planned`), with the table beside
it; the whole plan is logged to MLflow.

Predictions run in two passes: the first records every operator and collective the layouts need, which are then
predicted in one batch per operator kind (a forest's predict call costs milliseconds whatever its batch), and the
second composes the step times from those.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from orchestrator import preflight
from orchestrator import spec as spec_mod
from orchestrator.compare import write_tables
from orchestrator.perfmodel.compose import run_summary, step_time
from orchestrator.perfmodel.profile import read_table
from orchestrator.perfmodel.regress import DATASHEETS, Datasheet, FittedModel
from orchestrator.perfmodel.workload import Workload, from_spec
from orchestrator.spec import ExperimentSpec

MEMORY_HEADROOM = 0.9


class Cached:
    """A predictor that answers from a table of (kind, key, shape) -> seconds, filled in batches; `recording`
    collects what is asked (answering 1 s) so that the table can be filled before the real pass."""

    def __init__(self, predictor: Any):
        self.inner, self.table = predictor, {}
        self.hardware, self.devices_per_node = predictor.hardware, predictor.devices_per_node
        self.busy_factor, self.sync_skew = predictor.busy_factor, predictor.sync_skew
        self.overheads, self.contention = predictor.overheads, predictor.contention
        self.recording: set[tuple[str, str, tuple[float, ...]]] | None = None

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        rows = [tuple(float(v) for v in shape) for shape in np.asarray(shapes)]
        if self.recording is not None:
            self.recording.update((kind, key, row) for row in rows if (kind, key, row) not in self.table)
            return np.ones(len(rows))
        return np.array([self.table[(kind, key, row)] for row in rows])

    def fill(self) -> None:
        wanted: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        for kind, key, row in self.recording or ():
            wanted.setdefault((kind, key), []).append(row)
        for (kind, key), rows in wanted.items():
            for row, seconds in zip(rows, self.inner.predict(kind, key, np.array(rows))):
                self.table[(kind, key, row)] = float(seconds)
        self.recording = None


def predictor_for(hardware: str) -> Datasheet | FittedModel:
    """A datasheet name (a100, h100, h200, gh200) or the path of a profile table."""
    if hardware.lower() in DATASHEETS:
        return DATASHEETS[hardware.lower()]
    if not hardware.endswith(".parquet"):
        raise ValueError(f"--hardware {hardware!r}: a profile table (.parquet from `orchestrator profile`) or one of "
                         f"{sorted(DATASHEETS)}")
    return FittedModel(*read_table(hardware))


def memory_limit(predictor: Any) -> float:
    if isinstance(predictor, Datasheet):
        return predictor.memory
    return float(predictor.meta.get("memory_bytes") or float("inf"))


def overlap_of(predictor: Any) -> float:
    """1 when collectives run beside compute (GPUs), 0 on CPUs."""
    return 1.0 if isinstance(predictor, Datasheet) or predictor.meta.get("device") == "cuda" else 0.0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(base: Workload, devices: int, devices_per_node: int) -> list[Workload]:
    found = []
    for tp in divisors(devices):
        if tp > devices_per_node or base.n_heads % tp:
            continue
        for pp in divisors(devices // tp):
            dp = devices // (tp * pp)
            if base.n_layers % pp or base.batch % dp:
                continue
            per_rank = base.batch // dp
            micro_batches = [b for b in (2**i for i in range(12)) if b <= per_rank and per_rank % b == 0]
            zeros = (None, 0, 1, 2, 3) if tp == pp == 1 else (None, 1)
            for micro, zero, ckpt in product(micro_batches, zeros, (False, True)):
                if dp == 1 and zero is not None and zero > 0:
                    continue  # nothing to shard over
                found.append(base.with_layout(dp=dp, tp=tp, pp=pp, grad_accum=per_rank // micro, zero=zero,
                                              checkpointing=ckpt))
    return found


def plan(spec: ExperimentSpec, predictor: Any, devices: int, nodes: int = 1, path: str = "<memory>") -> list[dict]:
    """Every layout of `spec` on `devices` devices over `nodes` nodes, fitting ones first, fastest first."""
    if devices % nodes:
        raise ValueError(f"--devices {devices} is not a multiple of --nodes {nodes}")
    base = from_spec(spec, path)
    dtypes = getattr(predictor, "dtypes", [base.dtype])
    if base.dtype not in dtypes:  # e.g. a bf16 GPU experiment planned on a CPU's fp32 profile
        base = base.with_layout(dtype=dtypes[0])
    cached, overlap, limit = Cached(predictor), overlap_of(predictor), memory_limit(predictor)
    cached.devices_per_node = devices // nodes  # the cluster asked for, not the profiled one
    candidates = layouts(base.with_layout(dp=1, tp=1, pp=1, grad_accum=1, zero=None), devices, devices // nodes)
    cached.recording = set()
    for w in candidates:
        step_time(w, cached, overlap)
    cached.fill()
    rows = []
    for w in candidates:
        breakdown = step_time(w, cached, overlap)
        memory = w.memory_bytes()
        rows.append({"dp": w.dp, "tp": w.tp, "pp": w.pp, "zero": "ddp" if w.zero is None else w.zero,
                     "micro_batch": w.micro_batch, "grad_accum": w.grad_accum, "checkpointing": w.checkpointing,
                     **run_summary(w, breakdown, spec.optim.steps), "memory_gib": memory["total"] / 2**30,
                     "fits": memory["total"] <= MEMORY_HEADROOM * limit, "runnable": w.runnable,
                     **{f"t_{k}": v for k, v in breakdown.as_dict().items() if k != "step"}})
    rows.sort(key=lambda r: (not r["fits"], r["step_s"]))
    return rows


def override(spec_file: str, overrides: list[str], row: dict[str, Any]) -> str:
    """The experiment file (its base merged in, the `--set` overrides applied) with the layout of `row`: a file
    that runs on its own under a new name."""
    zero = row["zero"]
    layout = {"config.activation_checkpointing": row["checkpointing"], "optim.grad_accum": row["grad_accum"],
              "resources.workers": row["dp"], "resources.deepspeed": None if zero == "ddp" else {"zero_stage": zero}}
    raw = spec_mod.load_raw(spec_file, overrides)
    raw = spec_mod.with_overrides(raw, {"name": f"{raw['name']}-planned", **layout}, spec_file)
    preflight.validate(raw, spec_file)
    header = (f"# Written by `orchestrator plan` from {spec_file}: the fastest layout the orchestrator can run, "
              f"predicted {row['step_s']:.3f} s/step,\n# {row['tokens_per_s']:.0f} tokens/s, {row['memory_gib']:.1f} GiB "
              f"per device, {row['run_hours']:.1f} h for the run ({row['device_hours']:.0f} device-hours).\n")
    return header + yaml.safe_dump(raw, sort_keys=False)


COLUMNS = ("dp", "tp", "pp", "zero", "micro_batch", "grad_accum", "checkpointing", "step_s", "tokens_per_s",
           "memory_gib", "run_hours", "device_hours", "fits", "runnable")


def summary_rows(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The fastest `limit` layouts, in the columns a terminal shows."""
    return [{column: row[column] for column in COLUMNS} for row in rows[:limit]]


def best_runnable(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["fits"] and r["runnable"]), None)


def write(spec: ExperimentSpec, spec_file: str, overrides: list[str], rows: list[dict[str, Any]],
          out: Path) -> dict[str, Path]:
    """plan.csv and plan.md (every layout) and, when one fits, `<name>.planned.yaml`."""
    out.mkdir(parents=True, exist_ok=True)
    files = dict(zip(("csv", "md"), write_tables(rows, out / "plan")))
    chosen = best_runnable(rows)
    if chosen is not None:
        files["override"] = out / f"{spec.name}.planned.yaml"
        files["override"].write_text(override(spec_file, overrides, chosen))
    return files


def log_to_mlflow(tracking_uri: str, spec: ExperimentSpec, spec_file: str, hardware: str, devices: int, nodes: int,
                  rows: list[dict[str, Any]], files: dict[str, Path], seconds: float) -> str:
    """One MLflow run in the experiment `plan`, named after the experiment: parameters, the best layouts' numbers
    as metrics, the table and the override as artifacts. Returns the run id."""
    from orchestrator.tracking import Tracker, redact_yaml

    tracker = Tracker(tracking_uri)
    client = tracker.client
    run = client.create_run(tracker.experiment_id("plan"), run_name=f"plan {spec.name}", tags={"orchestrator.command": "plan",
                                                                              "experiment_file": spec_file})
    run_id = run.info.run_id
    for key, value in {"hardware": hardware, "devices": devices, "nodes": nodes, "layouts": len(rows),
                       "layouts_fitting": sum(r["fits"] for r in rows), "file": spec_file}.items():
        client.log_param(run_id, key, value)
    for prefix, row in (("best", rows[0] if rows and rows[0]["fits"] else None), ("runnable", best_runnable(rows))):
        for key in ("step_s", "tokens_per_s", "memory_gib", "run_hours", "device_hours") if row else ():
            client.log_metric(run_id, f"{prefix}/{key}", float(row[key]))
    client.log_metric(run_id, "plan_seconds", seconds)
    for path in files.values():
        if path.suffix == ".yaml":  # the override, a whole experiment file: its secrets stay out of MLflow
            client.log_text(run_id, redact_yaml(path.read_text()), path.name)
        else:
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
