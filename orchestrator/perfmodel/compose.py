"""From operator times to a step time: layers, stages, the 1F1B pipeline, and the data-parallel reductions.

    operators     one micro-batch's calls, from a trace of the real step (trace.py; tp = 1) or the analytic list of
                  ops.py (tp > 1); a call with no kernel of its own costs the fitted dispatch time
    t_f, t_b      forward / backward of one micro-batch on a stage: its L/pp blocks (TP all-reduces inside), plus
                  the embedding on the first stage and the head on the last; checkpointing adds t_f to t_b
    pipeline      pp = 1: m (t_f + t_b);  pp > 1 (1F1B): (m + pp - 1) (max over stages of t_f + t_b + 2 t_p2p)
    data parallel DDP:    all-reduce of the gradients once per step, overlapped with the last backward pass
                  ZeRO-0: all-reduce at the step boundary;  ZeRO-1: reduce-scatter at the boundary + all-gather
                  of the updated weights;  ZeRO-2: reduce-scatter after every micro-batch + the all-gather;
                  ZeRO-3: per micro-batch, the all-gathers DeepSpeed issues (zero3_gathers) and a reduce-scatter of
                  the gradients, overlapped with that micro-batch's compute
    optimizer     gradient-norm clipping and AdamW over this device's parameters (its ZeRO shard; DeepSpeed
                  steps two flat fp32 partitions, DDP the model's tensors)
    overhead      the step loop's own time (Overheads: per step, per micro-batch, DeepSpeed ZeRO-3's module hooks)

`overlap` is how much of a collective hides behind compute: 1 on GPUs (NCCL runs on its own stream), 0 on CPUs
(gloo's threads compete with the compute for the same cores). When the layout puts several ranks on a node, each
compute operator slows by its own contention factor (the profile times every other shape with the node's every
rank busy: a large memory-bound operator loses more than a small one), the rest of the step by the reference
step's busy factor, and a synchronous data-parallel step loses sync_skew of it to waiting for its slowest rank
(regress.node_factors). A collective's tier is "intra" when its group fits in one node (ranks are numbered tp
fastest, then pp, then dp), else "inter".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from orchestrator.perfmodel.ops import COLLECTIVES, Op, micro_batch_ops
from orchestrator.perfmodel.trace import traced_ops
from orchestrator.perfmodel.workload import Workload

DDP_BUCKET_BYTES = 25 * 2**20
DS_PERSISTENCE_THRESHOLD = 10**5  # DeepSpeed's stage3_param_persistence_threshold (elements)
DS_MAX_REUSE_DISTANCE = 10**9  # its stage3_max_reuse_distance (elements)


@dataclass(frozen=True)
class Overheads:
    """What a step costs beyond its operators and collectives, fitted on real steps (regress.fit_overheads); zero
    for a datasheet, whose GPU hides the host's work behind its kernels."""

    dispatch_s: float = 0.0  # one traced call without a kernel of its own (a view, a detach, ...)
    step_s: float = 0.0  # per optimizer step: the loop, its logging windows, the schedule
    micro_s: float = 0.0  # per micro-batch: fetching and collating the batch, the loss bookkeeping
    module_s: float = 0.0  # per module and micro-batch under ZeRO-3: DeepSpeed's fetch and release hooks


