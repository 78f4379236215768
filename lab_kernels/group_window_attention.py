"""GreenMIM's Group Window Attention: Swin (shifted) window attention over the visible tokens only.

Spec: ../shared/papers/methods_nas_gen_llm.md section 5 (Huang et al., "Green Hierarchical Vision Transformer for
Masked Image Modeling", NeurIPS 2022; official code: LayneH/GreenMIM, modeling/group_window_attention.py).

Conventions. Masking is batch-wise (one mask per batch, as in the official code), so the N visible tokens are the
same set for every sample: x is (B, N, C) and coords (N, 2) holds their (row, col) on the stage's (H, W) token grid.
Window size M, shift s (0 for W-MSA, M // 2 for SW-MSA).

Windows. Swin's SW-MSA (cyclic shift by -s, window partition, region mask) lets two tokens attend to each other iff
they fall in the same window of the ORIGINAL grid partitioned with boundaries at rows / cols s, s + M, s + 2M, ...
(tokens before the first boundary form their own window, the wrapped region of Swin's mask). So

    window row = floor((r + o) / M),  window col = floor((c + o) / M),  o = (M - s) mod M

with ceil((W + o) / M) windows per row; within a window the Swin relative position (dr, dc) is the true coordinate
difference. The offset equals the official `_get_group_id`'s (M - s) % M. (Note: floor((r + s) / M) is the same
partition only when 2s = 0 mod M, e.g. M even and s = M / 2; for Swin's M = 7, s = 3 it is not.)
tests/test_group_window_attention.py checks the partition against timm's roll + region mask on whole grids.

Fast path (official GroupingModule + WindowAttention):
1. window ids of the visible tokens, window sizes w_i (visible tokens per window);
2. group size g: "optimal" (lab_kernels.grouping.optimal_group_size, the paper's DP search that the official code never
   implemented), "fixed" (the official behaviour: "masking" mode, all tokens in one sequence, if N <= 2 M^2, else
   g = min(M^2, max_i w_i)), "masking", or an int;
3. group_windows(g, w): windows packed into n_g groups of g slots; q, k, v gathered into them with index_select
   (padding slots repeat token 0: as a key it is masked out, as a query its output is dropped, so it receives exactly
   zero gradient);
4. additive mask per group: relative position bias of the true coordinates for same-window pairs, -inf elsewhere;
   a padding slot attends to itself only (no NaN rows, no gradient: a softmax over one key is constant). The table
   indices and the -inf pattern depend on the mask only, so `plan` builds them once per stage and shift; each
   block gathers its own table through them;
5. scaled_dot_product_attention on (B, n_g * heads, g, d) with the (n_g * heads, g, g) mask, then back to (B, N, C)
   by another index_select (gathers both ways: their backward is index_add, several times faster on the CPU than
   the accumulating index_put of advanced indexing).

Deviations from the official code, with reasons:
- The QKV and output projections run on the N visible tokens and only q, k, v are gathered into groups: the same
  result as projecting the padded groups, with fewer FLOPs.
- Masked pairs get -inf instead of -100 (exact equality with the reference; every real query keeps its own key).
- The window id is row * windows_per_row + col; the official row * N_vis + col can collide when a window column
  index reaches N_vis (few visible tokens on a wide grid).
- On grids that are not multiples of M the last windows are partial and hold only real tokens (as in GreenMIM);
  timm's Swin instead attends to zero padding there. The Swin stage grids of GreenMIM (56, 28, 14, 7; M = 7) divide.
- forward ignores the shift when min(H, W) <= M, Swin's rule (the official BasicLayer does the same); Swin also
  shrinks M to min(H, W) there, which changes the bias table's shape, so that case is left to the caller.
- qkv and proj keep nn.Linear's default init (timm initialises them at the model level); the bias table is
  trunc-normal(std 0.02) as in Swin. Parameter names match timm's WindowAttention, so state dicts map 1:1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab_kernels.grouping import fixed_group_size, group_windows, optimal_group_size

GroupSize = int | str
RelativeBias = Callable[[Tensor], Tensor]  # (..., 2) coordinate differences -> (..., heads)


def window_offset(window_size: int, shift: int) -> int:
    """o = (M - s) mod M: window boundaries of the original grid sit at o + k M - M = s + (k - 1) M."""
    if not 0 <= shift < window_size:
        raise ValueError(f"shift must be in [0, window_size={window_size}), got {shift}")
    return (window_size - shift) % window_size


def window_ids(coords: Tensor, window_size: int, shift: int, grid: tuple[int, int]) -> Tensor:
    """Window of each token under Swin's (S)W-MSA: coords (N, 2) long -> (N,) long, row-major over the windows."""
    offset = window_offset(window_size, shift)
    windows_per_row = math.ceil((grid[1] + offset) / window_size)
    index = torch.div(coords + offset, window_size, rounding_mode="floor")  # (N, 2): window row, window col
    return index[:, 0] * windows_per_row + index[:, 1]


