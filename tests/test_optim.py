"""Optimizers and schedules from the `optim:` block."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orchestrator.optim import LARS, base_lr, build_optimizer, build_scheduler, default_param_groups, lr_factor
from orchestrator.spec import OptimSpec


def test_warmup_then_cosine() -> None:
    spec = OptimSpec(steps=110, batch_size=8, warmup_steps=10)
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(60, spec) == pytest.approx(0.5)
    assert lr_factor(110, spec) == pytest.approx(0.0, abs=1e-12)


def test_fixmatch_cosine_ends_at_a_fifth() -> None:
    spec = OptimSpec(steps=1600, batch_size=8, schedule="cosine_fixmatch")
    assert lr_factor(0, spec) == 1.0
    assert lr_factor(800, spec) == pytest.approx(math.cos(7 * math.pi / 32))
    assert lr_factor(1600, spec) == pytest.approx(0.19509, abs=1e-5)


def test_poly_schedule_is_deeplabs_polylr() -> None:
    spec = OptimSpec(steps=100, batch_size=8, schedule="poly")
    assert [lr_factor(s, spec) for s in (0, 50, 100)] == pytest.approx([1, 0.5 ** 0.9, 0])
    assert lr_factor(50, OptimSpec(steps=100, batch_size=8, schedule="poly", power=2.0)) == pytest.approx(0.25)


def test_step_schedule() -> None:
    spec = OptimSpec(steps=100, batch_size=8, schedule="step", milestones=[30, 60], gamma=0.1)
    assert [lr_factor(s, spec) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    decay, no_decay = default_param_groups(model)
    assert [p.ndim for p in decay["params"]] == [2]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_each_optimizer_lowers_a_quadratic(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    spec = OptimSpec(name=name, lr=0.05 if name != "lars" else 1.0, steps=50, batch_size=8, schedule="constant")
    optimizer = build_optimizer(default_param_groups(model), spec)
    scheduler = build_scheduler(optimizer, spec)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for _ in range(50):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_lars_trust_ratio_scales_the_step() -> None:
    p = nn.Parameter(torch.full((4,), 2.0))
    p.grad = torch.full((4,), 0.5)
    LARS([p], lr=1.0, momentum=0.0, eta=0.001).step()
    # trust = eta * |p| / |g| = 0.001 * 4 / 1 = 0.004; step = trust * g = 0.002
    torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 - 0.002))
    assert math.isfinite(p.sum().item())


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_a_group_lr_scale_multiplies_the_lr_through_the_schedule(name: str) -> None:
    """K-shot NAS gives its K-atom dictionaries lr x K; the logged lr stays the experiment's."""
    spec = OptimSpec(name=name, lr=0.1, steps=100, batch_size=8, warmup_steps=10)
    fast, plain = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    optimizer = build_optimizer([{"params": [fast], "lr_scale": 4.0}, {"params": [plain]}], spec)
    scheduler = build_scheduler(optimizer, spec)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    first, second = optimizer.param_groups
    assert first["lr"] == pytest.approx(4 * second["lr"]) and second["lr"] == pytest.approx(0.1 * lr_factor(5, spec))
    assert base_lr(optimizer) == pytest.approx(second["lr"])


def test_adamw_is_torchs_fused_kernel_and_takes_its_update() -> None:
    """On the CPU the AdamW of an experiment is torch's fused kernel (one pass per parameter); its step equals the
    for-loop AdamW's up to float rounding, and a group given as a generator keeps every parameter."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    reference = nn.Linear(16, 4)
    reference.load_state_dict(model.state_dict())
    spec = OptimSpec(name="adamw", lr=0.01, weight_decay=0.05, betas=(0.9, 0.95), steps=5, batch_size=8)
    fused = build_optimizer([{"params": (p for p in model.parameters())}], spec)
    loop = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.05, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] and len(fused.param_groups[0]["params"]) == 2
    x = torch.randn(32, 16)
    for _ in range(5):
        for net, optimizer in ((model, fused), (reference, loop)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
