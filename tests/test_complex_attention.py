"""ComplexFormer CMHA: the fast path against the literal formula, the reduction to RoPE, the causal modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lab_kernels.complex_attention import (
    ComplexMultiHeadAttention,
    EulerRotation,
    KVCache,
    RoPEMultiHeadAttention,
    apply_rope,
    complex_qk,
    complex_scores_reference,
    rope_frequencies,
)

B, H, L, D_HEAD = 2, 3, 7, 8
D_MODEL = H * D_HEAD
POSITIONS = torch.tensor([5, 6, 9, 10, 17, 30, 31])  # offset and with gaps


def random_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """q, k (B, H, L, d); delta, bias (H, d/2), both random (bias non-zero so its side matters)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D_HEAD, generator=gen, dtype=dtype)
    k = torch.randn(B, H, L, D_HEAD, generator=gen, dtype=dtype)
    delta = torch.randn(H, D_HEAD // 2, generator=gen, dtype=dtype)
    bias = torch.randn(H, D_HEAD // 2, generator=gen, dtype=dtype)
    return q, k, delta, bias


def fast_scores(q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """q' k'^T of the fast path: (B, H, L, L)."""
    q_rot, k_rot = complex_qk(q, k, delta, bias, positions)
    return q_rot @ k_rot.transpose(-1, -2)


def test_rope_frequencies_are_base_to_the_minus_2i_over_d() -> None:
    g = rope_frequencies(8, base=10000.0)
    assert g.dtype == torch.float32 and g.shape == (4,)
    torch.testing.assert_close(g, torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75]))


def test_rope_rotates_each_half_pair_and_scores_depend_only_on_relative_position() -> None:
    """Position 0 is the identity; pair (x_0, x_{d/2}) = (1, 0) at position m becomes (cos m, sin m) since g_0 = 1."""
    q, k, _, _ = random_inputs()
    torch.testing.assert_close(apply_rope(q, torch.zeros(L, dtype=torch.long)), q)
    e0 = torch.zeros(1, 1, 1, D_HEAD, dtype=torch.float64)
    e0[..., 0] = 1.0
    rotated = apply_rope(e0, torch.tensor([3]))[0, 0, 0]
    torch.testing.assert_close(rotated[[0, D_HEAD // 2]], torch.tensor([math.cos(3), math.sin(3)], dtype=torch.float64))
    scores = apply_rope(q, POSITIONS) @ apply_rope(k, POSITIONS).transpose(-1, -2)
    shifted = apply_rope(q, POSITIONS + 100) @ apply_rope(k, POSITIONS + 100).transpose(-1, -2)
    torch.testing.assert_close(shifted, scores, atol=1e-10, rtol=0)


def test_fast_path_scores_equal_the_reference() -> None:
    q, k, delta, bias = random_inputs()
    reference = complex_scores_reference(q, k, delta, bias, POSITIONS, POSITIONS)
    assert reference.shape == (B, H, L, L)
    torch.testing.assert_close(fast_scores(q, k, delta, bias, POSITIONS), reference, atol=1e-10, rtol=0)


def test_reference_scores_with_queries_and_keys_at_different_positions() -> None:
    """Lq != Lk: one query row of the reference equals the full-length reference row at the same positions."""
    q, k, delta, bias = random_inputs()
    full = complex_scores_reference(q, k, delta, bias, POSITIONS, POSITIONS)
    last = complex_scores_reference(q[..., -1:, :], k, delta, bias, POSITIONS[-1:], POSITIONS)
    torch.testing.assert_close(last, full[..., -1:, :], atol=1e-12, rtol=0)


def test_unit_delta_and_zero_bias_reduce_to_rope() -> None:
    """Equal up to the 1e-9 inside the magnitude's square root."""
    q, k, _, _ = random_inputs()
    ones, zeros = torch.ones(H, D_HEAD // 2, dtype=torch.float64), torch.zeros(H, D_HEAD // 2, dtype=torch.float64)
    rope = apply_rope(q, POSITIONS) @ apply_rope(k, POSITIONS).transpose(-1, -2)
    reference = complex_scores_reference(q, k, ones, zeros, POSITIONS, POSITIONS)
    torch.testing.assert_close(reference, rope, atol=1e-7, rtol=0)
    torch.testing.assert_close(fast_scores(q, k, ones, zeros, POSITIONS), rope, atol=1e-7, rtol=0)


def test_fast_path_gradients_equal_the_reference() -> None:
    q, k, delta, bias = (t.requires_grad_() for t in random_inputs())
    weights = torch.randn(B, H, L, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = (complex_scores_reference(q, k, delta, bias, POSITIONS, POSITIONS) * weights).sum()
    fast = (fast_scores(q, k, delta, bias, POSITIONS) * weights).sum()
    for got, want in zip(torch.autograd.grad(fast, (q, k, delta, bias)),
                         torch.autograd.grad(reference, (q, k, delta, bias))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_float32_fast_path_keeps_long_context_angles() -> None:
    """At positions near 4096, float32 scores stay within 1e-2 of float64; bf16 angles m g are off by ~8."""
    q, k, delta, bias = random_inputs()
    positions = POSITIONS + 4096
    reference = complex_scores_reference(q, k, delta, bias, positions, positions)
    fast = fast_scores(q.float(), k.float(), delta.float(), bias.float(), positions)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), reference, atol=1e-2, rtol=0)


def make_module(cls: type, seed: int = 0, **kwargs: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(D_MODEL, H, **kwargs).double().eval()


def random_tokens(seed: int = 2) -> torch.Tensor:
    return torch.randn(B, L, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_complex_module_parameters_and_init() -> None:
    module = ComplexMultiHeadAttention(D_MODEL, H)
    assert module.delta.shape == module.bias.shape == (H, D_HEAD // 2)
    assert torch.equal(module.bias, torch.zeros(H, D_HEAD // 2))
    names = {name for name, _ in module.named_parameters()}
    assert names == {"delta", "bias"} | {f"{p}_proj.weight" for p in "qkvo"}


@pytest.mark.parametrize("cls", [ComplexMultiHeadAttention, RoPEMultiHeadAttention])
def test_module_is_causal_with_output_shape_b_l_d(cls: type) -> None:
    module, x = make_module(cls), random_tokens()
    changed = x.clone()
    changed[:, 4:] = torch.randn(B, L - 4, D_MODEL, dtype=torch.float64)
    out, out_changed = module(x), module(changed)
    assert out.shape == (B, L, D_MODEL)
    torch.testing.assert_close(out_changed[:, :4], out[:, :4], atol=1e-12, rtol=0)
    assert not torch.allclose(out_changed[:, 4:], out[:, 4:])


def test_complex_module_equals_softmax_of_the_reference_scores() -> None:
    """SDPA over (q', k') equals the literal formula: softmax(s + causal mask) V, then W_o, at offset positions."""
    module, x = make_module(ComplexMultiHeadAttention), random_tokens()
    with torch.no_grad():
        module.bias.normal_()

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, L, H, D_HEAD).transpose(1, 2)

    q, k, v = heads(module.q_proj(x)), heads(module.k_proj(x)), heads(module.v_proj(x))
    scores = complex_scores_reference(q, k, module.delta, module.bias, POSITIONS, POSITIONS)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    attention = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    expected = module.o_proj((attention @ v).transpose(1, 2).reshape(B, L, D_MODEL))
    torch.testing.assert_close(module(x, POSITIONS), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cls", [ComplexMultiHeadAttention, RoPEMultiHeadAttention])
def test_scale_none_and_sqrt_differ(cls: type) -> None:
    unscaled, scaled = make_module(cls, scale="none"), make_module(cls, scale="sqrt")
    scaled.load_state_dict(unscaled.state_dict())
    x = random_tokens()
    assert not torch.allclose(unscaled(x), scaled(x))


def test_default_positions_are_arange() -> None:
    module, x = make_module(ComplexMultiHeadAttention), random_tokens()
    torch.testing.assert_close(module(x), module(x, torch.arange(L)), atol=0, rtol=0)


def test_complex_module_with_unit_delta_and_zero_bias_is_the_rope_module() -> None:
    complex_attention = make_module(ComplexMultiHeadAttention, scale="sqrt")
    rope_attention = make_module(RoPEMultiHeadAttention, seed=1)
    with torch.no_grad():
        complex_attention.delta.fill_(1.0)
        complex_attention.bias.zero_()
    missing, unexpected = complex_attention.load_state_dict(rope_attention.state_dict(), strict=False)
    assert sorted(missing) == ["bias", "delta"] and unexpected == []
    x = random_tokens()
    torch.testing.assert_close(complex_attention(x, POSITIONS), rope_attention(x, POSITIONS), atol=1e-8, rtol=0)


@pytest.mark.parametrize("cls", [ComplexMultiHeadAttention, RoPEMultiHeadAttention])
@pytest.mark.parametrize(("d_model", "n_heads", "message"), [(10, 3, "d_model=10"), (6, 2, "head dim"),
                                                              (8, 0, "n_heads=0")])
def test_invalid_sizes_raise_value_error(cls: type, d_model: int, n_heads: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(d_model, n_heads)


def test_unknown_scale_raises_value_error() -> None:
    with pytest.raises(ValueError, match="scale='log'"):
        ComplexMultiHeadAttention(D_MODEL, H, scale="log")


@pytest.mark.parametrize("module", [RoPEMultiHeadAttention, ComplexMultiHeadAttention])
def test_cached_decoding_and_padding_masks_match_the_full_causal_pass(module) -> None:
    """Prefill 4 positions, then decode one at a time through a KVCache: the outputs equal one causal pass over all
    L. With left padding masked out and per-sequence positions, a sequence's outputs equal its unpadded pass."""
    torch.manual_seed(0)
    attention = module(D_MODEL, H).double().eval()
    x = torch.randn(B, L, D_MODEL, dtype=torch.float64)
    full = attention(x)
    cache = KVCache()
    steps = [attention(x[:, :4], cache=cache)] + [attention(x[:, t:t + 1], torch.tensor([t]), cache) for t in range(4, L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    padded = torch.cat([torch.randn(1, 3, D_MODEL, dtype=torch.float64), x[:1, :4]], dim=1)  # 3 pads, 4 real
    key_mask = torch.tensor([[False] * 3 + [True] * 4])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3]])
    out = attention(padded, positions, key_mask=key_mask)
    torch.testing.assert_close(out[:, 3:], attention(x[:1, :4]))
    assert torch.isfinite(out).all()  # padding rows attend to themselves, never to nothing


def test_the_written_out_backward_passes_gradcheck() -> None:
    """EulerRotation's backward (q, k, delta and b) against finite differences, with positions shared by the batch
    (L, d/2) and per sequence (B, 1, L, d/2)."""
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    delta, bias = (torch.randn(3, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for shape in [(4, 3), (2, 1, 4, 3)]:
        position = torch.randn(*shape, generator=gen, dtype=torch.float64)
        assert torch.autograd.gradcheck(EulerRotation.apply, (q, k, delta, bias, position))


def test_the_compiled_rotation_gives_the_eager_kernels_values_and_gradients_at_every_length() -> None:
    """compiled=True (EulerRotation's passes through torch.compile, one graph for any shape) against eager,
    float32, two lengths. As in the attention module, q and k are head views of (B, L, H, d) tensors and the
    gradients come back through SDPA (so the graphs compiled here are the ones an LM uses)."""
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(H, D_HEAD // 2, generator=gen).requires_grad_()
    bias = torch.randn(H, D_HEAD // 2, generator=gen).requires_grad_()
    for length in (7, 12):
        q, k, v = (torch.randn(B, length, H, D_HEAD, generator=gen).transpose(1, 2) for _ in range(3))
        upstream = torch.randn(B, H, length, D_HEAD, generator=gen)
        results = []
        for compiled in (False, True):
            inputs = [q.detach().requires_grad_(), k.detach().requires_grad_(), delta, bias]
            q_rot, k_rot = complex_qk(*inputs, torch.arange(length) + 3, compiled=compiled)
            out = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, scale=1.0)
            results.append((q_rot, k_rot, *torch.autograd.grad(out, inputs, upstream)))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=2e-5)