def relative_position_index(window_size: int) -> Tensor:
    """Swin's (M^2, M^2) index into the ((2M - 1)^2, heads) table for the tokens of one full window, row-major."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1)  # (M^2, 2)
    return _table_index(coords[:, None, :] - coords[None, :, :], window_size)


def _table_index(delta: Tensor, window_size: int) -> Tensor:
    """(..., 2) differences (dr, dc), |dr|, |dc| < M -> (...,) index (dr + M - 1) (2M - 1) + dc + M - 1."""
    shifted = delta + (window_size - 1)
    return shifted[..., 0] * (2 * window_size - 1) + shifted[..., 1]


def relative_position_bias(table: Tensor, delta: Tensor, window_size: int) -> Tensor:
    """Bias of the coordinate differences: table ((2M - 1)^2, heads), delta (..., 2) -> (..., heads)."""
    return table[_table_index(delta, window_size)]


def _bias_table(window_size: int, num_heads: int) -> nn.Parameter:
    """Swin's ((2M - 1)^2, heads) table, trunc-normal(std 0.02) in [-2, 2] like timm's trunc_normal_."""
    table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
    nn.init.trunc_normal_(table, std=0.02)
    return table


class RelativePositionBias(nn.Module):
    """Swin's relative position bias as a function of the true coordinate difference of two tokens."""

    def __init__(self, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.relative_position_bias_table = _bias_table(window_size, num_heads)

    def forward(self, delta: Tensor) -> Tensor:
        """delta (..., 2) long with |dr|, |dc| < M -> (..., heads)."""
        return relative_position_bias(self.relative_position_bias_table, delta, self.window_size)


def masked_window_attention_reference(q: Tensor, k: Tensor, v: Tensor, coords: Tensor, window_ids: Tensor,
                                      bias: RelativeBias, scale: float | None = None,
                                      dropout_p: float = 0.0) -> Tensor:
    """Dense attention of all N tokens, each query restricted to the keys of its own window, plus relative bias.

    q, k, v (B, heads, N, d), coords (N, 2), window_ids (N,), bias: (..., 2) differences -> (..., heads).
    Returns (B, heads, N, d). scale defaults to d ** -0.5.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    same = window_ids[:, None] == window_ids[None, :]  # (N, N)
    delta = torch.where(same[..., None], coords[:, None, :] - coords[None, :, :], 0)  # (N, N, 2), |.| < M
    scores = (q * scale) @ k.transpose(-2, -1) + bias(delta).permute(2, 0, 1)  # (B, heads, N, N)
    attn = F.dropout(scores.masked_fill(~same, float("-inf")).softmax(dim=-1), dropout_p)
    return attn @ v


def resolve_group_size(group_size: GroupSize, window_sizes: list[int], window_size: int, dim: int) -> int:
    """g for the window sizes w_i: "optimal", "fixed" (official, with its masking switch), "masking" or an int."""
    num_tokens = sum(window_sizes)
    if group_size == "optimal":
        return optimal_group_size(window_sizes, dim)
    if group_size == "fixed":
        masking = num_tokens <= 2 * window_size**2
        return num_tokens if masking else fixed_group_size(window_sizes, window_size**2)
    if group_size == "masking":
        return num_tokens
    if isinstance(group_size, int) and not isinstance(group_size, bool):
        return group_size
    raise ValueError(f"group_size must be 'optimal', 'fixed', 'masking' or an int, got {group_size!r}")


@dataclass(frozen=True)
class GroupLayout:
    """Where the N visible tokens sit in n_g padded groups of g slots (slot = group * g + position), and the parts
    of the attention mask that depend on the positions only."""

    group_size: int
    num_groups: int
    token_of_slot: Tensor  # (n_g * g,) token index of each slot; 0 for padding (never attended to, output dropped)
    slot_of_token: Tensor  # (N,) slot of each token
    window_of_slot: Tensor  # (n_g * g,) window id of each slot; -1 for padding
    bias_index: Tensor  # (n_g, g, g) row of the relative-position table for each (query, key) slot pair
    blocked: Tensor  # (n_g, 1, g, g) float: 0 where the query may attend to the key, -inf elsewhere


def _first_slots(groups: list[list[int]], sizes: list[int], group_size: int) -> list[int]:
    """First slot of each window: the windows of group i fill slots i g, i g + 1, ... in their listed order."""
    first = [0] * len(sizes)
    for index, members in enumerate(groups):
        slot = index * group_size
        for window in members:
            first[window], slot = slot, slot + sizes[window]
    return first


def group_layout(ids: Tensor, coords: Tensor, group_size: GroupSize, window_size: int, dim: int) -> GroupLayout:
    """Pack the windows of ids (N,) into groups (lab_kernels.grouping.group_windows), index every token's slot, and
    build the mask's position part from coords (N, 2)."""
    order = torch.argsort(ids, stable=True)  # tokens sorted by window: (N,)
    counts = torch.unique_consecutive(ids[order], return_counts=True)[1]  # window sizes w_i: (n_w,)
    sizes = counts.tolist()
    g = resolve_group_size(group_size, sizes, window_size, dim)
    groups = group_windows(g, sizes)
    device, num_tokens = ids.device, ids.numel()
    window_start = torch.cumsum(counts, 0) - counts  # first sorted position of each window: (n_w,)
    window = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)  # (N,) per sorted token
    rank = torch.arange(num_tokens, device=device) - window_start[window]  # position inside its window
    slot_of_token = torch.empty_like(order)
    slot_of_token[order] = torch.tensor(_first_slots(groups, sizes, g), device=device)[window] + rank
    token_of_slot = torch.zeros(len(groups) * g, dtype=torch.long, device=device)
    token_of_slot[slot_of_token] = torch.arange(num_tokens, device=device)
    window_of_slot = torch.full_like(token_of_slot, -1)
    window_of_slot[slot_of_token] = ids
    bias_index, blocked = _mask_positions(window_of_slot.view(-1, g), coords[token_of_slot].view(-1, g, 2),
                                          window_size)
    return GroupLayout(g, len(groups), token_of_slot, slot_of_token, window_of_slot, bias_index, blocked)


