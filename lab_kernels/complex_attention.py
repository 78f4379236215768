"""ComplexFormer's complex multi-head attention (CMHA) and the RoPE attention it generalises.

Spec: ../shared/papers/methods_nas_gen_llm.md section 7 (Shao et al., "ComplexFormer: Head-Specific Complex Vector
Attention", arXiv 2505.10222, withdrawn; official code: shaojintian/complexFormer, `ComplexMultiHeadAttentionV2`).

Per head h, with head dim d (even) and i = 0..d/2-1, a head vector x is read as d/2 complex numbers r + i p:

    r = x[..., :d/2],  p = x[..., d/2:]                         real and imaginary halves
    lambda = sqrt(r^2 + p^2 + 1e-9),  theta = atan2(p, r)        Euler transform (magnitude, phase)
    AS_{mn,i} = theta^q_{m,i} - theta^k_{n,i}                    semantic angle difference
    Adapt(AS)_{mn,i} = delta_{h,i} * AS_{mn,i} + b_{h,i}         head-specific adaptation, delta, b in R^{H x d/2}
    Delta(P)_{mn,i} = (m - n) * g_i,  g_i = base^(-2i/d)          relative position (RoPE frequencies)
    s_{mn} = sum_i lambda^q_{m,i} lambda^k_{n,i} cos(Adapt(AS)_{mn,i} + Delta(P)_{mn,i})

With delta = 1 and b = 0 the score is rotate-half (GPT-NeoX) RoPE attention: the pair (x_i, x_{i+d/2}) rotated by m g_i.

Fast path: cos(A_m - B_n) = cos A_m cos B_n + sin A_m sin B_n with

    A_m = delta * theta^q_m + b + m g,   B_n = delta * theta^k_n + n g
    q' = cat(lambda^q cos A, lambda^q sin A),   k' = cat(lambda^k cos B, lambda^k sin B),   s = q' k'^T

so the bias sits on the query side only and A_m - B_n = delta (theta^q_m - theta^k_n) + b + (m - n) g. This costs
O(L^2 d) time and O(L d) extra memory, never builds the (B, H, Lq, Lk, d/2) phase tensor of the official code, and lets
the attention run through torch.nn.functional.scaled_dot_product_attention. EulerRotation computes q' and k' with its
backward written out, op by op or (compiled=True) fused by torch.compile.

As in the official code the projections are bias-free with Xavier-uniform init, delta ~ N(0, 1/sqrt(d/2)) and b = 0,
and scores are not scaled by default (scale="sqrt" is the 1/sqrt(d) ablation). Deviations, with reasons:
- Angles are computed in at least float32 (the official code casts the frequencies to bf16, which loses (m - n) g_i
  for long contexts); inputs in half precision are upcast for the Euler transform and cast back.
- The modules are causal self-attention (SDPA with is_causal=True) instead of taking an additive mask: the official
  module has no mask of its own and the spec's reproduction is a causal LM. For generation they also take a boolean
  mask of the real (not padding) keys and a KVCache; both encodings rotate q and k by their own absolute positions,
  so cached keys stay valid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-9
Scale = Literal["none", "sqrt"]


def rope_frequencies(head_dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    """g_i = base^(-2i/d) for i = 0..d/2-1, in float32: (d/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return base ** -exponents


def _angle_dtype(x: Tensor) -> torch.dtype:
    """Angles and the Euler transform are computed in float32, or float64 when the input is float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _position_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tensor:
    """m g_i for every position m: (L,) -> (L, d/2); per-sequence positions (B, L) -> (B, 1, L, d/2), broadcasting
    over heads."""
    g = rope_frequencies(head_dim, base, device=positions.device).to(dtype)
    angles = positions.to(dtype)[..., None] * g
    return angles[:, None] if positions.ndim == 2 else angles


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate-half RoPE: (x_i, x_{i+d/2}) rotated by m g_i. x (B, H, L, d), positions (L,) or (B, L) -> (B, H, L, d)."""
    dtype = _angle_dtype(x)
    angle = _position_angles(positions, x.shape[-1], base, dtype)  # (L, d/2)
    cos, sin = angle.cos(), angle.sin()
    r, p = x.to(dtype).chunk(2, dim=-1)  # (B, H, L, d/2) each
    return torch.cat([r * cos - p * sin, r * sin + p * cos], dim=-1).to(x.dtype)


def euler_transform(x: Tensor) -> tuple[Tensor, Tensor]:
    """Magnitude lambda and phase theta of the complex head vector r + i p: (..., d) -> 2 x (..., d/2)."""
    r, p = x.chunk(2, dim=-1)
    return torch.sqrt(r * r + p * p + EPS), torch.atan2(p, r)


def complex_scores_reference(q: Tensor, k: Tensor, delta: Tensor, bias: Tensor, positions_q: Tensor,
                             positions_k: Tensor, base: float = 10000.0) -> Tensor:
    """The literal score s_{mn}, materialising the phase tensor (B, H, Lq, Lk, d/2).

    q (B, H, Lq, d), k (B, H, Lk, d), delta and bias (H, d/2), positions_q (Lq,), positions_k (Lk,) -> (B, H, Lq, Lk).
    """
    dtype = _angle_dtype(q)
    lambda_q, theta_q = euler_transform(q.to(dtype))  # (B, H, Lq, d/2)
    lambda_k, theta_k = euler_transform(k.to(dtype))  # (B, H, Lk, d/2)
    semantic = theta_q[..., :, None, :] - theta_k[..., None, :, :]  # AS: (B, H, Lq, Lk, d/2)
    adapt = delta[:, None, None, :].to(dtype) * semantic + bias[:, None, None, :].to(dtype)
    relative = (positions_q[:, None] - positions_k[None, :]).to(dtype)  # m - n: (Lq, Lk)
    g = rope_frequencies(q.shape[-1], base, device=q.device).to(dtype)
    phase = adapt + relative[..., None] * g  # (B, H, Lq, Lk, d/2)
    magnitude = lambda_q[..., :, None, :] * lambda_k[..., None, :, :]  # (B, H, Lq, Lk, d/2)
    return (magnitude * torch.cos(phase)).sum(dim=-1).to(q.dtype)


def complex_qk(q: Tensor, k: Tensor, delta: Tensor, bias: Tensor, positions: Tensor, base: float = 10000.0,
               compiled: bool = False) -> tuple[Tensor, Tensor]:
    """q', k' with q' k'^T = complex_scores_reference(q, k, delta, bias, positions, positions).

    q, k (B, H, L, d), delta and bias (H, d/2), positions (L,) or (B, L) -> q', k' (B, H, L, d) in the dtype of q.
    compiled: EulerRotation's passes fused by torch.compile (see compiled_passes) instead of run op by op.
    """
    dtype = _angle_dtype(q)
    position = _position_angles(positions, q.shape[-1], base, dtype)  # m g: (L, d/2) or (B, 1, L, d/2)
    delta, bias = delta[:, None, :].to(dtype), bias[:, None, :].to(dtype)  # (H, 1, d/2)
    q_rot, k_rot = EulerRotation.apply(q.to(dtype), k.to(dtype), delta, bias, position, compiled)
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


class EulerRotation(torch.autograd.Function):
    """(q, k) -> (q', k'): x (B, H, L, d) -> cat(lambda cos A, lambda sin A) =: (u, w), with (lambda, theta) =
    euler_transform(x) and A = delta theta + offset; delta and bias (H, 1, d/2), position m g (L, d/2) or per sequence
    (B, 1, L, d/2); the offset is b + m g for queries and n g for keys. The backward pass is written out, from the
    output itself: with x = (r, p), the output's gradient (g_u, g_w), M = g_u u + g_w w and N = g_w u - g_u w
    (= dL/dA),

        dL/dr = M r / lambda^2 - delta N p / rho^2,   dL/dp = M p / lambda^2 + delta N r / rho^2,
        dL/ddelta = sum N theta,                       dL/db = sum N (queries only)

    with lambda^2 = r^2 + p^2 + 1e-9 (the magnitude's) and rho^2 = r^2 + p^2 (atan2's): autograd's gradients of the
    same formula, with no transcendental function. Eager, the passes run op by op, writing intermediates in place
    (on the CPU a fresh buffer of this size costs about as much as the arithmetic on it); compiled, each pass is
    one fused loop over q and k."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, delta: Tensor, bias: Tensor, position: Tensor,
                compiled: bool = False) -> tuple[Tensor, Tensor]:
        rotate = compiled_passes()[0] if compiled else rotate_pair
        q_rot, k_rot, *saved = rotate(q, k, delta, bias, position)
        ctx.save_for_backward(q, k, delta, q_rot, k_rot, *saved)
        ctx.compiled = compiled
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor) -> tuple[Tensor | None, ...]:
        unrotate = compiled_passes()[1] if ctx.compiled else unrotate_pair
        return (*unrotate(grad_q, grad_k, *ctx.saved_tensors), None, None)


def rotate_pair(q: Tensor, k: Tensor, delta: Tensor, bias: Tensor, position: Tensor) -> tuple[Tensor, ...]:
    """EulerRotation's forward: q', k' and what the backward needs, rho^2 and theta of each."""
    q_rot, q_squared, q_phase = _rotate(q, delta, bias + position)  # A_m = delta theta + b + m g
    k_rot, k_squared, k_phase = _rotate(k, delta, position)  # B_n = delta theta + n g
    return q_rot, k_rot, q_squared, q_phase, k_squared, k_phase


def unrotate_pair(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, delta: Tensor, q_rot: Tensor, k_rot: Tensor,
                  q_squared: Tensor, q_phase: Tensor, k_squared: Tensor, k_phase: Tensor) -> tuple[Tensor, ...]:
    """EulerRotation's backward: the gradients of q, k, delta (H, 1, d/2) and b (H, 1, d/2)."""
    grad_q, q_angle = _unrotate(grad_q, q, delta, q_rot, q_squared)
    grad_k, k_angle = _unrotate(grad_k, k, delta, k_rot, k_squared)
    grad_bias = _sum_batch_and_length(q_angle)
    grad_delta = _sum_batch_and_length(q_angle.mul_(q_phase)) + _sum_batch_and_length(k_angle.mul_(k_phase))
    return grad_q, grad_k, grad_delta, grad_bias


def _rotate(x: Tensor, delta: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, H, L, d) -> cat(lambda cos A, lambda sin A), rho^2, theta."""
    r, p = x.chunk(2, dim=-1)  # (B, H, L, d/2) each
    squared = torch.mul(r, r).addcmul_(p, p)  # rho^2
    phase = torch.atan2(p, r)  # theta
    angle = torch.addcmul(offset, delta, phase)  # A
    magnitude = torch.add(squared, EPS).sqrt_()  # lambda
    return torch.cat([angle.cos().mul_(magnitude), angle.sin_().mul_(magnitude)], dim=-1), squared, phase


def _unrotate(grad: Tensor, x: Tensor, delta: Tensor, out: Tensor, squared: Tensor) -> tuple[Tensor, Tensor]:
    """The output's gradient (B, H, L, d) -> x's gradient (B, H, L, d), N = dL/dA (B, H, L, d/2)."""
    r, p = x.chunk(2, dim=-1)
    u, w = out.chunk(2, dim=-1)
    grad_u, grad_w = grad.chunk(2, dim=-1)
    grad_angle = torch.mul(grad_w, u).addcmul_(grad_u, w, value=-1.0)  # N
    radial = torch.mul(grad_u, u).addcmul_(grad_w, w).div_(squared.add(EPS))  # M / lambda^2
    tangential = torch.mul(grad_angle, delta).div_(squared)  # delta N / rho^2
    grad_x = torch.cat([torch.mul(radial, r).addcmul_(tangential, p, value=-1.0),
                        radial.mul_(p).addcmul_(tangential, r)], dim=-1)
    return grad_x, grad_angle


def _sum_batch_and_length(t: Tensor) -> Tensor:
    """(B, H, L, d/2) -> (H, 1, d/2). Summing L first, then B, is 5x faster on the CPU than sum(dim=(0, 2))."""
    return t.sum(dim=2).sum(dim=0)[:, None]


@functools.cache
def compiled_passes() -> tuple[Callable[..., tuple[Tensor, ...]], Callable[..., tuple[Tensor, ...]]]:
    """rotate_pair and unrotate_pair through torch.compile: Inductor fuses each into one loop (C++ on the CPU, which
    needs a C++ compiler; Triton on GPUs), so a pass reads and writes every element once instead of once per
    element-wise op. One graph per pass serves every length (another one for per-sequence positions); compiling
    takes about 10 s on 2 CPU cores (30 s the first time on a machine), cached on disk afterwards."""
    return (torch.compile(rotate_pair, fullgraph=True, dynamic=True),
            torch.compile(unrotate_pair, fullgraph=True, dynamic=True))


class _CausalSelfAttention(nn.Module):
    """Bias-free Q/K/V/O projections (Xavier-uniform), a position encoding of q and k, causal SDPA."""

    def __init__(self, d_model: int, n_heads: int, *, scale: Scale, base: float, dropout: float) -> None:
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        head_dim = d_model // n_heads
        if head_dim % 2 != 0:
            raise ValueError(f"head dim d_model/n_heads = {d_model}/{n_heads} = {head_dim} must be even")
        if scale not in ("none", "sqrt"):
            raise ValueError(f"scale={scale!r} must be 'none' or 'sqrt'")
        self.n_heads, self.head_dim, self.base, self.dropout = n_heads, head_dim, base, dropout
        self.scale = 1.0 if scale == "none" else 1.0 / math.sqrt(head_dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(proj.weight)

    def encode_positions(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q, k (B, H, L, d), positions (L,) -> q, k (B, H, L, d) whose dot products are the attention scores."""
        raise NotImplementedError

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, d)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), positions (L,) or (B, L) integer (default 0..L-1) -> (B, L, D).

        Incremental decoding: `cache` holds the encoded keys and values of the earlier positions and is extended
        with these. `key_mask` (B, T) marks the real tokens among all T = cached + L keys (False: padding, never
        attended to); each query still sees itself, so a padding row stays finite."""
        batch, length, d_model = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.encode_positions(q, k, positions)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.extend(k, v)  # (B, H, T, d)
        dropout_p = self.dropout if self.training else 0.0
        if key_mask is None and (past == 0 or length == 1):  # plain causal, or one new query that sees every key
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=past == 0, scale=self.scale)
        else:
            mask = attention_mask(length, past, key_mask, batch, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, d_model))


def attention_mask(length: int, past: int, key_mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """Which of the past + length keys each of the `length` new queries attends to: causal, real keys only, and
    always itself. -> (B, 1, L, T) bool."""
    query = torch.arange(length, device=device)[:, None] + past  # absolute index of each query: (L, 1)
    key = torch.arange(past + length, device=device)[None, :]  # (1, T)
    allowed = (key <= query).expand(batch, 1, length, past + length)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    return allowed | (key == query)


class KVCache:
    """The encoded keys and values of one attention layer over the positions decoded so far."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, L, d); -> every key and value so far, (B, H, T, d)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class ComplexMultiHeadAttention(_CausalSelfAttention):
    """CMHA: scores s_{mn} of the module docstring through the complex_qk fast path; unscaled by default."""

    def __init__(self, d_model: int, n_heads: int, *, scale: Scale = "none", base: float = 10000.0,
                 dropout: float = 0.0, compiled: bool = False) -> None:
        super().__init__(d_model, n_heads, scale=scale, base=base, dropout=dropout)
        half = self.head_dim // 2
        self.delta = nn.Parameter(torch.randn(n_heads, half) / math.sqrt(half))  # (H, d/2)
        self.bias = nn.Parameter(torch.zeros(n_heads, half))  # (H, d/2)
        self.compiled = compiled

    def encode_positions(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return complex_qk(q, k, self.delta, self.bias, positions, self.base, self.compiled)


class RoPEMultiHeadAttention(_CausalSelfAttention):
    """The baseline: rotate-half RoPE on q and k; scaled by 1/sqrt(d) by default."""

    def __init__(self, d_model: int, n_heads: int, *, scale: Scale = "sqrt", base: float = 10000.0,
                 dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, scale=scale, base=base, dropout=dropout)

    def encode_positions(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(q, positions, self.base), apply_rope(k, positions, self.base)
