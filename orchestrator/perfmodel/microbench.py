"""Timing one operator in isolation: the same PyTorch calls trains/lm.py makes, on the device and dtype asked for.

Compute operators run in this process: `warmup` calls, then the median of `iters` timed calls (the paper: 10 and
10), synchronising CUDA around each call (the median predicted one-rank steps best here: -0.8 to +1.1% against
+2.8 to +6.3% with the mean). A backward operator is timed as `torch.autograd.grad` of its forward
output, the graph built once and kept. Collectives run across Ray actors (`CollectiveBench`), one per rank, each
timing its own calls after a barrier; the operator's time is the slowest rank's median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lab_kernels.complex_attention import apply_rope
from orchestrator.optim import build_optimizer
from orchestrator.spec import OptimSpec


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 10,
                     statistic: Callable[[list[float]], float] = statistics.median) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistic(times)


def _backward(out: torch.Tensor, inputs: list[torch.Tensor]) -> Callable[[], object]:
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def compute_call(kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    """A no-argument callable that runs operator `kind` at `shape` (ops.FEATURES order) once."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    phase = kind.rsplit("_", 1)[-1]
    if kind == "gemm":
        m, n, k = shape
        x, weight = rand(m, k), rand(n, k)
        return lambda: F.linear(x, weight)
    if kind.startswith(("sdpa", "rope")):
        bh, s, dh = shape
        q, k, v = rand(1, bh, s, dh, grad=True), rand(1, bh, s, dh, grad=True), rand(1, bh, s, dh, grad=True)
        positions = torch.arange(s, device=device)
        if kind.startswith("rope"):
            forward = lambda: apply_rope(q, positions)
            return forward if phase == "fwd" else _backward(forward(), [q])
        forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return forward if phase == "fwd" else _backward(forward(), [q, k, v])
    if kind.startswith("layernorm"):
        rows, d = shape
        x, weight, bias = rand(rows, d, grad=True), rand(d, grad=True), rand(d, grad=True)
        forward = lambda: F.layer_norm(x, (d,), weight, bias)
        return forward if phase == "fwd" else _backward(forward(), [x, weight, bias])
    if kind.startswith("gelu"):
        x = rand(shape[0], grad=True)
        return (lambda: F.gelu(x)) if phase == "fwd" else _backward(F.gelu(x), [x])
    if kind == "add":
        x, y = rand(shape[0]), rand(shape[0])
        return lambda: x + y
    if kind.startswith("embedding"):
        tokens, d, vocab = shape
        ids, weight = torch.randint(vocab, (tokens,), generator=gen).to(device), rand(vocab, d, grad=True)
        forward = lambda: F.embedding(ids, weight)
        return forward if phase == "fwd" else _backward(forward(), [weight])
    if kind.startswith("cross_entropy"):
        tokens, vocab = shape
        logits = rand(tokens, vocab, grad=True)
        targets = torch.randint(vocab, (tokens,), generator=gen).to(device)
        forward = lambda: F.cross_entropy(logits.float(), targets)
        return forward if phase == "fwd" else _backward(forward(), [logits])
    if kind in ("adamw", "grad_norm"):
        return _optimizer_call(kind, shape, rand)
    raise ValueError(f"no micro-benchmark for operator kind {kind!r}")


def _optimizer_call(kind: str, shape: tuple[int, ...], rand: Callable[..., torch.Tensor]) -> Callable[[], object]:
    """AdamW step or gradient-norm clipping over `params` parameters in `tensors` equal tensors (fp32 states)."""
    params, tensors = shape
    size = max(1, params // tensors)
    weights = [rand(size).float().requires_grad_() for _ in range(tensors)]
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    if kind == "grad_norm":
        return lambda: torch.nn.utils.clip_grad_norm_(weights, 1.0)
    spec = OptimSpec(name="adamw", lr=1e-4, weight_decay=0.1, steps=1, batch_size=1)
    return build_optimizer([{"params": weights}], spec).step  # the AdamW runs use (fused where it can be)


def collective_call(kind: str, nbytes: int, rank: int, world: int, device: torch.device) -> Callable[[], object]:
    """One collective over the default process group; `nbytes` is the full (unsharded) buffer."""
    import torch.distributed as dist

    numel = max(world, nbytes // 4 // world * world)
    full = torch.ones(numel, device=device)
    shard = torch.ones(numel // world, device=device)
    if kind == "allreduce":
        return lambda: dist.all_reduce(full)
    if kind == "allgather":  # newer torch: *_single, older: *_into_tensor
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: all_gather(full, shard)
    if kind == "reduce_scatter":
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: reduce_scatter(shard, full)
    if kind == "sendrecv":  # rank pairs (0, 1), (2, 3), ...: even ranks send the buffer, odd ranks receive it
        peer = rank + 1 if rank % 2 == 0 else rank - 1
        return (lambda: dist.send(full, peer)) if rank % 2 == 0 else (lambda: dist.recv(full, peer))
    raise ValueError(f"no micro-benchmark for collective {kind!r}")
