"""LEWEL: alignment maps, aligned features against a loop, BYOL loss on a hand case, symmetry, the momentum schedule
and the EMA target, where gradients go, the backbones' spatial maps, and a few TINY steps on digits."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch

from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import lewel
from trainers._common.backbones import build_backbone, feature_map
from trainers._common.contract import ConfigError
from trainers._common.ema import cosine_momentum


@functools.cache
def digits():
    return build_data(DataSpec(dataset="digits", image_size=16), seed=0, views="byol_two_crop")


def tiny_model(batch_size: int = 8, **changes):
    data = digits()
    batch = torch.utils.data.default_collate([data.train[i] for i in range(batch_size)])
    torch.manual_seed(0)
    cfg = dataclasses.replace(lewel.TINY, **changes)
    return lewel.build(cfg, data.info), batch, cfg


# ---------------------------------------------------------------------------------------------- alignment maps


def test_alignment_maps_are_distributions_over_positions() -> None:
    torch.manual_seed(0)
    maps = lewel.alignment_maps(torch.randn(3, 8, 5), num_heads=2, scale=1.0)  # K 8 = 2 heads x 4 maps, HW 5
    assert maps.shape == (3, 2, 4, 5)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=3), torch.ones(3, 2, 4))


def test_alignment_maps_normalise_each_pixel_then_divide_by_the_scale() -> None:
    """Scaling one pixel's logit vector changes nothing (L2 normalisation over channels); a smaller scale sharpens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    rescaled = logits * torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0, 0.1])  # a positive factor per pixel
    torch.testing.assert_close(lewel.alignment_maps(rescaled, 2, 1.0), lewel.alignment_maps(logits, 2, 1.0))
    unit = logits / logits.norm(dim=1, keepdim=True)
    torch.testing.assert_close(lewel.alignment_maps(logits, 1, 0.5), torch.softmax(unit / 0.5, dim=2)[:, None])


def test_aligned_features_equal_an_explicit_loop() -> None:
    """o[b, c, j] = sum_p x[b, c, p] * A[b, head(c), j, p] with head(c) = c // (D / h)."""
    torch.manual_seed(0)
    b, d, hw, h, m = 2, 6, 5, 3, 4
    x = torch.randn(b, d, hw)
    maps = torch.softmax(torch.randn(b, h, m, hw), dim=3)
    expected = torch.zeros(b, d, m)
    for i in range(b):
        for c in range(d):
            for j in range(m):
                expected[i, c, j] = sum(x[i, c, p] * maps[i, c // (d // h), j, p] for p in range(hw))
    torch.testing.assert_close(lewel.aligned_features(x, maps), expected)


def test_the_neck_gives_one_global_and_m_aligned_embeddings() -> None:
    model, batch, cfg = tiny_model()
    x = feature_map(model.encoder, batch["x1"])  # (8, 128, 4, 4)
    z_g, e = model.neck(x)
    assert z_g.shape == (8, cfg.out_dim, 1) and e.shape == (8, cfg.out_dim, cfg.out_dim // cfg.num_heads)


# ---------------------------------------------------------------------------------------------- loss


def test_byol_loss_on_a_hand_case() -> None:
    """Row 0: cos([1, 0], [1, 1]) = 1/sqrt(2) -> 2 - sqrt(2); row 1: cos([0, 2], [0, -5]) = -1 -> 4."""
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    torch.testing.assert_close(lewel.byol_loss(q, z), torch.tensor((2 - math.sqrt(2) + 4) / 2))
    torch.testing.assert_close(lewel.byol_loss(q[:, :, None], z[:, :, None]), lewel.byol_loss(q, z))  # (B, K, L)


def test_the_loss_adds_both_directions_and_is_symmetric_in_the_views() -> None:
    torch.manual_seed(0)
    q1, q2, z1, z2 = torch.randn(4, 4, 3, 5).unbind(0)  # four (B 4, K 3, L 5) tensors
    total = lewel.symmetric_byol_loss(q1, q2, z1, z2)
    torch.testing.assert_close(total, lewel.byol_loss(q1, z2) + lewel.byol_loss(q2, z1))
    torch.testing.assert_close(lewel.symmetric_byol_loss(q2, q1, z2, z1), total)


def test_train_step_is_symmetric_in_the_two_views() -> None:
    model, batch, cfg = tiny_model()
    loss, _ = lewel.train_step(copy.deepcopy(model), batch, cfg, 0)
    swapped = {**batch, "x1": batch["x2"], "x2": batch["x1"]}
    loss_swapped, _ = lewel.train_step(copy.deepcopy(model), swapped, cfg, 0)
    torch.testing.assert_close(loss_swapped, loss)


# ---------------------------------------------------------------------------------------------- target network


def test_momentum_is_cosine_annealed_from_base_to_one() -> None:
    assert cosine_momentum(0, 100, 0.98) == pytest.approx(0.98)
    assert cosine_momentum(50, 100, 0.98) == pytest.approx(0.99)
    assert cosine_momentum(25, 100, 0.98) == pytest.approx(1 - 0.02 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(100, 100, 0.98) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.98) == pytest.approx(1.0)


def test_the_target_starts_as_a_copy_and_follows_by_ema() -> None:
    """on_step_end after the first step (step = 1) uses m_0 = base: t <- 0.99 t + 0.01 o; EMAN also averages the
    BN statistics and copies the integer counters."""
    model, batch, cfg = tiny_model()
    for t, o in zip(model.target_neck.state_dict().values(), model.neck.state_dict().values()):
        assert torch.equal(t, o)
    before = copy.deepcopy(model)
    with torch.no_grad():
        for p in [*model.encoder.encoder.parameters(), *model.neck.parameters()]:
            p.add_(torch.randn_like(p))
    model.encoder(batch["x1"])  # moves the online BN statistics
    lewel.on_step_end(model, cfg, 1)
    pairs = [(model.target_encoder.encoder, model.encoder.encoder, before.target_encoder.encoder),
             (model.target_neck, model.neck, before.target_neck)]
    for target, online, old in pairs:
        for (name, t), o, t0 in zip(target.state_dict().items(), online.state_dict().values(),
                                    old.state_dict().values()):
            expected = o if name.endswith("num_batches_tracked") else 0.99 * t0 + 0.01 * o
            torch.testing.assert_close(t, expected, msg=name)


def test_without_eman_only_parameters_follow_and_the_target_trains() -> None:
    model, batch, cfg = tiny_model(eman=False)
    assert model.target_encoder.training
    buffers = [b.clone() for b in model.target_encoder.buffers()]
    model.encoder(batch["x1"])  # moves the online BN statistics
    lewel.on_step_end(model, cfg, 1)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.target_encoder.buffers()))


def test_eman_keeps_the_target_in_eval_mode() -> None:
    model, _, _ = tiny_model()
    model.train()
    assert model.encoder.training and model.neck.training
    assert not model.target_encoder.training and not model.target_neck.training
    model.eval()
    assert not model.encoder.training


# ---------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_only_the_online_branch() -> None:
    model, batch, cfg = tiny_model()
    loss, _ = lewel.train_step(model, batch, cfg, 0)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("target_encoder.", "target_neck.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_online_classifier_sends_no_gradient_into_the_encoder() -> None:
    """Other labels change the classifier's gradient but not a single backbone gradient."""
    model, batch, cfg = tiny_model()
    grads = []
    for y in (batch["y"], (batch["y"] + 3) % 10):
        run = copy.deepcopy(model)
        loss, _ = lewel.train_step(run, {**batch, "y": y}, cfg, 0)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in run.named_parameters() if p.grad is not None})
    for name in grads[0]:
        same = torch.equal(grads[0][name], grads[1][name])
        assert same != name.startswith("encoder.head."), name


