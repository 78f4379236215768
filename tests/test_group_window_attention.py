"""Group Window Attention: Swin's shifted-window partition, the grouped fast path against masked dense attention,
and equality with timm's Swin WindowAttention / SwinTransformerBlock attention when every token is visible."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention, get_relative_position_index
from torch.utils.flop_counter import FlopCounterMode

from lab_kernels.group_window_attention import (
    GroupWindowAttention,
    RelativePositionBias,
    group_layout,
    relative_position_index,
    resolve_group_size,
    window_ids,
)
from lab_kernels.grouping import grouping_cost

DIM, HEADS = 16, 2


def grid_coords(height: int, width: int) -> torch.Tensor:
    """Every token of the grid, row-major: (H W, 2)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def random_visible(height: int, width: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Coords (N, 2) of a random batch-wise mask keeping about `ratio` of the tokens (at least one)."""
    keep = torch.rand(height * width, generator=gen) < ratio
    keep[torch.randint(height * width, (1,), generator=gen)] = True
    return grid_coords(height, width)[keep]


def unit_visible(size: int, unit: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """GreenMIM's mask: random units of unit x unit tokens on a (size / unit)^2 grid, up-sampled."""
    units = size // unit
    keep = torch.zeros(units * units, dtype=torch.bool)
    keep[torch.randperm(units * units, generator=gen)[: max(1, round(ratio * units * units))]] = True
    keep = keep.view(units, units).repeat_interleave(unit, 0).repeat_interleave(unit, 1)
    return grid_coords(size, size)[keep.flatten()]


def swin_same_window(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(HW, HW) bool from timm's own construction: roll by -shift, window partition, timm's attn_mask (0 = allowed)."""
    block = SwinTransformerBlock(DIM, (height, width), num_heads=HEADS, window_size=window, shift_size=shift)
    coords = grid_coords(height, width)
    rolled = (coords - shift) % torch.tensor([height, width])  # position after torch.roll(x, -shift)
    win = (rolled[:, 0] // window) * (width // window) + rolled[:, 1] // window  # (HW,)
    pos = (rolled[:, 0] % window) * window + rolled[:, 1] % window  # (HW,) position inside the window
    allowed = win[:, None] == win[None, :]
    if block.attn_mask is not None:
        allowed &= block.attn_mask[win[:, None], pos[:, None], pos[None, :]] == 0
    return allowed


@pytest.mark.parametrize("height, width, window", [(8, 8, 4), (14, 14, 7), (12, 12, 4), (9, 6, 3)])
def test_window_ids_equal_swin_roll_and_region_mask(height: int, width: int, window: int) -> None:
    coords = grid_coords(height, width)
    for shift in (0, window // 2):
        ids = window_ids(coords, window, shift, (height, width))
        assert torch.equal(ids[:, None] == ids[None, :], swin_same_window(height, width, window, shift))


def test_window_ids_reject_bad_shift() -> None:
    with pytest.raises(ValueError, match="shift"):
        window_ids(grid_coords(4, 4), 4, 4, (4, 4))


def test_relative_position_index_and_bias_match_swin() -> None:
    assert torch.equal(relative_position_index(7), get_relative_position_index(7, 7))
    bias = RelativePositionBias(4, HEADS)
    assert bias.relative_position_bias_table.shape == (49, HEADS)
    init = RelativePositionBias(7, 16).relative_position_bias_table  # trunc-normal(std 0.02) cut at +-2, as timm's
    assert init.shape == (169, 16) and 0.018 < float(init.detach().std()) < 0.022
    coords = grid_coords(4, 4) + torch.tensor([5, 9])  # any window position: only differences count
    expected = bias.relative_position_bias_table[relative_position_index(4)]  # (16, 16, heads)
    torch.testing.assert_close(bias(coords[:, None] - coords[None, :]), expected, rtol=0, atol=0)


def make_module(window: int, seed: int = 0) -> GroupWindowAttention:
    torch.manual_seed(seed)
    module = GroupWindowAttention(DIM, HEADS, window).double().eval()
    with torch.no_grad():  # a larger bias than the 0.02 init so that a wrong lookup shows
        module.relative_position_bias_table.normal_()
    return module


CASES = [(8, 8, 4, 0.5), (14, 14, 7, 0.25), (14, 14, 7, 0.6), (12, 12, 4, 0.4), (12, 12, 4, 0.9), (9, 6, 3, 0.5)]


@pytest.mark.parametrize("height, width, window, ratio", CASES)
@pytest.mark.parametrize("group_size", ["optimal", "fixed", "masking", 40])
def test_fast_path_equals_reference(height: int, width: int, window: int, ratio: float, group_size) -> None:
    module = make_module(window)
    gen = torch.Generator().manual_seed(height * 100 + int(ratio * 10))
    for shift in (0, window // 2):
        coords = random_visible(height, width, ratio, gen)
        x = torch.randn(3, coords.shape[0], DIM, generator=gen, dtype=torch.float64)
        size = max(group_size, window**2) if isinstance(group_size, int) else group_size
        fast = module(x, coords, (height, width), shift, group_size=size)
        reference = module(x, coords, (height, width), shift, reference=True)
        assert fast.shape == x.shape and torch.isfinite(fast).all()
        torch.testing.assert_close(fast, reference)


def test_fast_path_with_greenmim_unit_masks() -> None:
    """56 -> 14 tokens per side scaled down: 16 x 16 grid, 4 x 4 units, M = 4, 25% visible."""
    module = make_module(4)
    gen = torch.Generator().manual_seed(7)
    for shift in (0, 2):
        coords = unit_visible(16, 4, 0.25, gen)
        x = torch.randn(2, coords.shape[0], DIM, generator=gen, dtype=torch.float64)
        for group_size in ("optimal", "fixed", 16):
            fast = module(x, coords, (16, 16), shift, group_size=group_size)
            torch.testing.assert_close(fast, module(x, coords, (16, 16), shift, reference=True))


@pytest.mark.parametrize("group_size", ["optimal", "fixed", 40])
def test_grouping_cost_is_what_the_fast_path_executes(group_size) -> None:
    """torch's FLOP counter on the fast path (projections and SDPA) equals 2 x grouping_cost (multiply-adds) per
    image: the cost the optimal grouping minimises is the one the kernel pays."""
    module = make_module(4)
    gen = torch.Generator().manual_seed(11)
    coords = unit_visible(16, 2, 0.25, gen)
    layout = module.plan(coords, (16, 16), 2, group_size)
    ids = window_ids(coords, 4, 2, (16, 16))
    sizes = torch.unique(ids, return_counts=True)[1].tolist()
    x = torch.randn(3, coords.shape[0], DIM, generator=gen, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        module(x, coords, (16, 16), 2, layout=layout)
    assert counter.get_total_flops() == 3 * 2 * grouping_cost(layout.group_size, sizes, DIM)


def test_the_optimal_group_size_never_executes_more_than_the_fixed_one() -> None:
    """Over GreenMIM-like unit masks on every stage grid of a scaled-down Swin (W-MSA and SW-MSA), the executed cost
    (grouping_cost) of "optimal" is at most that of the official fixed size."""
    gen = torch.Generator().manual_seed(5)
    for size, unit, dim in [(28, 4, 32), (14, 2, 64), (8, 1, 128)]:
        for trial in range(10):
            coords = unit_visible(size, unit, 0.25, gen)
            for shift in (0, 2):
                sizes = torch.unique(window_ids(coords, 4, shift, (size, size)), return_counts=True)[1].tolist()
                fixed = resolve_group_size("fixed", sizes, 4, dim)
                optimal = resolve_group_size("optimal", sizes, 4, dim)
                assert grouping_cost(optimal, sizes, dim) <= grouping_cost(fixed, sizes, dim), (size, trial, shift)


def test_layout_puts_each_token_in_one_slot_and_groups_hold_whole_windows() -> None:
    gen = torch.Generator().manual_seed(3)
    coords = random_visible(14, 14, 0.5, gen)
    ids = window_ids(coords, 7, 3, (14, 14))
    layout = group_layout(ids, coords, 49, 7, DIM)
    n = coords.shape[0]
    assert layout.token_of_slot.shape == (layout.num_groups * 49,)
    assert torch.equal(layout.token_of_slot[layout.slot_of_token], torch.arange(n))
    padding = layout.window_of_slot == -1
    assert int(padding.sum()) == layout.num_groups * 49 - n  # the rest is padding, pointing at token 0
    assert not layout.token_of_slot[padding].any()
    allowed = layout.blocked[:, 0].isfinite()  # (n_g, g, g): query slot, key slot
    pad = padding.view(-1, 49)
    assert torch.equal(allowed.sum(-1)[pad], torch.ones(int(padding.sum()), dtype=torch.long))  # its own slot only
    assert not (allowed & pad[:, None, :] & ~pad[:, :, None]).any()  # no real query sees a padding key
    assert torch.equal(layout.window_of_slot[layout.slot_of_token], ids)
    group_of_window = {}
    for slot, window in enumerate(layout.window_of_slot.tolist()):
        if window >= 0:
            assert group_of_window.setdefault(window, slot // 49) == slot // 49


def test_resolve_group_size_modes() -> None:
    sizes = [10, 20, 5]  # N = 35 <= 2 M^2 = 98 for M = 7: the official code switches to masking mode
    assert resolve_group_size("fixed", sizes, 7, DIM) == 35
    assert resolve_group_size("fixed", [10, 12, 5, 9], 4, DIM) == 12  # N = 36 > 2 M^2 = 32: g = max_i w_i
    assert resolve_group_size("masking", sizes, 7, DIM) == 35
    assert resolve_group_size(64, sizes, 7, DIM) == 64
    with pytest.raises(ValueError, match="group_size"):
        resolve_group_size("dp", sizes, 7, DIM)


def timm_window_attention(module: GroupWindowAttention) -> WindowAttention:
    attention = WindowAttention(DIM, HEADS, window_size=module.window_size).double().eval()
    attention.load_state_dict(module.state_dict())
    return attention


@pytest.mark.parametrize("height, width, window", [(8, 8, 4), (14, 14, 7), (12, 12, 4)])
def test_all_visible_without_shift_equals_timm_window_attention(height: int, width: int, window: int) -> None:
    module = make_module(window)
    attention = timm_window_attention(module)
    x = torch.randn(2, height, width, DIM, dtype=torch.float64)
    windows = x.view(2, height // window, window, width // window, window, DIM).transpose(2, 3)
    expected = attention(windows.reshape(-1, window * window, DIM))  # (B nW, M^2, C)
    expected = expected.view(2, height // window, width // window, window, window, DIM).transpose(2, 3)
    for group_size in ("optimal", "fixed", window**2 + 5):
        out = module(x.view(2, -1, DIM), grid_coords(height, width), (height, width), 0, group_size=group_size)
        torch.testing.assert_close(out, expected.reshape(2, -1, DIM))


@pytest.mark.parametrize("height, width, window", [(8, 8, 4), (14, 14, 7), (12, 12, 4), (12, 12, 3), (7, 7, 7)])
def test_all_visible_equals_timm_swin_block_attention(height: int, width: int, window: int) -> None:
    module = make_module(window)
    for shift in (0, window // 2):
        block = SwinTransformerBlock(DIM, (height, width), num_heads=HEADS, window_size=window,
                                     shift_size=shift).double().eval()
        block.attn.load_state_dict(module.state_dict())
        x = torch.randn(2, height, width, DIM, dtype=torch.float64)
        expected = block._attn(x).reshape(2, -1, DIM)  # roll, partition, attn with timm's mask, reverse, roll back
        out = module(x.view(2, -1, DIM), grid_coords(height, width), (height, width), shift)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("group_size", ["optimal", "fixed", 30])
def test_gradients_of_fast_path_equal_reference(group_size) -> None:
    module = make_module(4)
    gen = torch.Generator().manual_seed(11)
    coords = random_visible(12, 12, 0.5, gen)
    x = torch.randn(2, coords.shape[0], DIM, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, coords.shape[0], DIM, generator=gen, dtype=torch.float64)
    grads = []
    for reference in (False, True):
        inputs = x.clone().requires_grad_(True)
        module.zero_grad()
        (module(inputs, coords, (12, 12), 2, group_size=group_size, reference=reference) * upstream).sum().backward()
        grads.append([inputs.grad] + [p.grad.clone() for p in module.parameters()])
    assert all(torch.isfinite(g).all() for g in grads[0])
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference)


def test_float32_and_training_mode_run() -> None:
    module = GroupWindowAttention(DIM, HEADS, 7, attn_drop=0.1, proj_drop=0.1).train()
    gen = torch.Generator().manual_seed(5)
    coords = random_visible(14, 14, 0.3, gen)
    out = module(torch.randn(2, coords.shape[0], DIM), coords, (14, 14), 3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(module.relative_position_bias_table.grad).all()