def _mask_positions(window: Tensor, slot_coords: Tensor, window_size: int) -> tuple[Tensor, Tensor]:
    """window (n_g, g) id per slot (-1 padding), slot_coords (n_g, g, 2) -> the table index (n_g, g, g) of each
    same-window pair's coordinate difference (of (0, 0) elsewhere) and the blocked pattern (n_g, 1, g, g): -inf
    across windows and to padding keys, 0 on a padding query's own slot, so no row is all -inf."""
    real = window >= 0
    same = (window[:, :, None] == window[:, None, :]) & real[:, :, None]  # (n_g, g, g)
    delta = torch.where(same[..., None], slot_coords[:, :, None] - slot_coords[:, None], 0)  # (n_g, g, g, 2)
    own_slot = torch.eye(window.shape[1], dtype=torch.bool, device=window.device) & ~real[:, :, None]
    blocked = torch.zeros(same.shape, device=window.device).masked_fill_(~(same | own_slot), float("-inf"))
    return _table_index(delta, window_size), blocked[:, None]


def group_attention_mask(layout: GroupLayout, table: Tensor) -> Tensor:
    """Additive mask (n_g, heads, g, g) from a ((2M - 1)^2, heads) table: relative bias within a window, -inf across
    windows and to padding keys, 0 on a padding query's own slot."""
    bias = table.index_select(0, layout.bias_index.flatten()).view(*layout.bias_index.shape, -1)  # (n_g, g, g, heads)
    return (bias.permute(0, 3, 1, 2) + layout.blocked).contiguous()  # (n_g, heads, g, g)


