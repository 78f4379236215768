"""SimMatch: unfolding and aggregation on a hand case, label propagation, distribution alignment, the labeled bank."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import simmatch
from trainers._common.contract import DataInfo

INFO = DataInfo(num_classes=3, image_size=16, in_channels=1, num_train=50, num_labeled=6)


def digits_batch(batch_size: int = 8) -> tuple[dict[str, torch.Tensor], DataInfo]:
    data = build_data(DataSpec(dataset="digits", image_size=16, labeled_per_class=2, unlabeled_ratio=2), seed=0,
                      views="weak_strong")
    return torch.utils.data.default_collate([data.train[i] for i in range(batch_size)]), data.info


# ---------------------------------------------------------------------------------------------- unfolding / aggregation

# Row 0: q_w = [0.4, 0.3, 0.2, 0.1] over a bank labeled [0, 1, 0, 2]; p_w = [0.5, 0.3, 0.2].
#   unfolding: q_w * p_w[y_j] = [0.4*0.5, 0.3*0.3, 0.2*0.5, 0.1*0.2] = [0.20, 0.09, 0.10, 0.02], sum 0.41
#              q_hat = [0.20, 0.09, 0.10, 0.02] / 0.41
#   aggregation: a = [0.4 + 0.2, 0.3, 0.1] = [0.6, 0.3, 0.1]
#   interpolation (alpha 0.9): 0.9 * [0.5, 0.3, 0.2] + 0.1 * [0.6, 0.3, 0.1] = [0.51, 0.30, 0.19]
#   multiplication: [0.5*0.6, 0.3*0.3, 0.2*0.1] / 0.41 = [0.30, 0.09, 0.02] / 0.41
# Row 1: uniform q_w and p_w: q_hat stays uniform; a = [0.5, 0.25, 0.25].
Q_W = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
P_W = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
BANK_LABELS = torch.tensor([0, 1, 0, 2])


def test_unfolding_and_aggregation_on_a_hand_case() -> None:
    q_hat, a = simmatch.unfold_and_aggregate(Q_W, P_W, BANK_LABELS, num_classes=3)
    torch.testing.assert_close(q_hat, torch.tensor([[0.20, 0.09, 0.10, 0.02], [0.25, 0.25, 0.25, 0.25]])
                               / torch.tensor([[0.41], [1.0]]))
    torch.testing.assert_close(a, torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25]]))


def test_label_propagation_interpolates_or_multiplies_on_a_hand_case() -> None:
    _, a = simmatch.unfold_and_aggregate(Q_W, P_W, BANK_LABELS, num_classes=3)
    interpolated = simmatch.propagate_labels(P_W, a, alpha=0.9, mode="interpolate")
    multiplied = simmatch.propagate_labels(P_W, a, alpha=0.9, mode="multiply")
    torch.testing.assert_close(interpolated[0], torch.tensor([0.51, 0.30, 0.19]))
    torch.testing.assert_close(multiplied[0], torch.tensor([0.30, 0.09, 0.02]) / 0.41)


def test_both_propagations_sum_to_one_and_differ() -> None:
    torch.manual_seed(0)
    q_w = torch.softmax(torch.randn(5, 12), dim=1)
    p_w = torch.softmax(torch.randn(5, 4), dim=1)
    _, a = simmatch.unfold_and_aggregate(q_w, p_w, torch.randint(0, 4, (12,)), num_classes=4)
    interpolated = simmatch.propagate_labels(p_w, a, alpha=0.9, mode="interpolate")
    multiplied = simmatch.propagate_labels(p_w, a, alpha=0.9, mode="multiply")
    torch.testing.assert_close(interpolated.sum(1), torch.ones(5))
    torch.testing.assert_close(multiplied.sum(1), torch.ones(5))
    assert not torch.allclose(interpolated, multiplied, atol=1e-3)


# ---------------------------------------------------------------------------------------------- distribution alignment


def test_distribution_alignment_divides_by_the_fifo_mean_and_renormalises() -> None:
    """Filled rows [0.5, 0.25, 0.25] and [0.3, 0.35, 0.35] average to m = [0.4, 0.3, 0.3]; two empty (zero) rows
    halve the mean, a constant the renormalisation removes. p = m becomes uniform; [0.2, 0.6, 0.2] / m =
    [0.5, 2, 2/3], sum 19/6."""
    queue = torch.tensor([[0.5, 0.25, 0.25], [0.3, 0.35, 0.35], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p_w = torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.6, 0.2]])
    aligned = simmatch.distribution_alignment(p_w, queue)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5 * 6 / 19, 2 * 6 / 19, (2 / 3) * 6 / 19]])
    torch.testing.assert_close(aligned, expected)
    torch.testing.assert_close(aligned, simmatch.distribution_alignment(p_w, queue[:2]))


def test_the_da_fifo_keeps_the_last_da_len_batch_means() -> None:
    model = simmatch.build(dataclasses.replace(simmatch.TINY, da_len=3), INFO)
    means = []
    for k in range(4):
        p_w = torch.softmax(torch.randn(5, 3), dim=1)
        simmatch.push_da_queue(model, p_w)
        means.append(p_w.mean(0))
    assert model.da_queue.shape == (3, 3) and int(model.da_ptr) == 1  # 4 pushes into 3 slots: wrapped once
    torch.testing.assert_close(model.da_queue, torch.stack([means[3], means[1], means[2]]))


# ---------------------------------------------------------------------------------------------- the labeled bank


def test_bank_update_overwrites_rows_by_index_in_the_ema_teacher_variant() -> None:
    model = simmatch.build(simmatch.TINY, INFO)
    before = model.bank.clone()
    z = F.normalize(torch.randn(2, simmatch.TINY.proj_dim), dim=1)
    simmatch.update_bank(model, z, torch.tensor([2, 1]), torch.tensor([4, 0]), momentum=0.0)
    torch.testing.assert_close(model.bank[[4, 0]], z)
    assert model.bank_labels.tolist() == [1, 0, 0, 0, 2, 0]
    torch.testing.assert_close(model.bank[[1, 2, 3, 5]], before[[1, 2, 3, 5]])


def test_bank_update_is_momentum_normalised_in_the_cifar_variant() -> None:
    model = simmatch.build(simmatch.TINY, INFO)
    old = model.bank[3].clone()
    z = F.normalize(torch.randn(1, simmatch.TINY.proj_dim), dim=1)
    simmatch.update_bank(model, z, torch.tensor([2]), torch.tensor([3]), momentum=0.7)
    torch.testing.assert_close(model.bank[3], F.normalize(0.7 * old + 0.3 * z[0], dim=0))
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(6))


def test_usbs_literal_bank_rule_normalises_each_feature_across_the_batch() -> None:
    """USB: mem_bank (D, L); mem_bank[:, index] = F.normalize(m * mem_bank[:, index] + (1 - m) * k.T), whose default
    dim=1 runs over the B columns. Written here in that layout, against update_bank(norm="usb")."""
    model = simmatch.build(simmatch.TINY, INFO)
    d, index = simmatch.TINY.proj_dim, torch.tensor([4, 1, 3, 0])
    k = F.normalize(torch.randn(4, d), dim=1)  # (B, D) embeddings
    mem_bank = model.bank.T.clone()  # (D, L)
    mem_bank[:, index] = F.normalize(0.7 * mem_bank[:, index] + 0.3 * k.T)
    simmatch.update_bank(model, k, torch.tensor([0, 1, 2, 3]), index, momentum=0.7, norm="usb")
    torch.testing.assert_close(model.bank, mem_bank.T)
    torch.testing.assert_close(model.bank[index].pow(2).sum(), torch.tensor(float(d)))  # each feature unit over B
    assert simmatch.Config().bank_norm == "embedding"


def test_a_repeated_index_takes_its_last_occurrence() -> None:
    assert simmatch.last_occurrence(torch.tensor([1, 3, 1, 0, 3]), size=4).tolist() == [False, False, True, True, True]
    model = simmatch.build(simmatch.TINY, INFO)
    z = F.normalize(torch.randn(2, simmatch.TINY.proj_dim), dim=1)
    simmatch.update_bank(model, z, torch.tensor([1, 2]), torch.tensor([5, 5]), momentum=0.0)
    torch.testing.assert_close(model.bank[5], z[1])
    assert int(model.bank_labels[5]) == 2


def test_the_step_writes_the_teachers_labeled_embeddings_into_the_bank() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = dataclasses.replace(simmatch.TINY, ema_teacher=True)
    model = simmatch.build(cfg, info)
    simmatch.train_step(model, batch, cfg, step=0)
    x_lb, x_w = batch["x_lb"], batch["x_ulb_w"].flatten(0, 1)
    with torch.no_grad():
        _, z_t = model.ema.logits_and_embeddings(torch.cat([x_lb, x_w]))
    torch.testing.assert_close(model.bank[batch["idx_lb"]], z_t[: len(x_lb)])
    assert torch.equal(model.bank_labels[batch["idx_lb"]], batch["y_lb"])


def test_the_step_moves_the_bank_towards_the_students_embeddings_without_a_teacher() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = simmatch.TINY
    model = simmatch.build(cfg, info)
    old = model.bank[batch["idx_lb"]].clone()
    x = torch.cat([batch["x_lb"], batch["x_ulb_w"].flatten(0, 1), batch["x_ulb_s"].flatten(0, 1)])
    with torch.no_grad():
        _, z = model.student.logits_and_embeddings(x)
    simmatch.train_step(model, batch, cfg, step=0)
    z_lb = z[: len(batch["x_lb"])]
    torch.testing.assert_close(model.bank[batch["idx_lb"]], F.normalize(0.7 * old + 0.3 * z_lb, dim=1))


def test_bank_and_fifo_are_checkpointed_and_restored() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    model = simmatch.build(simmatch.TINY, info)
    for step in range(2):
        simmatch.train_step(model, batch, simmatch.TINY, step)
    state = model.state_dict()
    for key in ("bank", "bank_labels", "da_queue", "da_ptr"):
        assert key in state
    torch.manual_seed(1)
    fresh = simmatch.build(simmatch.TINY, info)
    assert not torch.equal(fresh.bank, model.bank)
    fresh.load_state_dict(state)
    for key in ("bank", "bank_labels", "da_queue", "da_ptr"):
        assert torch.equal(getattr(fresh, key), getattr(model, key)), key


# ---------------------------------------------------------------------------------------------- warm-up and variants


def test_warm_up_disables_l_in_and_label_propagation() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = dataclasses.replace(simmatch.TINY, warmup_steps=5, lambda_in=3.0)
    model = simmatch.build(cfg, info)
    loss, metrics = simmatch.train_step(model, batch, cfg, step=4)
    assert float(metrics["loss_in"]) == 0.0
    torch.testing.assert_close(loss.detach(), metrics["loss_x"] + cfg.lambda_u * metrics["loss_u"])
    loss.backward()
    projector_grads = [p.grad for p in model.student.projector.parameters()]
    assert all(g is not None and not g.any() for g in projector_grads)  # in the graph (DDP), with zero gradient

    out = simmatch._forward(model, batch, cfg)
    p_hat, _ = simmatch._pseudo_labels(model, out, model.bank.clone(), cfg, warm=True)
    p_w = simmatch.distribution_alignment(torch.softmax(out["logits_w_t"], dim=1), model.da_queue)
    torch.testing.assert_close(p_hat, p_w)
    _, metrics = simmatch.train_step(model, batch, cfg, step=5)
    assert float(metrics["loss_in"]) > 0.0


def test_the_ema_teacher_variant_trains_the_student_only() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = dataclasses.replace(simmatch.TINY, ema_teacher=True)
    model = simmatch.build(cfg, info)
    loss, metrics = simmatch.train_step(model, batch, cfg, step=0)
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["loss_in"]) > 0.0
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is None for p in model.ema.parameters())


def test_evaluation_uses_the_ema_network_or_the_student() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    model = simmatch.build(simmatch.TINY, info).eval()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.5)
    eval_batch = {"x": batch["x_lb"], "y": batch["y_lb"]}
    with torch.no_grad():
        ema = simmatch.eval_step(model, eval_batch, simmatch.TINY)
        student = simmatch.eval_step(model, eval_batch, dataclasses.replace(simmatch.TINY, eval_ema=False))
        ema_logits, student_logits = model.ema(batch["x_lb"]), model.student(batch["x_lb"])
    torch.testing.assert_close(ema["loss"], F.cross_entropy(ema_logits, batch["y_lb"], reduction="sum"))
    torch.testing.assert_close(student["loss"], F.cross_entropy(student_logits, batch["y_lb"], reduction="sum"))
