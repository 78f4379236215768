"""The operator kinds, their features and roofline costs, and the analytic operator list of one training step of
trainers/lm.py per device: the list a tensor-parallel layout is predicted from (trace.py traces the real step for
every other layout; the analytic list has its kernels but not the elementwise work and views around them).

Each `Op` names a `kind` (one regressor per kind and dtype, or per kind and tier for collectives), its feature
values in FEATURES[kind] order, and how many times it runs per unit of its `part`:

    layer_fwd / layer_bwd   one transformer block, one micro-batch        (x layers of the stage, x micro-batches)
    first_fwd / first_bwd   the token embedding, on the first stage
    last_fwd / last_bwd     final LayerNorm, logits GEMM and cross-entropy, on the last stage

A linear layer Y (m x n) = X (m x k) W^T is the GEMM (m, n, k); its backward is dX = dY W, the GEMM (m, k, n), and
dW = dY^T X, the GEMM (n, k, m). Under tensor parallelism (Megatron) q, k, v and the MLP's up projection are split
by columns, the output and down projections by rows, with one all-reduce of the (T, d) activations after each in the
forward pass and one in the backward pass; the vocabulary is split over the tp ranks.

T = micro_batch x seq_len tokens; H heads of d_head = d / H; the MLP hidden size is mlp_ratio x d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.perfmodel.workload import Workload

FEATURES: dict[str, tuple[str, ...]] = {
    "gemm": ("m", "n", "k"),
    "sdpa_fwd": ("bh", "s", "dh"),
    "sdpa_bwd": ("bh", "s", "dh"),
    "rope_fwd": ("bh", "s", "dh"),
    "rope_bwd": ("bh", "s", "dh"),
    "layernorm_fwd": ("rows", "d"),
    "layernorm_bwd": ("rows", "d"),
    "gelu_fwd": ("numel",),
    "gelu_bwd": ("numel",),
    "add": ("numel",),
    "embedding_fwd": ("tokens", "d", "vocab"),
    "embedding_bwd": ("tokens", "d", "vocab"),
    "cross_entropy_fwd": ("tokens", "vocab"),
    "cross_entropy_bwd": ("tokens", "vocab"),
    "adamw": ("params", "tensors"),
    "grad_norm": ("params", "tensors"),
    "allreduce": ("bytes", "world"),
    "allgather": ("bytes", "world"),
    "reduce_scatter": ("bytes", "world"),
    "sendrecv": ("bytes", "world"),
}
COMPUTE = tuple(kind for kind in FEATURES if kind not in ("allreduce", "allgather", "reduce_scatter", "sendrecv"))
COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "sendrecv")


@dataclass(frozen=True)
class Op:
    kind: str
    shape: tuple[int, ...]  # FEATURES[kind]; collectives: (bytes of the full buffer, group size)
    count: float = 1.0
    part: str = "layer_fwd"
    tier: str = ""  # collectives: "intra" (one node) or "inter" (across nodes)


def linear(m: int, n: int, k: int, part: str) -> list[Op]:
    """Forward GEMM of a linear layer (part *_fwd) or its two backward GEMMs (part *_bwd)."""
    if part.endswith("_fwd"):
        return [Op("gemm", (m, n, k), 1, part)]
    return [Op("gemm", (m, k, n), 1, part), Op("gemm", (n, k, m), 1, part)]


def layer_ops(w: Workload, tp_tier: str) -> list[Op]:
    """One transformer block, forward and backward, one micro-batch on one device."""
    tokens, d, hidden, t = w.micro_batch * w.seq_len, w.d_model, w.hidden, w.tp
    bh, dh = w.micro_batch * w.n_heads // t, d // w.n_heads
    ops: list[Op] = []
    for phase in ("fwd", "bwd"):
        part = f"layer_{phase}"
        ops += [Op(f"layernorm_{phase}", (tokens, d), 2, part), Op(f"rope_{phase}", (bh, w.seq_len, dh), 2, part),
                Op(f"sdpa_{phase}", (bh, w.seq_len, dh), 1, part), Op(f"gelu_{phase}", (tokens * hidden // t,), 1, part),
                Op("add", (tokens * d,), 2, part)]
        for m, n, k in ((tokens, d // t, d), (tokens, d // t, d), (tokens, d // t, d), (tokens, d, d // t),
                        (tokens, hidden // t, d), (tokens, d, hidden // t)):
            ops += linear(m, n, k, part)
        if t > 1:
            ops.append(Op("allreduce", (tokens * d * w.word_bytes, t), 2, part, tp_tier))
    return ops


def embedding_ops(w: Workload, tp_tier: str) -> list[Op]:
    tokens, vocab = w.micro_batch * w.seq_len, w.vocab_shard
    ops = [Op("embedding_fwd", (tokens, w.d_model, vocab), 1, "first_fwd"),
           Op("embedding_bwd", (tokens, w.d_model, vocab), 1, "first_bwd")]
    if w.tp > 1:  # the vocabulary-parallel embedding sums its partial lookups
        ops.append(Op("allreduce", (tokens * w.d_model * w.word_bytes, w.tp), 1, "first_fwd", tp_tier))
    return ops


def head_ops(w: Workload, tp_tier: str) -> list[Op]:
    """Final LayerNorm, the logits GEMM against the (tied) embedding, cross-entropy over the vocabulary."""
    tokens, vocab = w.micro_batch * w.seq_len, w.vocab_shard
    ops: list[Op] = []
    for phase in ("fwd", "bwd"):
        part = f"last_{phase}"
        ops += [Op(f"layernorm_{phase}", (tokens, w.d_model), 1, part),
                Op(f"cross_entropy_{phase}", (tokens, vocab), 1, part), *linear(tokens, vocab, w.d_model, part)]
    if w.tp > 1:  # the vocabulary-parallel cross-entropy reduces its max and sum over the tp ranks
        ops.append(Op("allreduce", (tokens * 4 * 2, w.tp), 1, "last_fwd", tp_tier))
    return ops


def micro_batch_ops(w: Workload, tp_tier: str) -> list[Op]:
    """Every compute operator of one micro-batch (block, embedding, head), forward and backward."""
    return layer_ops(w, tp_tier) + embedding_ops(w, tp_tier) + head_ops(w, tp_tier)


def cost(kind: str, shape: tuple[int, ...], word: int) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one call: the roofline features of operator `kind` at `shape`, `word` bytes per
    element (fp32 states for the optimizer; collectives move bytes only, scaled by the ring algorithm's factor)."""
    if kind == "gemm":
        m, n, k = shape
        return 2.0 * m * n * k, word * (m * k + n * k + m * n)
    if kind.startswith("sdpa"):
        bh, s, dh = shape
        flops = 2.0 * bh * s * s * dh  # causal: half of QK^T and PV
        return (flops, 4.0 * word * bh * s * dh) if kind.endswith("fwd") else (2.5 * flops, 8.0 * word * bh * s * dh)
    if kind.startswith("rope"):
        numel = math.prod(shape)
        return 6.0 * numel, 4.0 * word * numel
    if kind.startswith(("layernorm", "gelu")) or kind == "add":
        numel = math.prod(shape)
        return 8.0 * numel, (2.0 if kind.endswith("fwd") else 3.0) * word * numel
    if kind.startswith("embedding"):
        tokens, d, vocab = shape
        moved = tokens * d if kind.endswith("fwd") else tokens * d + vocab * d  # backward fills a dense gradient
        return float(tokens * d), 2.0 * word * moved
    if kind.startswith("cross_entropy"):
        tokens, vocab = shape
        return 5.0 * tokens * vocab, 3.0 * 4 * tokens * vocab
    if kind in ("adamw", "grad_norm"):
        params, _ = shape
        return (12.0 if kind == "adamw" else 2.0) * params, (16.0 if kind == "adamw" else 4.0) * params
    nbytes, world = shape
    factor = {"allreduce": 2.0 * (world - 1) / world, "sendrecv": 1.0}.get(kind, (world - 1) / world)
    return 0.0, factor * nbytes
