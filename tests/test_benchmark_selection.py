"""The validation protocol the digits benchmarks share (benchmarks/budget.py): every grid point is scored on the
validation split for every seed, the best first, and the recipes the benchmarks compare hold the same images out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import budget  # noqa: E402

from orchestrator import spec as spec_mod  # noqa: E402


def test_every_grid_point_is_scored_on_the_validation_split_for_every_seed_best_first() -> None:
    calls = []

    def run(row: str, seed: int, extra: list[str]) -> dict[str, float]:
        calls.append((row, seed, tuple(extra)))
        momentum = float(extra[0].split("=")[1])
        return {"acc": momentum - 0.01 * seed + (0.5 if "usb" in extra[1] else 0.0), "loss": 1.0 - momentum}

    grids = {"simmatch": {"config.m": [0.9, 0.99], "config.norm": ["embedding", "usb"]}}
    scores = budget.select_on_validation(grids, [0, 1], run)
    assert len(calls) == 8 and all(c[2][-1] == "data.eval_on=val" for c in calls)
    best = scores["simmatch"][0]
    assert best["point"] == {"config.m": 0.99, "config.norm": "usb"}
    assert best["per_seed"] == pytest.approx([1.49, 1.48]) and best["acc"] == pytest.approx(1.485)
    assert "**1.485**" in budget.selection_table(scores)


def test_a_tie_in_accuracy_goes_to_the_lower_validation_loss() -> None:
    def run(row: str, seed: int, extra: list[str]) -> dict[str, float]:
        return {"acc": 0.9, "loss": {"config.m=0.9": 0.4, "config.m=0.996": 0.1}[extra[0]]}

    scores = budget.select_on_validation({"cone": {"config.m": [0.9, 0.996]}}, [0], run)
    assert [r["point"]["config.m"] for r in scores["cone"]] == [0.996, 0.9]


def test_grid_points_become_overrides_the_spec_loader_reads() -> None:
    point = budget.grid_points({"config.bank_norm": ["usb"], "config.ema_momentum": [0.999]})[0]
    spec = spec_mod.load(REPO / "experiments" / "simmatch" / "digits.yaml", budget.overrides(point))
    assert spec.config["bank_norm"] == "usb" and spec.config["ema_momentum"] == 0.999


@pytest.mark.parametrize("files", [
    ["supervised/digits_2_labels.yaml", "fixmatch/digits.yaml", "simmatch/digits.yaml", "simmatchv2/digits.yaml"],
    ["supervised/digits_ce.yaml", "cone/digits.yaml"],
    ["ressl/digits.yaml", "ressl/digits_extended.yaml", "wcl/digits.yaml", "lewel/digits.yaml",
     "linear_probe/digits.yaml", "linear_probe/ressl_digits.yaml"],
])
def test_the_compared_digits_recipes_hold_the_same_validation_images_out(files: list[str]) -> None:
    specs = [spec_mod.load(REPO / "experiments" / f) for f in files]
    assert {s.data.val_per_class for s in specs} == {15} and {s.data.eval_on for s in specs} == {"test"}


def test_diffkd_choices_are_overrides_its_recipes_read_and_the_budget_goes_to_the_clearest_kd_gain() -> None:
    import diffkd_digits as diffkd

    for extra in diffkd.BUDGETS.values():
        for path in (diffkd.STUDENT, diffkd.DIFFKD):
            spec_mod.load(path, [*extra, "data.eval_on=val"])
    for grid in diffkd.GRID.values():
        for point in budget.grid_points(grid):
            spec_mod.load(diffkd.DIFFKD, [*budget.overrides(point), *diffkd.PLAIN_KD])
    noisy = {"student alone": [0.70, 0.80, 0.90], "plain KD": [0.80, 0.90, 1.00]}  # gain 0.1, std 0.1
    steady = {"student alone": [0.90, 0.91, 0.92], "plain KD": [0.93, 0.94, 0.95]}  # gain 0.03, std 0.01
    assert diffkd.kd_gain(noisy) == pytest.approx(1.0) and diffkd.kd_gain(steady) == pytest.approx(3.0)
    assert "| **steady** |" in diffkd.budget_table({"noisy": noisy, "steady": steady}, "steady")
