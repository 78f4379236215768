"""ReSSL: the relational and InfoNCE losses by hand, gradients, the queue, the EMA, the extended version's switches,
multi-crop, shuffle-BN indices and the online classifier (pure PyTorch, real digits batches)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import ressl
from trainers._common.contract import ConfigError

CFG = dataclasses.replace(ressl.TINY, momentum=0.9)


@pytest.fixture(scope="module")
def digits():
    """Digits at 16 px, "weak_contrastive" views with two local crops; (collate(n items), DataInfo)."""
    data = build_data(DataSpec(dataset="digits", image_size=16, num_local_crops=2), seed=0, views="weak_contrastive")

    def batch(n: int = 6, start: int = 0) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate([data.train[i] for i in range(start, start + n)])

    return batch, data.info


def make_model(info, cfg=CFG, seed: int = 0) -> ressl.ReSSL:
    torch.manual_seed(seed)
    return ressl.build(cfg, info)


# ---------------------------------------------------------------------------------------------- losses by hand


def test_relational_loss_by_hand():
    # Queue of 3 unit rows in 2-d; tau_t = 1/4, tau_s = 1/2.
    #   sample 1: k = (1, 0) -> k.Q = (1, 0, -1);  q = (0, 1)     -> q.Q = (0, 1, 0)
    #   sample 2: k = (0, 1) -> k.Q = (0, 1, 0);   q = (.6, .8)   -> q.Q = (.6, .8, -.6)
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0], [0.6, 0.8]])

    def softmax(xs):
        total = sum(math.exp(x) for x in xs)
        return [math.exp(x) / total for x in xs]

    def cross_entropy(p_t, p_s):
        return -sum(a * math.log(b) for a, b in zip(p_t, p_s))

    h1 = cross_entropy(softmax([4.0, 0.0, -4.0]), softmax([0.0, 2.0, 0.0]))
    h2 = cross_entropy(softmax([0.0, 4.0, 0.0]), softmax([1.2, 1.6, -1.2]))
    # Sample 1 explicitly: p_t = (e^4, 1, e^-4) / Z_t, log p_s = (0, 2, 0) - log(2 + e^2).
    z_t = math.exp(4) + 1 + math.exp(-4)
    h1_explicit = math.log(2 + math.exp(2)) - 2 * (1 / z_t)
    assert h1 == pytest.approx(h1_explicit)
    loss = ressl.relational_loss(q, k, queue, tau_s=0.5, tau_t=0.25)
    assert loss.item() == pytest.approx((h1 + h2) / 2, rel=1e-6)


def test_infonce_loss_by_hand():
    # Same vectors, t = 1/2: logits = (q.k, q.Q) / t; the positive is column 0.
    #   sample 1: q.k = 0,  q.Q = (0, 1, 0)      -> logits (0, 0, 2, 0)
    #   sample 2: q.k = .8, q.Q = (.6, .8, -.6)  -> logits (1.6, 1.2, 1.6, -1.2)
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    l1 = -0.0 + math.log(3 + math.exp(2))
    l2 = -1.6 + math.log(2 * math.exp(1.6) + math.exp(1.2) + math.exp(-1.2))
    loss = ressl.infonce_loss(q, k, queue, t=0.5)
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


@pytest.mark.parametrize("loss_fn", [lambda q, k, Q: ressl.relational_loss(q, k, Q, 0.1, 0.04),
                                     lambda q, k, Q: ressl.infonce_loss(q, k, Q, 0.2)])
def test_losses_do_not_backprop_into_the_teacher_key_or_the_queue(loss_fn):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(10, 8), dim=1).requires_grad_()
    loss_fn(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_online_classifier_loss_skips_unlabelled_images():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    y = torch.tensor([0, 0, -1])
    ce, acc = ressl.online_classifier_loss(logits, y)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert ce.item() == pytest.approx(expected) and acc.item() == pytest.approx(0.5)
    ce, acc = ressl.online_classifier_loss(logits, torch.full((3,), -1))
    assert ce.item() == 0.0 and acc.item() == 0.0


# ---------------------------------------------------------------------------------------------- queue


def test_enqueue_is_fifo_with_wrap_around():
    queue, ptr = torch.zeros(5, 2), torch.tensor(3)
    keys = torch.arange(1.0, 9.0).view(4, 2)  # rows (1,2), (3,4), (5,6), (7,8)
    ressl.enqueue(queue, ptr, keys)
    assert torch.equal(queue[[3, 4, 0, 1]], keys) and torch.equal(queue[2], torch.zeros(2))
    assert int(ptr) == 2
    # More keys than rows: as if written one by one from row 1 (key 0 -> row 1, 1 -> 2, 2 -> 0, 3 -> 1, 4 -> 2),
    # only the last K = 3 stay, and the pointer advances by all 5: (1 + 5) % 3 = 0.
    queue, ptr = torch.zeros(3, 1), torch.tensor(1)
    ressl.enqueue(queue, ptr, torch.arange(5.0).view(5, 1))
    assert torch.equal(queue.flatten(), torch.tensor([2.0, 3.0, 4.0])) and int(ptr) == 0


def test_the_step_uses_the_old_queue_and_enqueues_this_batch_teacher_keys(digits):
    batch_of, info = digits
    model = make_model(info)
    K = model.queue.size(0)
    for step, n in enumerate((6, 6, 6)):  # 18 keys into a queue of 16: the third step wraps around
        batch = batch_of(n, start=6 * step)
        old_queue, old_ptr = model.queue.clone(), int(model.queue_ptr)
        _, metrics = ressl.train_step(model, batch, CFG, step)
        assert torch.equal(model.queue, old_queue)  # the loss saw the queue without this batch
        with torch.no_grad():
            k = model.teacher(batch["x1"])
            _, q = model.student(batch["x2"])
        assert metrics["loss_ssl"].item() == pytest.approx(
            ressl.relational_loss(q, k, old_queue, CFG.tau_s, CFG.tau_t).item(), rel=1e-5)
        ressl.on_step_end(model, CFG, step + 1)
        rows = (old_ptr + torch.arange(n)) % K
        torch.testing.assert_close(model.queue[rows], k)
        others = torch.ones(K, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(model.queue[others], old_queue[others])
        assert int(model.queue_ptr) == (old_ptr + n) % K and model.pending_keys == []


# ---------------------------------------------------------------------------------------------- gradients, EMA


def test_only_the_student_gets_gradients(digits):
    batch_of, info = digits
    model = make_model(info)
    loss, metrics = ressl.train_step(model, batch_of(), CFG, 0)
    loss.backward()
    teacher = [*model.teacher_encoder.parameters(), *model.teacher_projector.parameters()]
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    student = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    assert model.encoder.encoder[0].weight.grad.abs().sum() > 0 and model.projector[0].weight.grad.abs().sum() > 0
    assert not model.queue.requires_grad and model.pending_keys[0].grad_fn is None
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())


def test_online_classifier_sends_no_gradient_into_the_encoder(digits):
    batch_of, info = digits
    batch = batch_of()
    grads = []
    for head_scale in (1.0, 3.0):  # two models that differ only in the classifier's weights
        model = make_model(info)
        with torch.no_grad():
            model.encoder.head.weight.mul_(head_scale)
        loss, _ = ressl.train_step(model, batch, CFG, 0)
        loss.backward()
        assert model.encoder.head.weight.grad.abs().sum() > 0
        grads.append([p.grad.clone() for p in [*model.encoder.encoder.parameters(), *model.projector.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_ema_update_follows_the_student(digits):
    batch_of, info = digits
    model = make_model(info)
    with torch.no_grad():
        for p in [*model.encoder.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    ressl.train_step(model, batch_of(), CFG, 0)  # updates the student's BN statistics
    pairs = [(model.teacher_encoder, model.encoder.encoder), (model.teacher_projector, model.projector)]
    before = [[t.clone() for t in teacher.parameters()] for teacher, _ in pairs]
    ressl.on_step_end(model, CFG, 1)
    for (teacher, student), old in zip(pairs, before):
        for t, s, t0 in zip(teacher.parameters(), student.parameters(), old):
            torch.testing.assert_close(t, CFG.momentum * t0 + (1 - CFG.momentum) * s)
        for t, s in zip(teacher.buffers(), student.buffers()):
            assert torch.equal(t, s)


# ---------------------------------------------------------------------------------------------- options


def test_predictor_is_on_the_student_only_when_configured(digits):
    batch_of, info = digits
    assert make_model(info).predictor is None
    cfg = dataclasses.replace(CFG, predictor=True, predictor_hidden=32)
    model = make_model(info, cfg)
    layers = list(model.predictor)
    assert isinstance(layers[1], torch.nn.BatchNorm1d) and layers[0].in_features == layers[-1].out_features == cfg.dim
    assert layers[0].out_features == 32
    teacher_shapes = {p.shape for p in model.teacher_projector.parameters()}
    assert (32, cfg.dim) not in teacher_shapes
    batch = batch_of()
    loss, metrics = ressl.train_step(model, batch, cfg, 0)
    with torch.no_grad():
        q = F.normalize(model.predictor(model.projector(model.encoder.features(batch["x2"]))), dim=1)
        k = model.teacher(batch["x1"])
    expected = ressl.relational_loss(q, k, model.queue, cfg.tau_s, cfg.tau_t)
    assert metrics["loss_ssl"].item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_infonce_warm_up_then_relational(digits):
    batch_of, info = digits
    cfg = dataclasses.replace(CFG, infonce_warmup_steps=3)
    model = make_model(info, cfg)
    batch = batch_of()
    with torch.no_grad():
        k = model.teacher(batch["x1"])
        _, q = model.student(batch["x2"])
    infonce = ressl.infonce_loss(q, k, model.queue, cfg.infonce_t).item()
    relational = ressl.relational_loss(q, k, model.queue, cfg.tau_s, cfg.tau_t).item()
    assert abs(infonce - relational) > 1e-2
    for step, expected in ((0, infonce), (2, infonce), (3, relational), (10, relational)):
        _, metrics = ressl.train_step(model, batch, cfg, step)
        assert metrics["loss_ssl"].item() == pytest.approx(expected, rel=1e-5), step


@pytest.mark.parametrize("multi_crop", [True, False])
def test_multi_crop_averages_the_loss_over_the_student_crops(digits, multi_crop):
    batch_of, info = digits
    cfg = dataclasses.replace(CFG, multi_crop=multi_crop)
    model = make_model(info, cfg).eval()  # BN on running statistics: each crop's embedding is per-image
    batch = batch_of()
    assert batch["x_local"].shape[:2] == (6, 2)
    _, metrics = ressl.train_step(model, batch, cfg, 0)
    with torch.no_grad():
        k = model.teacher(batch["x1"])
        crops = [batch["x2"], batch["x_local"][:, 0], batch["x_local"][:, 1]] if multi_crop else [batch["x2"]]
        losses = [ressl.relational_loss(model.student(x)[1], k, model.queue, cfg.tau_s, cfg.tau_t) for x in crops]
    assert metrics["loss_ssl"].item() == pytest.approx(sum(losses).item() / len(losses), rel=1e-5)


def test_shuffle_bn_indices_give_every_rank_its_own_keys(digits):
    # Two simulated ranks of 3 images each; an eval-mode teacher encodes each image alone, so shuffling, encoding
    # per rank, gathering and un-shuffling must give every rank exactly the keys of its own images.
    batch_of, info = digits
    model = make_model(info).eval()
    x_all = batch_of()["x1"]  # (world * B, C, H, W), in rank order
    world = 2
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(len(x_all)))
    with torch.no_grad():
        expected = model.teacher(x_all).view(world, -1, CFG.dim)
        gathered = torch.cat([model.teacher(x_all[ressl.rank_slices(perm, world, r)[0]]) for r in range(world)])
    for rank in range(world):
        _, own = ressl.rank_slices(perm, world, rank)
        torch.testing.assert_close(gathered[own], expected[rank])


def test_check_rejects_bad_values():
    ressl.check(ressl.TINY)
    with pytest.raises(ConfigError, match="queue_size"):
        ressl.check(dataclasses.replace(ressl.TINY, queue_size=0))
    with pytest.raises(ConfigError, match="tau_t"):
        ressl.check(dataclasses.replace(ressl.TINY, tau_t=0.0))


# ---------------------------------------------------------------------------------------------- training


def test_tiny_trains_with_finite_decreasing_loss(digits):
    batch_of, info = digits
    model = make_model(info, ressl.TINY)
    batch = batch_of(8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(12):
        loss, _ = ressl.train_step(model, batch, ressl.TINY, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ressl.on_step_end(model, ressl.TINY, step + 1)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    model.eval()
    test = batch_of(8, start=8)
    with torch.no_grad():
        sums = ressl.eval_step(model, {"x": test["x2"], "y": test["y"]}, ressl.TINY)
    assert int(sums["n"]) == 8 and set(sums) >= {"acc", "loss", "n", "acc5"}
