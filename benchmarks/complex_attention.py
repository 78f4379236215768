"""ComplexFormer's attention kernel against RoPE + SDPA: forward + backward time of the position encoding of q and
k followed by causal SDPA, per sequence length, as ratios to RoPE in the same run. Measures, does not assert.

    .venv/bin/python benchmarks/complex_attention.py [--lengths 256 512 1024 2048] [--threads 2] [--repeats 60]

Paths on the same q, k, v (batch 2, 8 heads, head dim 64, float32): RoPE (lab_kernels.complex_attention.apply_rope,
scaled 1/sqrt(d)), eager and through torch.compile; the complex fast path's formula left to autograd
(euler_transform, the angles, cos, sin, cat: the kernel before EulerRotation, rebuilt here from the same functions as
the baseline); complex_qk (EulerRotation's written-out backward) eager and compiled (its passes fused by
torch.compile). The paths run interleaved, the median of the repeats after one warm-up round
(which compiles) is reported. Writes benchmarks/results/complex_attention.{md,json} and logs one MLflow run
(experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from budget import publish
from torch import Tensor

from lab_kernels.complex_attention import apply_rope, complex_qk, euler_transform, rope_frequencies

REPO = Path(__file__).resolve().parents[1]
BATCH, HEADS, HEAD_DIM = 2, 8, 64
BASELINE, COMPILED_BASELINE = "RoPE", "RoPE, compiled"


def rope_path(encode: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def path(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
        q, k = encode(q, positions), encode(k, positions)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HEAD_DIM**-0.5)
    return path


def complex_autograd(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """The fast path's formula left to autograd: q' = cat(lambda cos A, lambda sin A), the same for k'."""
    position = positions[:, None].to(q.dtype) * rope_frequencies(HEAD_DIM)  # m g: (L, d/2)
    rotated = []
    for x, offset in ((q, bias[:, None] + position), (k, position)):
        magnitude, phase = euler_transform(x)
        angle = delta[:, None] * phase + offset
        rotated.append(torch.cat([magnitude * angle.cos(), magnitude * angle.sin()], dim=-1))
    return F.scaled_dot_product_attention(*rotated, v, is_causal=True, scale=1.0)


def complex_kernel(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, bias: Tensor, positions: Tensor, *,
                   compiled: bool) -> Tensor:
    q, k = complex_qk(q, k, delta, bias, positions, compiled=compiled)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


PATHS = {BASELINE: rope_path(apply_rope), COMPILED_BASELINE: rope_path(torch.compile(apply_rope, dynamic=True)),
         "complex, autograd": complex_autograd,
         "complex, EulerRotation": functools.partial(complex_kernel, compiled=False),
         "complex, compiled": functools.partial(complex_kernel, compiled=True)}


def time_paths(length: int, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward of each path at this length."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
    delta = (torch.randn(HEADS, HEAD_DIM // 2, generator=gen) / (HEAD_DIM // 2) ** 0.5).requires_grad_()
    bias = torch.zeros(HEADS, HEAD_DIM // 2, requires_grad=True)
    positions = torch.arange(length)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for repeat in range(repeats + 1):
        for name, path in PATHS.items():
            started = time.perf_counter()
            path(q, k, v, delta, bias, positions).sum().backward()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "complex_attention"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [name for name in PATHS if name != BASELINE]
    lines = ["| L | " + " | ".join(f"{name} (ms)" for name in PATHS) + " | " +
             " | ".join(f"{name} / RoPE" for name in ratios) + " | compiled / RoPE compiled |",
             "|---|" + "---|" * (2 * len(PATHS))]
    results, metrics = {}, {}
    for length in args.lengths:
        results[length] = seconds = time_paths(length, args.repeats)
        for name in ratios:
            metrics[f"ratio_{name.replace(', ', '_').replace(' ', '_')}_L{length}"] = seconds[name] / seconds[BASELINE]
        lines.append(f"| {length} | " + " | ".join(f"{s * 1e3:.1f}" for s in seconds.values()) + " | " +
                     " | ".join(f"{seconds[name] / seconds[BASELINE]:.3f}" for name in ratios) +
                     f" | {seconds['complex, compiled'] / seconds[COMPILED_BASELINE]:.3f} |")
        print(lines[-1], flush=True)
    markdown = "\n".join([f"Forward + backward, batch {BATCH}, {HEADS} heads, head dim {HEAD_DIM}, causal, float32, "
                          f"CPU, {args.threads} threads, median of {args.repeats}, torch {torch.__version__}:", "",
                          *lines])
    publish(args.out, markdown, [], {str(length): r for length, r in results.items()},
            {"threads": args.threads, "repeats": args.repeats}, metrics)
    print(markdown)


if __name__ == "__main__":
    main()
