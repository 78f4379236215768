"""CoNe: L_sup, L_dc and the masked CE by hand, the drop rule, the unfilled queue, the queue's FIFO order, the EMA
momentum ramp, the CE-only warm-up, the classifier on the projection, a TINY step, and the experiment files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trainers
from orchestrator import spec as experiment_spec
from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import cone
from trainers._common.contract import ConfigError
from trainers._common.ema import cosine_momentum

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments" / "cone").glob("*.yaml"))
CFG = cone.TINY


@pytest.fixture(scope="module")
def digits():
    """Digits at 16 px, "plain" views; (collate(n items from start), DataInfo)."""
    data = build_data(DataSpec(dataset="digits", image_size=16), seed=0, views="plain")

    def batch(n: int = 8, start: int = 0) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate([data.train[i] for i in range(start, start + n)])

    return batch, data.info


def make_model(info, cfg=CFG, seed: int = 0) -> cone.CoNe:
    torch.manual_seed(seed)
    return cone.build(cfg, info)


def unit(*rows: tuple[float, float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows), dim=1)


# ---------------------------------------------------------------------------------------------- losses by hand


def test_neighbour_vote_and_sup_loss_by_hand():
    # Queue of 4 unit keys in 2-d, labels 0, 1, 0, 1. q = (1, 0) has similarities 1, 0.6, 0, -1 to them.
    # Top-2: rows 0 (label 0, sim 1) and 1 (label 1, sim 0.6); at tau 0.2 the logits are 5 and 3:
    # w = (e^5, e^3) / (e^5 + e^3) -> s for y = 0 is 1 / (1 + e^-2) = 0.880797, for y = 1 it is 0.119203.
    queue = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = cone.neighbour_vote(q, torch.tensor([0, 1]), queue, labels, knn_k=2, tau_sup=0.2)
    torch.testing.assert_close(s, torch.tensor([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2  # -mean log s
    assert cone.sup_loss(s).item() == pytest.approx(expected, rel=1e-6)


def test_sup_loss_drops_rows_without_neighbours_of_their_class_but_divides_by_the_full_batch():
    s = torch.tensor([0.5, 0.0, 1e-9, 0.25], requires_grad=True)  # rows 1 and 2 are dropped (s <= 1e-8)
    loss = cone.sup_loss(s)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 4, rel=1e-6)  # / 4, not / 2
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([-1 / (4 * 0.5), 0.0, 0.0, -1 / (4 * 0.25)]))


def test_dc_target_and_kl_by_hand():
    # Key k = (1, 0) against queue keys (1, 0), (0, 1) at tau_dc 0.5: logits 2, 0 -> weights (e^2, 1) / (e^2 + 1).
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    d = cone.dc_target(torch.tensor([[1.0, 0.0]]), queue, torch.tensor([0, 1]), probs, tau_dc=0.5)
    a = math.exp(2) / (math.exp(2) + 1)
    d_hand = [a * 0.9 + (1 - a) * 0.2, a * 0.1 + (1 - a) * 0.8]
    torch.testing.assert_close(d, torch.tensor([d_hand]))
    # KL(d || softmax(z)) with z = (0, log 3): softmax = (1/4, 3/4).
    z = torch.tensor([[0.0, math.log(3.0)]])
    kl = sum(p * math.log(p / r) for p, r in zip(d_hand, (0.25, 0.75)))
    assert cone.dc_loss(z, d, torch.tensor([True])).item() == pytest.approx(kl, rel=1e-5)
    assert cone.dc_loss(z, d, torch.tensor([True])).item() == pytest.approx(
        F.kl_div(F.log_softmax(z, dim=1), d, reduction="sum").item(), rel=1e-6)  # the official F.kl_div


def test_row_mask_leaves_rows_out_of_ce_and_dc_but_divides_by_the_full_batch():
    z = torch.tensor([[0.0, 0.0], [30.0, 0.0]])  # row 1: softmax min = e^-30 < 1e-8 -> out of R
    rows = cone.row_mask(z)
    assert rows.tolist() == [True, False]
    y = torch.tensor([0, 0])
    assert cone.ce_loss(z, y, 0.0, rows).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cone.dc_loss(z, d, rows).item() == pytest.approx(math.log(2) / 2, rel=1e-6)  # KL((1,0) || (1/2,1/2)) / 2


def test_label_smoothing_is_the_official_one_hot():
    targets = cone.smoothed_targets(torch.tensor([2]), 5, 0.2)  # 0.8 on class 2, 0.2 / 4 on each other
    torch.testing.assert_close(targets, torch.tensor([[0.05, 0.05, 0.8, 0.05, 0.05]]))


def test_unfilled_queue_rows_are_never_neighbours_nor_in_the_target():
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # rows 2, 3 unfilled
    labels = torch.tensor([1, 0, -1, -1])
    probs = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    q = unit((1.0, 1.0))  # equally near both filled rows; the unfilled rows have similarity 0
    s = cone.neighbour_vote(q, torch.tensor([0]), queue, labels, knn_k=4, tau_sup=0.1)
    assert s.item() == pytest.approx(0.5, abs=1e-6)  # the two filled rows only, one of class 0
    d = cone.dc_target(q, queue, labels, probs, tau_dc=0.07)
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.5]]))
    # An empty queue gives s = 0 and d = 0: L_sup = L_dc = 0, finite, with no gradient.
    empty = torch.full((4,), -1)
    q = q.clone().requires_grad_(True)
    s = cone.neighbour_vote(q, torch.tensor([0]), torch.zeros(4, 2), empty, knn_k=2, tau_sup=0.1)
    loss = cone.sup_loss(s) + cone.dc_loss(q @ torch.eye(2), cone.dc_target(q, torch.zeros(4, 2), empty,
                                                                          torch.zeros(4, 2), 0.07), torch.tensor([True]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


def test_no_gradient_reaches_the_queue_or_the_key():
    queue = F.normalize(torch.randn(6, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    q = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    labels, probs = torch.tensor([0, 1, 2, 0, 1, 2]), torch.softmax(torch.randn(6, 3), dim=1)
    s = cone.neighbour_vote(q, torch.tensor([0, 1, 2]), queue, labels, 3, 0.1)
    d = cone.dc_target(k, queue, labels, probs, 0.07)
    assert not d.requires_grad
    cone.sup_loss(s).backward()
    assert queue.grad is None and q.grad is not None


# ---------------------------------------------------------------------------------------------- queue, EMA, schedule


def test_enqueue_is_fifo_over_all_three_buffers_with_wrap_around():
    keys, labels, probs = torch.zeros(5, 2), torch.full((5,), -1), torch.zeros(5, 3)
    ptr = torch.tensor(3)
    new_keys = torch.arange(1.0, 9.0).view(4, 2)
    new_labels, new_probs = torch.tensor([7, 8, 9, 6]), torch.arange(12.0).view(4, 3)
    cone.enqueue((keys, labels, probs), ptr, (new_keys, new_labels, new_probs))
    rows = [3, 4, 0, 1]
    assert torch.equal(keys[rows], new_keys) and torch.equal(labels[rows], new_labels)
    assert torch.equal(probs[rows], new_probs) and int(ptr) == 2
    assert labels[2].item() == -1 and torch.equal(keys[2], torch.zeros(2))  # untouched: still unfilled
    # More entries than rows: the last K = 3 stay where writing one by one from row 1 leaves them.
    keys, labels, ptr = torch.zeros(3, 1), torch.full((3,), -1), torch.tensor(1)
    cone.enqueue((keys, labels), ptr, (torch.arange(5.0).view(5, 1), torch.arange(5)))
    assert keys.flatten().tolist() == [2.0, 3.0, 4.0] and labels.tolist() == [2, 3, 4] and int(ptr) == 0


def test_momentum_is_cosine_ramped_from_base_to_one():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(250, 100, 0.996) == pytest.approx(1.0)


def test_a_step_uses_the_old_queue_then_enqueues_the_keys_and_moves_the_key_encoder(digits):
    batch_of, info = digits
    cfg = dataclasses.replace(CFG, base_momentum=0.9, total_steps=10)
    model = make_model(info, cfg)
    for step in range(3):  # 8 + 8 + 8 entries into a queue of 16: the third step wraps around
        batch = batch_of(8, start=8 * step)
        old = (model.queue.clone(), model.queue_label.clone(), model.queue_prob.clone(), int(model.queue_ptr))
        k_params = [p.clone() for p in model.encoder_k.parameters()]
        _, metrics = cone.train_step(model, batch, cfg, step)
        assert torch.equal(model.queue, old[0]) and torch.equal(model.queue_label, old[1])  # loss saw the old queue
        assert metrics["queue_fill"].item() == pytest.approx(min(8 * step, 16) / 16)
        with torch.no_grad():
            k, z_k = model.encoder_k.embed(batch["x"])
        cone.on_step_end(model, cfg, step + 1)
        rows = (old[3] + torch.arange(8)) % 16
        torch.testing.assert_close(model.queue[rows], k)
        torch.testing.assert_close(model.queue_prob[rows], torch.softmax(z_k, dim=1))
        assert torch.equal(model.queue_label[rows], batch["y"]) and int(model.queue_ptr) == (old[3] + 8) % 16
        m = cosine_momentum(step + 1, cfg.total_steps, cfg.base_momentum)
        for before, p_k, p_q in zip(k_params, model.encoder_k.parameters(), model.encoder_q.parameters()):
            torch.testing.assert_close(p_k, m * before + (1 - m) * p_q)
        assert model.pending == []


def test_ce_only_before_ce_only_steps_then_the_cone_losses(digits):
    batch_of, info = digits
    cfg = dataclasses.replace(CFG, ce_only_steps=2)
    model = make_model(info, cfg)
    cone.train_step(model, batch_of(8), cfg, 0)
    cone.on_step_end(model, cfg, 1)  # the queue now holds one batch
    batch = batch_of(8, start=8)
    for step, expect_cone in ((1, False), (2, True)):
        loss, metrics = cone.train_step(model, batch, cfg, step)
        model.pending.clear()
        with torch.no_grad():
            _, z = model.encoder_q.embed(batch["x"])
        plain_ce = F.cross_entropy(z, batch["y"])
        assert metrics["cone"].item() == float(expect_cone)
        assert metrics["loss_sup"].item() > 0 and metrics["loss_dc"].item() > 0  # reported as diagnostics
        if expect_cone:
            total = metrics["loss_ce"] + cfg.alpha_sup * metrics["loss_sup"] + cfg.alpha_dc * metrics["loss_dc"]
            assert loss.item() == pytest.approx(total.item(), rel=1e-5)
            assert loss.item() > plain_ce.item() + 1e-3
        else:
            assert loss.item() == pytest.approx(plain_ce.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- model


def test_the_classifier_sits_on_the_projection(digits):
    batch_of, info = digits
    model = make_model(info).eval()
    encoder = model.encoder_q
    assert encoder.fc.in_features == CFG.dim and encoder.projection[-1].out_features == CFG.dim
    x = batch_of(4)["x"]
    with torch.no_grad():
        e = encoder.projection(encoder.backbone(x))
        torch.testing.assert_close(model(x), encoder.fc(e))
        q, z = encoder.embed(x)
    torch.testing.assert_close(q, F.normalize(e, dim=1))
    torch.testing.assert_close(z, encoder.fc(e))


def test_the_key_encoder_starts_as_a_frozen_copy_of_the_student(digits):
    _, info = digits
    model = make_model(info)
    for p_k, p_q in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
        assert torch.equal(p_k, p_q) and not p_k.requires_grad and p_q.requires_grad


def test_param_groups_official_decay_everything_or_the_default_split(digits):
    _, info = digits
    model = make_model(info)
    trainable = [p for p in model.parameters() if p.requires_grad]
    (group,) = cone.param_groups(model, CFG)
    assert len(group["params"]) == len(trainable) and "weight_decay" not in group
    decay, no_decay = cone.param_groups(model, dataclasses.replace(CFG, decay_norms_and_biases=False))
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


def test_check_rejects_bad_values():
    cone.check(cone.TINY)
    with pytest.raises(ConfigError, match="knn_k"):
        cone.check(dataclasses.replace(cone.TINY, knn_k=17))
    with pytest.raises(ConfigError, match="tau_dc"):
        cone.check(dataclasses.replace(cone.TINY, tau_dc=0.0))
    with pytest.raises(ConfigError, match="arch"):
        cone.check(dataclasses.replace(cone.TINY, arch="no_such_net"))


# ---------------------------------------------------------------------------------------------- training, files


def test_tiny_step_with_the_cone_losses_is_finite_with_gradients(digits):
    batch_of, info = digits
    model = make_model(info)
    cone.train_step(model, batch_of(8), CFG, 0)
    cone.on_step_end(model, CFG, 1)
    loss, metrics = cone.train_step(model, batch_of(8, start=8), CFG, 1)  # step 1 >= TINY's ce_only_steps
    assert metrics["cone"].item() == 1.0 and torch.isfinite(loss)
    loss.backward()
    student = list(model.encoder_q.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    assert all(p.grad is None for p in model.encoder_k.parameters())
    model.eval()
    test = batch_of(6, start=16)
    with torch.no_grad():
        sums = cone.eval_step(model, test, CFG)
    assert int(sums["n"]) == 6 and set(sums) >= {"acc", "loss", "n", "acc5"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(trainers.TRAINERS, "cone", "trainers.cone")
    loaded = experiment_spec.load(path)
    assert loaded.method == "cone" and loaded.views == "plain"
    cfg = loaded.method_config()
    assert cfg.total_steps == loaded.optim.steps  # the momentum ramp spans the run
