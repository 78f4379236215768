"""From operator times to a step time: layers, stages, the 1F1B pipeline, and the data-parallel reductions.

    t_f, t_b      forward / backward of one micro-batch on a stage: its L/pp blocks (TP all-reduces inside), plus
                  the embedding on the first stage and the head on the last; checkpointing adds t_f to t_b
    pipeline      pp = 1: m (t_f + t_b);  pp > 1 (1F1B): (m + pp - 1) (max over stages of t_f + t_b + 2 t_p2p)
    data parallel DDP:    all-reduce of the gradients once per step, overlapped with the last backward pass
                  ZeRO-0: all-reduce at the step boundary;  ZeRO-1: reduce-scatter at the boundary + all-gather
                  of the updated weights;  ZeRO-2: reduce-scatter after every micro-batch + the all-gather;
                  ZeRO-3: per micro-batch, all-gathers of the weights module by module for forward and again for
                  backward, and a reduce-scatter of the gradients, overlapped with that micro-batch's compute
    optimizer     gradient-norm clipping and AdamW over this device's parameters (its ZeRO shard; DeepSpeed
                  steps two flat fp32 partitions, DDP the model's tensors)

`overlap` is how much of a collective hides behind compute: 1 on GPUs (NCCL runs on its own stream), 0 on CPUs
(gloo's threads compete with the compute for the same cores). Operators are sampled alone; how a whole step slows
when every rank of a node runs one, and what a synchronous step loses to its slowest rank, are the profile's
reference-step factors (node_slowdown; regress.node_factors). A collective's tier is "intra" when its group fits
in one node (ranks are numbered tp fastest, then pp, then dp), else "inter".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from orchestrator.perfmodel.ops import Op, micro_batch_ops
from orchestrator.perfmodel.workload import Workload

DDP_BUCKET_BYTES = 25 * 2**20


class Predictor(Protocol):
    hardware: str
    devices_per_node: int
    busy_factor: float
    sync_skew: float

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray: ...


@dataclass
class Breakdown:
    """Seconds per optimizer step, by part (`step` is their sum)."""

    forward: float  # all micro-batches, the pipeline's bottleneck stage
    backward: float
    bubble: float  # 1F1B warm-up and drain
    pipeline_p2p: float
    dp_comm: float  # exposed part of the gradient reduction and ZeRO's collectives
    optimizer: float
    step: float = 0.0

    def __post_init__(self) -> None:
        self.step = self.forward + self.backward + self.bubble + self.pipeline_p2p + self.dp_comm + self.optimizer

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def tier(group: int, stride: int, devices_per_node: int) -> str:
    """A group of `group` ranks `stride` apart fits in one node or not."""
    return "intra" if group * stride <= devices_per_node else "inter"


def predict_ops(ops: list[Op], predictor: Predictor, key: str) -> np.ndarray:
    """Seconds of each op (one call), predicted in one batch per (kind, key); `key` for the compute ops."""
    seconds = np.zeros(len(ops))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, op in enumerate(ops):
        groups.setdefault((op.kind, op.tier or key), []).append(i)
    for (kind, group_key), index in groups.items():
        seconds[index] = predictor.predict(kind, group_key, np.array([ops[i].shape for i in index]))
    return seconds


def collective(predictor: Predictor, kind: str, nbytes: float, world: int, group_tier: str) -> float:
    if world <= 1 or nbytes <= 0:
        return 0.0
    return float(predictor.predict(kind, group_tier, np.array([[nbytes, world]]))[0])


def step_time(w: Workload, predictor: Predictor, overlap: float) -> Breakdown:
    dpn = predictor.devices_per_node
    ops = micro_batch_ops(w, tier(w.tp, 1, dpn))
    seconds = predict_ops(ops, predictor, w.dtype) * node_slowdown(w, predictor)
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
                     optimizer=optimizer_time(w, predictor) * node_slowdown(w, predictor))


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
    gather = sum(collective(predictor, "allgather", p * w.word_bytes, w.dp, dp_tier) for p in w.module_params())
    per_micro = 2 * gather + run("reduce_scatter")
    return w.grad_accum * max(per_micro - overlap * t_micro, per_micro / max(1, w.n_layers // w.pp))


def node_slowdown(w: Workload, predictor: Predictor) -> float:
    """The profile's step-level factors: compute slows by busy_factor when the layout puts several ranks on a node,
    and a synchronous data-parallel step loses sync_skew of it to waiting for its slowest rank."""
    busy = predictor.busy_factor if min(w.devices, predictor.devices_per_node) > 1 else 1.0
    return busy * (1.0 + (predictor.sync_skew if w.devices > 1 else 0.0))


def optimizer_time(w: Workload, predictor: Predictor) -> float:
    params = w.stage_params() / (w.dp if (w.zero or 0) >= 1 else 1)
    tensors = 2 if w.zero is not None else 12 * (w.n_layers // w.pp) + 3
    shape = np.array([[params, tensors]])
    seconds = float(predictor.predict("adamw", "float32", shape)[0])
    if w.clip_grad:
        seconds += float(predictor.predict("grad_norm", "float32", shape)[0])
    return seconds


def run_summary(w: Workload, breakdown: Breakdown, steps: int) -> dict[str, Any]:
    hours = steps * breakdown.step / 3600
    return {"step_s": breakdown.step, "tokens_per_s": w.batch * w.seq_len / breakdown.step, "run_hours": hours,
            "device_hours": hours * w.devices}