# ---------------------------------------------------------------------------------------------- feature_map


@pytest.mark.parametrize("arch, size, shape", [("small_cnn", 16, (2, 128, 4, 4)), ("wrn10_1", 32, (2, 64, 8, 8)),
                                               ("resnet18", 64, (2, 512, 2, 2))])
def test_feature_map_pools_to_the_features(arch: str, size: int, shape: tuple) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch, 1, 10).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        spatial = feature_map(backbone, x)
        assert spatial.shape == shape
        torch.testing.assert_close(spatial.mean(dim=(2, 3)), backbone.features(x))


def test_feature_map_refuses_maps_that_are_not_nchw() -> None:
    with pytest.raises(ValueError, match="NCHW"):
        feature_map(build_backbone("test_vit", 3, 10), torch.randn(1, 3, 160, 160))
    backbone = build_backbone("small_cnn", 1, 10)
    backbone.encoder = torch.nn.Sequential(*backbone.encoder[:-2], torch.nn.Flatten(), torch.nn.Linear(2048, 8))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):
        feature_map(backbone, torch.randn(1, 1, 16, 16))


# ---------------------------------------------------------------------------------------------- config and training


def test_check_rejects_heads_that_do_not_divide_the_embedding() -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        lewel.check(dataclasses.replace(lewel.TINY, num_heads=3))
    with pytest.raises(ConfigError, match="total_steps"):
        lewel.check(dataclasses.replace(lewel.TINY, total_steps=0))
    lewel.check(lewel.TINY)


def test_tiny_trains_a_few_steps_with_finite_loss() -> None:
    model, batch, cfg = tiny_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(5):
        loss, metrics = lewel.train_step(model, batch, cfg, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lewel.on_step_end(model, cfg, step + 1)
        losses.append(loss.item())
        assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    test = torch.utils.data.default_collate([digits().test[i] for i in range(6)])
    with torch.no_grad():
        sums = lewel.eval_step(model.eval(), test, cfg)
    assert int(sums["n"]) == 6 and set(sums) == {"acc", "loss", "n", "acc5"}