class Predictor(Protocol):
    hardware: str
    devices_per_node: int
    busy_factor: float
    sync_skew: float
    overheads: Overheads

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray: ...

    def contention(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray: ...


@dataclass
class Breakdown:
    """Seconds per optimizer step, by part (`step` is their sum)."""

    forward: float  # all micro-batches, the pipeline's bottleneck stage
    backward: float
    bubble: float  # 1F1B warm-up and drain
    pipeline_p2p: float
    dp_comm: float  # exposed part of the gradient reduction and ZeRO's collectives
    optimizer: float
    overhead: float = 0.0  # the step loop's own time
    step: float = 0.0

    def __post_init__(self) -> None:
        self.step = (self.forward + self.backward + self.bubble + self.pipeline_p2p + self.dp_comm + self.optimizer
                     + self.overhead)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def tier(group: int, stride: int, devices_per_node: int) -> str:
    """A group of `group` ranks `stride` apart fits in one node or not."""
    return "intra" if group * stride <= devices_per_node else "inter"


def predict_ops(ops: list[Op] | tuple[Op, ...], predictor: Predictor, key: str, shared: bool = False) -> np.ndarray:
    """Seconds of each op (one call), predicted in one batch per (kind, key); `key` for the compute ops. `shared`:
    the node's every rank runs at once, so compute slows by each operator's contention factor."""
    seconds = np.zeros(len(ops))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, op in enumerate(ops):
        groups.setdefault((op.kind, op.tier or key), []).append(i)
    for (kind, group_key), index in groups.items():
        if kind == "dispatch":
            seconds[index] = predictor.overheads.dispatch_s * (predictor.busy_factor if shared else 1.0)
            continue
        shapes = np.array([ops[i].shape for i in index])
        seconds[index] = predictor.predict(kind, group_key, shapes)
        if shared and kind not in COLLECTIVES:
            seconds[index] *= predictor.contention(kind, group_key, shapes)
    return seconds


def operators(w: Workload, devices_per_node: int) -> list[Op]:
    """One micro-batch's operators: traced from the real step, or (tensor parallel) the analytic list."""
    return list(traced_ops(w)) if w.tp == 1 else micro_batch_ops(w, tier(w.tp, 1, devices_per_node))


def collective(predictor: Predictor, kind: str, nbytes: float, world: int, group_tier: str) -> float:
    if world <= 1 or nbytes <= 0:
        return 0.0
    return float(predictor.predict(kind, group_tier, np.array([[nbytes, world]]))[0])


def dispatch_calls(w: Workload) -> float:
    """Traced calls without a kernel of their own in one optimizer step (all micro-batches, the largest stage)."""
    per_micro = {part: 0.0 for part in ("layer", "first", "last")}
    for op in operators(w, 1):
        if op.kind == "dispatch":
            per_micro[op.part.split("_")[0]] += op.count
    layers = w.n_layers // w.pp
    return w.grad_accum * (layers * per_micro["layer"] + per_micro["first"] + per_micro["last"])


def step_time(w: Workload, predictor: Predictor, overlap: float) -> Breakdown:
    dpn = predictor.devices_per_node
    shared = min(w.devices, dpn) > 1
    skew = 1.0 + (predictor.sync_skew if w.devices > 1 else 0.0)
    ops = operators(w, dpn)
    seconds = predict_ops(ops, predictor, w.dtype, shared) * skew
    part = {name: 0.0 for name in ("layer_fwd", "layer_bwd", "first_fwd", "first_bwd", "last_fwd", "last_bwd")}
    for op, t in zip(ops, seconds):
        part[op.part] += op.count * t
    layers = w.n_layers // w.pp
    layer_f, layer_b = part["layer_fwd"], part["layer_bwd"] + (part["layer_fwd"] if w.checkpointing else 0.0)
    stages = [(layers * layer_f + part["first_fwd"], layers * layer_b + part["first_bwd"]),
              (layers * layer_f + part["last_fwd"], layers * layer_b + part["last_bwd"])]
    if w.pp == 1:
        stages = [(stages[0][0] + part["last_fwd"], stages[0][1] + part["last_bwd"])]
    t_f, t_b = max(stages, key=sum)
    m = w.grad_accum
    p2p = 0.0
    if w.pp > 1:
        activation = w.micro_batch * w.seq_len * w.d_model * w.word_bytes
        p2p = 2 * collective(predictor, "sendrecv", activation, 2, tier(w.pp, w.tp, dpn))
    bubble = (w.pp - 1) * (t_f + t_b + p2p)
    dp_comm = data_parallel_comm(w, predictor, t_b, t_f + t_b, overlap)
    return Breakdown(forward=m * t_f, backward=m * t_b, bubble=bubble, pipeline_p2p=m * p2p, dp_comm=dp_comm,
                     optimizer=optimizer_time(w, predictor, shared) * skew,
                     overhead=loop_overhead(w, predictor.overheads) * (predictor.busy_factor if shared else 1.0) * skew)


def loop_overhead(w: Workload, overheads: Overheads) -> float:
    """The step loop's own seconds per step; under ZeRO-3 DeepSpeed's hooks on every module of the stage."""
    hooks = overheads.module_s * w.modules() if w.zero == 3 else 0.0
    return overheads.step_s + w.grad_accum * (overheads.micro_s + hooks)


def data_parallel_comm(w: Workload, predictor: Predictor, t_backward: float, t_micro: float, overlap: float) -> float:
    """Exposed seconds of the gradient reduction and ZeRO's weight collectives, per step."""
    dp_tier = tier(w.dp, w.tp * w.pp, predictor.devices_per_node)
    grads = w.stage_params() * w.word_bytes

    def run(kind: str) -> float:
        return collective(predictor, kind, grads, w.dp, dp_tier)

    if w.zero is None:
        reduce = run("allreduce")
        last_bucket = reduce / max(1, math.ceil(grads / DDP_BUCKET_BYTES))
        return max(last_bucket, reduce - overlap * t_backward)
    if w.zero == 0:
        return run("allreduce")
    if w.zero == 1:
        return run("reduce_scatter") + run("allgather")
    if w.zero == 2:
        return w.grad_accum * run("reduce_scatter") + run("allgather")
    gather = sum(collective(predictor, "allgather", nbytes, w.dp, dp_tier) for nbytes in zero3_gathers(w))
    per_micro = gather + run("reduce_scatter")
    return w.grad_accum * max(per_micro - overlap * t_micro, per_micro / max(1, w.n_layers // w.pp))


def zero3_gathers(w: Workload) -> list[int]:
    """Bytes of each all-gather DeepSpeed's ZeRO-3 issues in one micro-batch, at its defaults: as each module's
    forward begins, its parameters above the persistence threshold (smaller ones are gathered once and kept),
    coalesced into one call; in the backward pass again those it released in between, i.e. whose next use lies
    more than the maximum reuse distance of parameter elements ahead (the later modules' forward and backward)."""
    tensors = w.module_tensors()
    gathered = [sum(n for n in module if n > DS_PERSISTENCE_THRESHOLD) for module in tensors]
    elements = [sum(module) for module in tensors]
    later = np.cumsum(elements[::-1])[::-1] - elements  # elements of the modules after each one
    again = [n for n, ahead in zip(gathered, later) if 2 * ahead > DS_MAX_REUSE_DISTANCE]
    return [n * w.word_bytes for n in gathered + again if n]


def optimizer_time(w: Workload, predictor: Predictor, shared: bool = False) -> float:
    params = w.stage_params() / (w.dp if (w.zero or 0) >= 1 else 1)
    tensors = 2 if w.zero is not None else 12 * (w.n_layers // w.pp) + 3
    ops = [Op("adamw", (params, tensors))] + ([Op("grad_norm", (params, tensors))] if w.clip_grad else [])
    return float(predict_ops(ops, predictor, "float32", shared).sum())


def run_summary(w: Workload, breakdown: Breakdown, steps: int) -> dict[str, Any]:
    hours = steps * breakdown.step / 3600
    return {"step_s": breakdown.step, "tokens_per_s": w.batch * w.seq_len / breakdown.step, "run_hours": hours,
            "device_hours": hours * w.devices}
