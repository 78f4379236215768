"""GreenMIM's window grouping: knapsack against brute force, the greedy groups, the optimal and fixed group sizes."""

from __future__ import annotations

import itertools
import random

import pytest

from lab_kernels.grouping import (
    fixed_group_size,
    group_windows,
    grouping_cost,
    knapsack,
    optimal_group_size,
    padding_fraction,
)


def brute_force_knapsack(capacity: int, weights: list[int]) -> list[int]:
    """Largest total <= capacity; ties -> smallest sum(2**i), the documented tie-break."""
    subsets = itertools.chain.from_iterable(itertools.combinations(range(len(weights)), r)
                                            for r in range(len(weights) + 1))
    feasible = [s for s in subsets if sum(weights[i] for i in s) <= capacity]
    best = max(sum(weights[i] for i in s) for s in feasible)
    optimal = [s for s in feasible if sum(weights[i] for i in s) == best]
    return list(min(optimal, key=lambda s: sum(2**i for i in s)))


def random_windows(rng: random.Random, max_windows: int = 9, max_size: int = 16) -> list[int]:
    return [rng.randint(0, max_size) for _ in range(rng.randint(1, max_windows))]


def test_knapsack_equals_brute_force_on_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(400):
        weights = [rng.randint(0, 12) for _ in range(rng.randint(0, 8))]
        capacity = rng.randint(0, 30)
        assert knapsack(capacity, weights) == brute_force_knapsack(capacity, weights), (capacity, weights)


def test_knapsack_small_cases() -> None:
    assert knapsack(10, [6, 5, 4]) == [0, 2]  # 6 + 4 = 10
    assert knapsack(9, [4, 5, 4]) == [0, 1]  # 4 + 5 and 5 + 4 tie: the last item is left out
    assert knapsack(3, [5, 7]) == []
    assert knapsack(5, [0, 5, 0]) == [1]  # zero weights are never chosen
    with pytest.raises(ValueError):
        knapsack(-1, [1])
    with pytest.raises(ValueError):
        knapsack(3, [1, -2])


def test_group_windows_covers_every_window_once_and_fills_greedily() -> None:
    rng = random.Random(1)
    for _ in range(200):
        sizes = random_windows(rng)
        if max(sizes) == 0:
            continue
        g = rng.randint(max(sizes), max(sizes) + 20)
        groups = group_windows(g, sizes)
        flat = sorted(w for group in groups for w in group)
        assert flat == [i for i, size in enumerate(sizes) if size > 0]
        remaining = [i for i, size in enumerate(sizes) if size > 0]
        for group in groups:
            assert sum(sizes[w] for w in group) <= g and group == sorted(group)
            best = brute_force_knapsack(g, [sizes[w] for w in remaining])
            assert sum(sizes[w] for w in group) == sum(sizes[remaining[j]] for j in best)  # each group is exact
            remaining = [w for w in remaining if w not in group]


def test_group_windows_rejects_windows_larger_than_the_group() -> None:
    with pytest.raises(ValueError, match="smaller than the largest window"):
        group_windows(4, [3, 5])
    assert group_windows(4, [0, 0]) == []


def test_grouping_cost_formula() -> None:
    # g = 5 packs [3, 2] and [4]: projections of the 9 visible tokens (4 N C^2, C = 8) + 2 groups of 2 g^2 C
    assert group_windows(5, [3, 4, 2]) == [[0, 2], [1]]
    assert grouping_cost(5, [3, 4, 2], 8) == 4 * 9 * 64 + 2 * (2 * 25 * 8)


def exhaustive_optimum(sizes: list[int], dim: int, candidates: list[int]) -> int:
    costs = [(grouping_cost(g, sizes, dim), g) for g in candidates if g >= max(sizes)]
    return min(costs)[1]  # ties -> smaller g


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_optimal_group_size_equals_exhaustive_search(dim: int) -> None:
    rng = random.Random(dim)
    for _ in range(60):
        sizes = random_windows(rng, max_windows=10, max_size=20)
        if max(sizes) == 0:
            continue
        every = list(range(max(sizes), sum(sizes) + 1))
        assert optimal_group_size(sizes, dim) == exhaustive_optimum(sizes, dim, every), sizes
        subset = rng.sample(range(1, sum(sizes) + 3), k=min(6, sum(sizes) + 2)) + [sum(sizes)]
        assert optimal_group_size(sizes, dim, subset) == exhaustive_optimum(sizes, dim, subset), (sizes, subset)


def test_optimal_group_size_edge_cases() -> None:
    assert optimal_group_size([0, 7, 0], 64) == 7
    with pytest.raises(ValueError, match="no candidate"):
        optimal_group_size([3, 5], 8, candidates=[2, 4])
    with pytest.raises(ValueError, match="every window is empty"):
        optimal_group_size([0, 0], 8)


def test_fixed_group_size_is_min_of_window_area_and_largest_window() -> None:
    assert fixed_group_size([3, 12, 0, 7], 49) == 12
    assert fixed_group_size([49, 2], 49) == 49
    assert fixed_group_size([9, 2], 4) == 4  # the formula itself; group_windows would then reject the 9


def test_padding_fraction() -> None:
    assert padding_fraction(5, [3, 4, 2]) == pytest.approx(1 / 10)
    assert padding_fraction(9, [3, 4, 2]) == 0.0
