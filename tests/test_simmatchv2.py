"""SimMatchV2: label propagation, the four consistencies, distribution alignment and the banks (pure PyTorch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import simmatchv2 as sm
from trainers._common.contract import ConfigError, DataInfo

INFO = DataInfo(num_classes=10, image_size=16, in_channels=1, num_train=80, num_labeled=20)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(dim=1).mean()


def tiny_batch(views: str = "weak_strong", num_local_crops: int = 2) -> dict[str, torch.Tensor]:
    spec = DataSpec(dataset="digits", image_size=16, labeled_per_class=2, unlabeled_ratio=2,
                    num_local_crops=num_local_crops)
    data = build_data(spec, seed=0, views=views)
    return torch.utils.data.default_collate([data.train[i] for i in range(4)])


# ---------------------------------------------------------------------------------------------- edge-node


def test_label_propagation_by_hand_equal_edges():
    # Three orthonormal nodes: every off-diagonal edge is equal, so A = [[0, 1/2, 1/2], [1/2, 0, 1/2], [1/2, 1/2, 0]].
    # alpha = 1/2: I - A/2 = 5/4 I - 1/4 J, whose inverse is 4/5 (I + 1/2 J) = [[1.2, .4, .4], [.4, 1.2, .4], ...];
    # P = (1 - alpha) (I - alpha A)^-1 = [[.6, .2, .2], [.2, .6, .2], [.2, .2, .6]]; y_hat = .6 y0 + .2 y1 + .2 y2.
    f = torch.eye(3)[None]  # (1, 3, 3)
    y = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]])  # (1, 3, 2)
    y_hat = sm.label_propagation(f, y, t=1.0, alpha=0.5)
    torch.testing.assert_close(y_hat, torch.tensor([[0.7, 0.3]]))


def test_label_propagation_by_hand_unequal_edges():
    # Node 1 is a copy of node 0, node 2 is orthogonal; t = 1/ln 3, so exp(f0.f1 / t) = 3 and exp(f0.f2 / t) = 1:
    #   A = [[0, 3/4, 1/4], [3/4, 0, 1/4], [1/2, 1/2, 0]],  alpha = 1/2,
    #   I - alpha A = [[1, -3/8, -1/8], [-3/8, 1, -1/8], [-1/4, -1/4, 1]],
    #   P = (1/2)(I - alpha A)^-1 = [[62, 26, 11], [26, 62, 11], [22, 22, 55]] / 99.
    # With Y = [[1/2, 1/2], [1, 0], [0, 1]]: y_hat = row 0 of P Y = [31 + 26, 31 + 11] / 99 = [19/33, 14/33].
    A = torch.tensor([[0, 3 / 4, 1 / 4], [3 / 4, 0, 1 / 4], [1 / 2, 1 / 2, 0]], dtype=torch.float64)
    P = torch.tensor([[62, 26, 11], [26, 62, 11], [22, 22, 55]], dtype=torch.float64) / 99
    torch.testing.assert_close((torch.eye(3, dtype=torch.float64) - A / 2) @ P, torch.eye(3, dtype=torch.float64) / 2)
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]])
    y_hat = sm.label_propagation(f, y, t=1 / math.log(3), alpha=0.5)
    torch.testing.assert_close(y_hat, torch.tensor([[19 / 33, 14 / 33]]))


def test_batched_label_propagation_equals_the_explicit_inverse_per_node():
    torch.manual_seed(0)
    N, n, d, C, t, alpha = 5, 6, 8, 4, 0.1, 0.1
    f = F.normalize(torch.randn(N, n + 1, d), dim=-1)
    y = torch.softmax(torch.randn(N, n + 1, C), dim=-1)
    expected = []
    for i in range(N):
        A = torch.softmax(f[i] @ f[i].T / t - 1e9 * torch.eye(n + 1), dim=-1)
        P = (1 - alpha) * torch.linalg.inv(torch.eye(n + 1) - alpha * A)
        expected.append((P @ y[i])[0])
    y_hat = sm.label_propagation(f, y, t, alpha)
    torch.testing.assert_close(y_hat, torch.stack(expected))
    torch.testing.assert_close(y_hat.sum(dim=1), torch.ones(N))  # P is row-stochastic: y_hat is a distribution


def test_pseudo_label_uses_the_top_n_labeled_neighbours():
    torch.manual_seed(0)
    z_w, p_w = F.normalize(torch.randn(3, 8), dim=1), torch.softmax(torch.randn(3, 4), dim=1)
    bank, labels = F.normalize(torch.randn(10, 8), dim=1), F.one_hot(torch.arange(10) % 4, 4).float()
    y_hat = sm.edge_node_pseudo_label(z_w, p_w, bank, labels, topn=3, t=0.1, alpha=0.1)
    nearest = (z_w @ bank.T).topk(3, dim=1).indices
    f = torch.cat([z_w[:, None], bank[nearest]], dim=1)
    y = torch.cat([p_w[:, None], labels[nearest]], dim=1)
    torch.testing.assert_close(y_hat, sm.label_propagation(f, y, 0.1, 0.1))
    assert sm.edge_node_pseudo_label(z_w, p_w, bank, labels, topn=128, t=0.1, alpha=0.1).shape == (3, 4)  # n <= L


# ---------------------------------------------------------------------------------------------- consistencies


def test_node_node_loss_is_the_entropy_for_matching_views_and_larger_otherwise():
    # H(y_hat, softmax(l)) = H(y_hat) + KL(y_hat || softmax(l)): minimal (= the entropy) when softmax(l) = y_hat.
    torch.manual_seed(0)
    y_hat = torch.softmax(torch.randn(6, 5), dim=1)
    mask = torch.ones(6)
    torch.testing.assert_close(sm.node_node_loss(y_hat.log(), y_hat, mask), entropy(y_hat))
    other = torch.randn(6, 5)
    kl = F.kl_div(F.log_softmax(other, dim=1), y_hat, reduction="batchmean")
    torch.testing.assert_close(sm.node_node_loss(other, y_hat, mask), entropy(y_hat) + kl)
    assert kl > 0
    assert sm.node_node_loss(other, y_hat, torch.zeros(6)) == 0  # masked out: below the threshold


def test_edge_edge_loss_is_the_entropy_of_r_w_for_identical_embeddings_and_larger_otherwise():
    torch.manual_seed(0)
    z_w, bank = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(12, 8), dim=1)
    r_w = torch.softmax(z_w @ bank.T / 0.1, dim=1)
    torch.testing.assert_close(sm.edge_edge_loss(z_w, z_w, bank, 0.1), entropy(r_w))
    z_s = F.normalize(torch.randn(6, 8), dim=1)
    kl = F.kl_div(F.log_softmax(z_s @ bank.T / 0.1, dim=1), r_w, reduction="batchmean")
    torch.testing.assert_close(sm.edge_edge_loss(z_s, z_w, bank, 0.1), entropy(r_w) + kl)
    assert kl > 0


def test_node_edge_loss_is_the_entropy_when_the_edges_agree_with_p_w_and_larger_otherwise():
    torch.manual_seed(0)
    bank, bank_probs = F.normalize(torch.randn(12, 8), dim=1), torch.softmax(torch.randn(12, 5), dim=1)
    z_s = F.normalize(torch.randn(6, 8), dim=1)
    q = torch.softmax(z_s @ bank.T / 0.1, dim=1) @ bank_probs  # the strong view's prediction through its edges
    torch.testing.assert_close(sm.node_edge_loss(z_s, q, bank, bank_probs, 0.1), entropy(q))
    p_w = torch.softmax(3 * torch.randn(6, 5), dim=1)
    kl = F.kl_div(q.log(), p_w, reduction="batchmean")
    torch.testing.assert_close(sm.node_edge_loss(z_s, p_w, bank, bank_probs, 0.1), entropy(p_w) + kl)
    assert kl > 0


def test_nan_guard_zeroes_non_finite_losses():
    assert sm.zero_if_not_finite(torch.tensor(float("nan"))) == 0
    assert sm.zero_if_not_finite(torch.tensor(float("inf"))) == 0
    assert sm.zero_if_not_finite(torch.tensor(2.5)) == 2.5
    # The unlabeled bank starts with zero probabilities (as the official code): L_ne is +inf until the first push.
    z_s, bank = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(12, 8), dim=1)
    assert torch.isinf(sm.node_edge_loss(z_s, torch.full((4, 5), 0.2), bank, torch.zeros(12, 5), 0.1))
    model = sm.build(sm.TINY, INFO)
    loss, metrics = sm.train_step(model, tiny_batch(), sm.TINY, 0)
    assert torch.isfinite(loss) and metrics["loss_ne"] == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters())
    _, metrics = sm.train_step(model, tiny_batch(), sm.TINY, 1)
    assert metrics["loss_ne"] > 0  # the bank holds probabilities now


# ---------------------------------------------------------------------------------------------- DA and banks


def test_distribution_alignment_and_its_update():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    d = torch.full((3,), 1 / 3)
    torch.testing.assert_close(sm.distribution_alignment(probs, d), probs)  # uniform d: unchanged
    sm.update_da(d, probs, 0.9)
    torch.testing.assert_close(d, 0.9 / 3 + 0.1 * torch.tensor([0.6, 0.25, 0.15]))
    aligned = sm.distribution_alignment(probs, d)
    expected = probs / d
    torch.testing.assert_close(aligned, expected / expected.sum(dim=1, keepdim=True))


def test_labeled_bank_is_overwritten_by_index():
    bank, labels = torch.zeros(5, 2), torch.full((5, 3), 1 / 3)
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sm.update_labeled_bank(bank, labels, z, torch.tensor([2, 0]), torch.tensor([4, 1]))
    torch.testing.assert_close(bank, torch.tensor([[0.0, 0], [3, 4], [0, 0], [0, 0], [1, 2]]))
    torch.testing.assert_close(labels[[4, 1]], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    torch.testing.assert_close(labels[[0, 2, 3]], torch.full((3, 3), 1 / 3))


def test_unlabeled_fifo_wraps_around():
    bank, probs, ptr = torch.zeros(5, 1), torch.zeros(5, 2), torch.zeros((), dtype=torch.long)
    sm.push_unlabeled(bank, probs, ptr, torch.tensor([[1.0], [2.0], [3.0]]), torch.ones(3, 2))
    assert int(ptr) == 3
    sm.push_unlabeled(bank, probs, ptr, torch.tensor([[4.0], [5.0], [6.0]]), 2 * torch.ones(3, 2))
    assert int(ptr) == 1  # rows 3, 4, 0
    torch.testing.assert_close(bank[:, 0], torch.tensor([6.0, 2, 3, 4, 5]))
    torch.testing.assert_close(probs[:, 0], torch.tensor([2.0, 1, 1, 2, 2]))
    sm.push_unlabeled(bank, probs, ptr, torch.arange(7.0)[:, None], torch.ones(7, 2))  # larger than the bank
    assert int(ptr) == 3  # (1 + 7) % 5; the last 5 rows land in positions 3, 4, 0, 1, 2
    torch.testing.assert_close(bank[:, 0], torch.tensor([4.0, 5, 6, 2, 3]))


def test_train_step_fills_the_banks_and_state_dict_restores_them():
    torch.manual_seed(0)
    model, batch = sm.build(sm.TINY, INFO), tiny_batch()
    sm.train_step(model, batch, sm.TINY, 0)
    n_ulb = batch["x_ulb_w"].shape[:2].numel()
    assert int(model.unlabeled_ptr) == n_ulb % sm.TINY.bank_size
    assert (model.unlabeled_probs[:n_ulb].sum(dim=1) - 1).abs().max() < 1e-5
    assert not torch.equal(model.da, torch.full((10,), 0.1))
    torch.testing.assert_close(model.labeled_labels[batch["idx_lb"]], F.one_hot(batch["y_lb"], 10).float())
    fresh = sm.build(sm.TINY, INFO)
    fresh.load_state_dict(model.state_dict())
    for key in ("labeled_bank", "labeled_labels", "unlabeled_bank", "unlabeled_probs", "unlabeled_ptr", "da"):
        assert torch.equal(getattr(fresh, key), getattr(model, key)), key


def test_mask_turns_on_above_the_threshold():
    model, batch = sm.build(sm.TINY, INFO), tiny_batch()
    _, metrics = sm.train_step(model, batch, sm.TINY, 0)
    assert metrics["mask"] == 0  # a random teacher is not confident
    _, metrics = sm.train_step(model, batch, sm.Config(**{**vars(sm.TINY), "threshold": 0.0}), 1)
    assert metrics["mask"] == 1 and metrics["loss_nn"] > 0


# ---------------------------------------------------------------------------------------------- multi-crop


@pytest.mark.parametrize("num_local_crops", [0, 2])
def test_train_step_on_multicrop_batches(num_local_crops):
    torch.manual_seed(0)
    batch = tiny_batch("weak_strong_multicrop", num_local_crops)
    assert batch["x_ulb_local"].shape == (4, 2, num_local_crops, 1, 8, 8)
    model = sm.build(sm.TINY, INFO)
    loss, _ = sm.train_step(model, batch, sm.TINY, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.student.parameters())
    x_s, x_local, num_crops = sm.strong_crops(batch)
    assert x_s.shape == (8, 1, 16, 16) and num_crops == 1 + num_local_crops
    assert (x_local is None) == (num_local_crops == 0)
    if x_local is not None:  # crop-major: crop j of image (b, m) is row j * B * mu + b * mu + m
        assert x_local.shape == (8 * num_local_crops, 1, 8, 8)
        assert torch.equal(x_local[8 + 3], batch["x_ulb_local"][1, 1, 1])


def test_local_crops_are_averaged_with_the_full_size_crop():
    # With local crops equal to the full-size one, every loss term equals the single-crop value.
    torch.manual_seed(0)
    batch = tiny_batch()
    cfg = sm.Config(**{**vars(sm.TINY), "threshold": 0.0})  # every L_nn term on
    model = sm.build(cfg, INFO)
    sm.train_step(model, batch, cfg, 0)  # fill the banks, so L_ne is finite
    model.eval()  # BN statistics no longer depend on what else is in the forward's batch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, single = sm.train_step(model, batch, cfg, 1)
    model.load_state_dict(state)
    x_s = batch["x_ulb_s"]  # (B, mu, C, H, W): two local "crops" that are the full-size crop itself
    _, triple = sm.train_step(model, {**batch, "x_ulb_local": torch.stack([x_s, x_s], dim=2)}, cfg, 1)
    for key in ("loss_nn", "loss_ee", "loss_ne"):
        assert single[key] > 0
        torch.testing.assert_close(single[key], triple[key])


def test_eval_scores_the_student():
    model = sm.build(sm.TINY, INFO).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.student(x)[0])
        sums = sm.eval_step(model, {"x": x, "y": torch.tensor([0, 1, 2])}, sm.TINY)
    assert int(sums["n"]) == 3


def test_teacher_momentum_is_constant_above_0_996_and_cosine_ramped_to_1_at_or_below_it() -> None:
    """The official main.py: ema_m if ema_m > 0.996 else 1 - (1 - ema_m)(cos(pi curr_step / total) + 1) / 2."""
    assert sm.teacher_momentum(sm.Config(ema_m=0.999, total_steps=100), 50) == 0.999
    cfg = sm.Config(ema_m=0.99, total_steps=800)
    official = [1 - (1 - 0.99) * (math.cos(math.pi * t / 800) + 1) / 2 for t in (1, 200, 400, 800)]
    assert [sm.teacher_momentum(cfg, t) for t in (1, 200, 400, 800)] == pytest.approx(official)
    assert sm.teacher_momentum(cfg, 400) == pytest.approx(0.995) and sm.teacher_momentum(cfg, 800) == 1.0
    assert sm.teacher_momentum(sm.Config(ema_m=0.996, total_steps=10), 5) == pytest.approx(0.998)


def test_a_ramped_teacher_momentum_needs_the_runs_steps() -> None:
    with pytest.raises(ConfigError, match="config.total_steps"):
        sm.check(sm.Config(arch="small_cnn", ema_m=0.99))
    sm.check(sm.Config(arch="small_cnn", ema_m=0.99, total_steps=800))