class GroupWindowAttention(nn.Module):
    """(S)W-MSA over visible tokens with relative position bias; names match timm's Swin WindowAttention."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = _bias_table(window_size, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, delta: Tensor) -> Tensor:
        """delta (..., 2) with |dr|, |dc| < M -> (..., heads) from this module's table."""
        return relative_position_bias(self.relative_position_bias_table, delta, self.window_size)

    def plan(self, coords: Tensor, grid: tuple[int, int], shift: int = 0, group_size: GroupSize = "optimal"
             ) -> GroupLayout:
        """The grouping of the visible tokens for this window size and shift (the knapsacks run on the CPU). Every
        block of a stage with the same window and shift can share it: pass it to `forward` as `layout`.

        As in Swin and the official BasicLayer, a grid no larger than the window (min(H, W) <= M) is not shifted.
        """
        shift = 0 if min(grid) <= self.window_size else shift
        ids = window_ids(coords, self.window_size, shift, grid)
        return group_layout(ids, coords, group_size, self.window_size, self.dim)

    def forward(self, x: Tensor, coords: Tensor, grid: tuple[int, int], shift: int = 0,
                group_size: GroupSize = "optimal", reference: bool = False, layout: GroupLayout | None = None
                ) -> Tensor:
        """x (B, N, C) visible tokens, coords (N, 2) on the (H, W) grid -> (B, N, C); `layout` from `plan` (made
        here when None)."""
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        if reference:
            shift = 0 if min(grid) <= self.window_size else shift
            ids = window_ids(coords, self.window_size, shift, grid)  # (N,)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = masked_window_attention_reference(q, k, v, coords, ids, self.relative_position_bias, self.scale,
                                                    dropout_p)
            out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        else:
            layout = layout if layout is not None else self.plan(coords, grid, shift, group_size)
            out = self._grouped_attention(qkv, layout)
        return self.proj_drop(self.proj(out))

    def _grouped_attention(self, qkv: Tensor, layout: GroupLayout) -> Tensor:
        """qkv (B, N, 3, heads, d) -> attention output (B, N, C) through padded groups and SDPA."""
        batch, num_tokens, _, heads, head_dim = qkv.shape
        g, n_g = layout.group_size, layout.num_groups
        grouped = qkv.index_select(1, layout.token_of_slot)  # (B, n_g * g, 3, heads, d)
        grouped = grouped.view(batch, n_g, g, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)  # (3, B, n_g, heads, g, d)
        q, k, v = grouped.reshape(3, batch, n_g * heads, g, head_dim)
        mask = group_attention_mask(layout, self.relative_position_bias_table).to(q.dtype)  # (n_g, heads, g, g)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(n_g * heads, g, g), dropout_p=dropout_p,
                                             scale=self.scale)  # (B, n_g * heads, g, d)
        out = out.view(batch, n_g, heads, g, head_dim).transpose(2, 3).reshape(batch, n_g * g, heads * head_dim)
        return out.index_select(1, layout.slot_of_token)  # (B, N, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"
