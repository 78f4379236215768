"""GreenMIM's window grouping: 0/1 knapsacks that pack the visible windows into equal-size groups.

Spec: ../shared/papers/methods_nas_gen_llm.md section 5 (Huang et al., "Green Hierarchical Vision Transformer for
Masked Image Modeling", NeurIPS 2022; official code: LayneH/GreenMIM, modeling/group_window_attention.py).

With a random mask the windows of a Swin stage hold different numbers w_i of visible tokens. Group Window Attention
packs whole windows into groups of g slots, pads every group to g and runs masked attention inside each group:

    knapsack(g, w)          exact 0/1 knapsack, value = weight = w_i: the subset of windows that fills one group
                            as full as possible (the official `knapsack`, a dynamic programme over capacities)
    group_windows(g, w)     the greedy sequence of exact knapsacks: fill a group, remove its windows, repeat
    grouping_cost(g, w, C)  4 N C^2 + n_groups(g) * 2 g^2 C multiply-adds, N = sum_i w_i: the QKV and output
                            projections of the N visible tokens plus the two attention matmuls (q k^T, attn v) on
                            n_groups(g) padded groups of g slots, what group_window_attention.py executes
    optimal_group_size      argmin_g grouping_cost over g >= max_i w_i ("Optimal Grouping with DP" in the paper)

Official code facts and deviations:
- The released code never searches g: it hard-codes g = min(M^2, max_i w_i) with a `# FIXME` (both the 2022 and
  2023 versions; issue #12 "where is Optimal Grouping with DP conducted?" is unanswered). `fixed_group_size` is that
  baseline; since w_i <= M^2 it always equals max_i w_i.
- The paper's exact cost function is not in the released code either. The spec's recalled form charges the
  projections to the padded groups too, n_groups(g) * (4 g C^2 + 2 g^2 C); but the kernel here (as the official
  one) projects the visible tokens before grouping, so padding costs only attention. `grouping_cost` is the cost the
  kernel executes (tests/test_grouping.py counts it with torch's FLOP counter); the projections do not depend on g,
  so the argmin is that of n_groups(g) * g^2, whatever C. Minimising the recalled form instead made the executed
  attention cost 1.05x / 1.19x the fixed size's on Swin-B's stages 1 / 2 (30 masks); this argmin is never above it.
- `knapsack` returns the same indices as the official table DP (both backtrack from the last item and leave an item
  out whenever the remaining total is reachable without it) but keeps the reachable totals as Python-int bitsets,
  O(n * g / 64) word operations instead of an (n + 1) x (g + 1) table of Python lists, so that the search over g is
  cheap enough to run every forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _check_sizes(sizes: Sequence[int], what: str) -> None:
    if any(size < 0 for size in sizes):
        raise ValueError(f"{what} must be non-negative, got {list(sizes)}")


def knapsack(capacity: int, weights: Sequence[int]) -> list[int]:
    """Indices (increasing) of a subset with the largest total weight <= capacity; each item's value is its weight.

    Tie-breaking: among the subsets with the largest total, the one minimising sum(2**i for i in subset), i.e. the
    last item is used only if no optimal subset avoids it, then the one before it, and so on (the official code's
    backtracking). Items of weight 0 are therefore never chosen.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity}")
    _check_sizes(weights, "weights")
    full = (1 << (capacity + 1)) - 1
    reachable = [1]  # reachable[i]: bit t is set iff some subset of items 0..i-1 sums to t <= capacity
    for weight in weights:
        before = reachable[-1]
        reachable.append((before | (before << weight)) & full)
    total = reachable[-1].bit_length() - 1
    chosen = []
    for i in range(len(weights) - 1, -1, -1):
        if not (reachable[i] >> total) & 1:  # the remaining total needs item i
            chosen.append(i)
            total -= weights[i]
    return chosen[::-1]


def group_windows(group_size: int, window_sizes: Sequence[int]) -> list[list[int]]:
    """Window indices of each group: repeated exact knapsacks of capacity group_size over the windows left.

    Windows of size 0 are skipped; every other window lands in exactly one group. Groups come in the order they are
    filled (the first is the fullest the knapsack can make), window indices increasing within a group.
    """
    _check_sizes(window_sizes, "window sizes")
    if any(size > group_size for size in window_sizes):
        raise ValueError(f"group size {group_size} is smaller than the largest window {max(window_sizes)}")
    remaining = [i for i, size in enumerate(window_sizes) if size > 0]
    groups = []
    while remaining:
        picked = set(knapsack(group_size, [window_sizes[i] for i in remaining]))  # never empty: 0 < size <= g
        groups.append([window for j, window in enumerate(remaining) if j in picked])
        remaining = [window for j, window in enumerate(remaining) if j not in picked]
    return groups


def _attention_cost(group_size: int, dim: int) -> float:
    """Multiply-adds of the attention in one padded group: 2 g^2 C (q k^T and attn v)."""
    return float(2 * group_size**2 * dim)


def grouping_cost(group_size: int, window_sizes: Sequence[int], dim: int) -> float:
    """4 N C^2 + n_groups * 2 g^2 C: the multiply-adds that group window attention executes (module docstring)."""
    projections = 4 * sum(window_sizes) * dim**2
    return projections + len(group_windows(group_size, window_sizes)) * _attention_cost(group_size, dim)


def _positive(window_sizes: Sequence[int]) -> list[int]:
    _check_sizes(window_sizes, "window sizes")
    sizes = [size for size in window_sizes if size > 0]
    if not sizes:
        raise ValueError("no visible token: every window is empty")
    return sizes


def optimal_group_size(window_sizes: Sequence[int], dim: int, candidates: Iterable[int] | None = None) -> int:
    """argmin of grouping_cost over the candidates g >= max_i w_i (default: every g in max_i w_i .. sum_i w_i).

    Ties go to the smaller g. g = sum_i w_i puts all windows into one unpadded group, the official "masking" mode,
    so the default search also decides between masking and grouping. Exact: a candidate is skipped only when the
    lower bound 4 N C^2 + ceil(N / g) * 2 g^2 C, N = sum_i w_i, already reaches the best cost, and the search stops
    once 4 N C^2 + 2 N g C, which grows with g, does.
    """
    sizes = _positive(window_sizes)
    largest, total = max(sizes), sum(sizes)
    pool = range(largest, total + 1) if candidates is None else sorted({g for g in candidates if g >= largest})
    projections = 4 * total * dim**2
    best, best_cost = None, float("inf")
    for g in pool:
        if projections + 2 * total * g * dim >= best_cost:
            break
        if projections + -(-total // g) * _attention_cost(g, dim) >= best_cost:
            continue
        cost = grouping_cost(g, sizes, dim)
        if cost < best_cost:
            best, best_cost = g, cost
    if best is None:
        raise ValueError(f"no candidate group size >= the largest window {largest}")
    return best


def fixed_group_size(window_sizes: Sequence[int], window_area: int) -> int:
    """The official code's hard-coded g = min(M^2, max_i w_i) (marked FIXME there), window_area = M^2."""
    return min(window_area, max(_positive(window_sizes)))


def padding_fraction(group_size: int, window_sizes: Sequence[int]) -> float:
    """Padded slots / all slots of the groups that group_windows(group_size, window_sizes) makes."""
    sizes = _positive(window_sizes)
    slots = len(group_windows(group_size, sizes)) * group_size
    return (slots - sum(sizes)) / slots
