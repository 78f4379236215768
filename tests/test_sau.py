"""SAU: mixup/cutmix soft labels, SupCon with prototypes, label correction and its strategies (against the official
formulation), the prototype bank, many/medium/few evaluation, one tiny step."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from orchestrator.spec import method_config
from trainers import sau
from trainers._common.backbones import Classifier
from trainers._common.contract import ConfigError, DataInfo
from trainers._common.long_tail import shot_groups, shot_summary

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments" / "sau").glob("cifar*.yaml"))


def tiny_info(num_train: int = 12, class_counts: tuple[int, ...] = (8, 3, 1)) -> DataInfo:
    return DataInfo(num_classes=3, image_size=16, in_channels=1, num_train=num_train, num_labeled=num_train,
                    class_counts=class_counts)


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Six images of a pool of 12 ("sau" views): rows 0-2 real, rows 3-5 synthetic."""
    g = torch.Generator().manual_seed(seed)
    views = {f"x{v}": torch.randn(6, 1, 16, 16, generator=g) for v in (1, 2, 3)}
    return {**views, "y": torch.tensor([0, 1, 2, 0, 1, 2]), "is_syn": torch.tensor([False] * 3 + [True] * 3),
            "idx": torch.tensor([4, 0, 9, 2, 7, 11])}


# ---------------------------------------------------------------------------------------------- synthetic-unaware


def test_soft_cross_entropy_and_mix_targets_by_hand():
    # logits (log 3, 0): softmax (3/4, 1/4). mixup lam 0.25 of class 0 with a class-1 partner: target (1/4, 3/4),
    # CE = -(1/4 log 3/4 + 3/4 log 1/4) = 1.111657; a class-0 partner: target (1, 0), CE = -log 3/4 = 0.287682.
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    target = sau.mix_targets(torch.tensor([0, 0]), torch.tensor([1, 0]), 0.25, num_classes=2)
    torch.testing.assert_close(target, torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    expected = (-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) - math.log(0.75)) / 2
    assert sau.soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    x, partner = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(sau.mixup(x, partner, 0.25), torch.full((1, 1, 2, 2), 0.75))


def test_mix_loss_is_twice_the_plain_cross_entropy_when_every_partner_is_the_same():
    """Identical images and labels: mixup and cutmix change nothing, so L_mix = CE(mixup) + CE(cutmix) = 2 CE."""
    torch.manual_seed(0)
    model = sau.build(sau.TINY, tiny_info()).eval()
    x1 = torch.randn(1, 1, 16, 16).expand(5, -1, -1, -1)
    y = torch.full((5,), 2)
    loss = sau.mix_loss(model, x1, y, sau.TINY)
    torch.testing.assert_close(loss, 2 * F.cross_entropy(model.encoder(x1), y))


def test_cutmix_lambda_is_the_share_of_own_pixels():
    x, partner = torch.zeros(2, 3, 8, 10), torch.ones(2, 3, 8, 10)
    torch.manual_seed(0)
    for _ in range(50):
        box = sau.cutmix_box(8, 10, torch.rand(()).item(), tuple(torch.rand(2).tolist()))
        mixed, lam = sau.cutmix(x, partner, box)
        assert mixed.mean().item() == pytest.approx(1 - lam, abs=1e-6)
        assert torch.equal(x, torch.zeros_like(x))  # the input is not pasted into
    # drawn lam 0.75 at the corner (0, 0) of an 8 x 8 image: a 4 x 4 box clipped to 2 x 2, so lam = 1 - 4/64, not 0.75
    box = sau.cutmix_box(8, 8, 0.75, (0.0, 0.0))
    assert box == (0, 2, 0, 2)
    assert sau.cutmix(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), box)[1] == pytest.approx(60 / 64)


# ---------------------------------------------------------------------------------------------- SupCon by hand


def two_rows() -> torch.Tensor:
    # row 0: v2 u0 = (1, 0), v3 u0' = (0.6, 0.8); row 1: v2 u1 = (0, 1), v3 u1' = (0, 1). Views in the loss'
    # order u0, u1, u0', u1'; dots u0.u1 = 0, u0.u0' = .6, u0.u1' = 0, u1.u0' = .8, u1.u1' = 1, u0'.u1' = .8.
    return torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, 1.0]]])


def test_sup_con_by_hand():
    # tau 1, labels differ: each view's only positive is its other view.
    # u0: others (0, .6, 0), positive u0' -> log(2 + e^.6) - .6                      = 0.740803
    # u1: others (0, .8, 1), positive u1' -> log(1 + e^.8 + e) - 1                   = 0.782270
    # u0': others (.6, .8, .8), positive u0 -> log(e^.6 + 2 e^.8) - .6               = 1.236247
    # u1': others (0, 1, .8), positive u1 -> log(1 + e + e^.8) - 1                   = 0.782270
    e = math.exp
    per_view = [math.log(2 + e(0.6)) - 0.6, math.log(1 + e(0.8) + e(1)) - 1, math.log(e(0.6) + 2 * e(0.8)) - 0.6,
                math.log(1 + e(1) + e(0.8)) - 1]
    z, all_anchors = two_rows(), torch.tensor([True, True])
    loss = sau.sup_con(z, torch.tensor([0, 1]), all_anchors, tau=1.0)
    assert loss.item() == pytest.approx(sum(per_view) / 4, rel=1e-6)  # 0.885398
    # row 1 not an anchor (neg_only): the mean over u0 and u0' only
    loss = sau.sup_con(z, torch.tensor([0, 1]), torch.tensor([True, False]), tau=1.0)
    assert loss.item() == pytest.approx((per_view[0] + per_view[2]) / 2, rel=1e-6)
    # one label: u0's positives are u1, u0', u1' (dots 0, .6, 0) -> log(2 + e^.6) - .2; tau 1/2 doubles every dot
    loss = sau.sup_con(z, torch.tensor([3, 3]), all_anchors, tau=1.0)
    u0 = math.log(2 + e(0.6)) - 0.2
    u1 = math.log(1 + e(0.8) + e(1)) - 1.8 / 3
    u0_ = math.log(e(0.6) + 2 * e(0.8)) - 2.2 / 3
    u1_ = math.log(1 + e(1) + e(0.8)) - 1.8 / 3
    assert loss.item() == pytest.approx((u0 + u1 + u0_ + u1_) / 4, rel=1e-6)
    half = sau.sup_con(z, torch.tensor([0, 1]), all_anchors, tau=0.5)
    assert half.item() == pytest.approx((math.log(2 + e(1.2)) - 1.2 + math.log(1 + e(1.6) + e(2)) - 2
                                         + math.log(e(1.2) + 2 * e(1.6)) - 1.2 + math.log(1 + e(2) + e(1.6)) - 2) / 4,
                                        rel=1e-6)


# ---------------------------------------------------------------------------------------------- label correction


def test_label_correction_on_constructed_embeddings():
    # references: class 0 at (1, 0) and class 1 at (0, 1) in both views
    z_ref = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    y_ref = torch.tensor([0, 1])
    near0, near1 = [0.9, 0.1], [0.1, 0.9]
    z_syn = torch.tensor([[near0, near0],   # label 0, both views near class 0: clean
                          [near0, near1],   # label 0, v3 near class 1: noisy (agrees in one view only)
                          [near1, near0],   # label 1, v2 near class 0: noisy (agrees in one view only)
                          [near0, near0],   # label 1, both views near class 0: noisy
                          [near1, near1]])  # label 1, both near class 1: clean
    y_syn = torch.tensor([0, 0, 1, 1, 1])
    noisy = sau.noisy_synthetic(z_syn, y_syn, z_ref, y_ref)
    assert noisy.tolist() == [False, True, True, True, False]
    assert sau.noisy_synthetic(z_syn, y_syn, z_ref[:0], y_ref[:0]).all()  # nothing to agree with


def test_nearest_reference_is_the_cosine_argmax_over_normalised_rows_not_euclidean():
    # a short prototype p = 0.1 s (class 8) lies along s (cosine 1, distance 0.9); a real r (class 7) has cosine 0.8
    # (distance 0.632). Euclidean 1-NN against the un-normalised prototype picks r (label 7: clean); the official
    # cosine argmax over normalised rows picks p (label 8: noisy).
    s = torch.tensor([0.6, 0.8])
    r = torch.tensor([0.96, 0.28])  # unit; s.r = 0.576 + 0.224 = 0.8
    z_ref = torch.stack([torch.stack([r, r]), torch.stack([0.1 * s, 0.1 * s])])  # (2, 2, 2): real r, prototype p
    assert torch.cdist(s[None], z_ref[:, 0]).argmin().item() == 0  # Euclidean: r
    noisy = sau.noisy_synthetic(torch.stack([s, s])[None], torch.tensor([7]), z_ref, torch.tensor([7, 8]))
    assert noisy.item()
    # the synthetic row's own length does not matter either
    assert sau.noisy_synthetic(torch.stack([3 * s, 3 * s])[None], torch.tensor([8]), z_ref, torch.tensor([7, 8])
                               ).tolist() == [False]


def test_label_correction_off_trusts_every_synthetic_image():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(8, 2, 4), dim=2)
    y, is_syn = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([False] * 2 + [True] * 6)
    cfg = dataclasses.replace(sau.TINY, label_correction=False)
    loss, noisy = sau.scl_loss(z, y, is_syn, z[:0], y[:0], cfg)
    assert not noisy.any() and len(noisy) == 6
    torch.testing.assert_close(loss, sau.sup_con(z[torch.cat([(~is_syn).nonzero(), is_syn.nonzero()]).flatten()],
                                                 torch.cat([y[~is_syn], y[is_syn]]), torch.ones(8, dtype=torch.bool),
                                                 cfg.tau))


def test_default_strategy_is_the_official_pos_neg():
    assert sau.Config().strategy == "pos_neg" and sau.Config().label_correction


def test_each_strategy_does_what_the_table_says():
    z = torch.arange(8.0).view(4, 2, 1)
    y, noisy = torch.tensor([0, 1, 2, 1]), torch.tensor([False, True, True, False])
    z_pn, y_pn, a_pn = sau.apply_strategy(z, y, noisy, "pos_neg")
    assert y_pn.tolist() == [0, -1, -2, 1] and a_pn.all() and torch.equal(z_pn, z)
    z_no, y_no, a_no = sau.apply_strategy(z, y, noisy, "neg_only")
    assert y_no.tolist() == [0, -1, -1, 1] and a_no.tolist() == [True, False, False, True] and torch.equal(z_no, z)
    z_dr, y_dr, a_dr = sau.apply_strategy(z, y, noisy, "drop")
    assert y_dr.tolist() == [0, 1] and torch.equal(z_dr, z[[0, 3]]) and a_dr.all()
    assert y.tolist() == [0, 1, 2, 1]  # the batch's labels are untouched


def official_scl(z, y, is_syn, prototypes, prototype_labels, strategy, tau):
    """loss/ContrastiveLoss.py's SCL (latest), restated: relabel by the cosine argmax over L2-normalised real rows,
    prototypes and synthetic rows, then repeated masks and max subtraction on the un-normalised rows."""
    real_f, real_l = torch.cat([z[~is_syn], prototypes]), torch.cat([y[~is_syn], prototype_labels])
    syn_f, syn_l = z[is_syn], y[is_syn].clone()
    agree = torch.ones(len(syn_l), dtype=torch.bool)
    for v in range(2):
        similarity = F.normalize(syn_f[:, v], dim=1) @ F.normalize(real_f[:, v], dim=1).T
        agree &= real_l[similarity.argmax(dim=1)] == syn_l
    index = ~agree
    syn_l[index] = -torch.arange(1, int(index.sum()) + 1) if strategy == "pos_neg" else -1
    if strategy == "drop":
        syn_f, syn_l = syn_f[syn_l != -1], syn_l[syn_l != -1]
    features, labels = torch.cat([real_f, syn_f]), torch.cat([real_l, syn_l])
    n = len(features)
    mask = (labels[:, None] == labels[None, :]).double().repeat(2, 2)
    contrast = torch.cat(torch.unbind(features, dim=1))
    logits = contrast @ contrast.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values
    logits_mask = 1 - torch.eye(2 * n, dtype=torch.double)
    mask = mask * logits_mask
    log_prob = logits - torch.log((logits.exp() * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1).clamp(min=1)
    if strategy == "neg_only":
        noise_mask = (labels.repeat(2) != -1).double()
        return (-mean_log_prob_pos * noise_mask).sum() / noise_mask.sum(), index
    return -mean_log_prob_pos.mean(), index


@pytest.mark.parametrize("strategy", sau.STRATEGIES)
def test_scl_loss_matches_the_official_formulation(strategy: str):
    torch.manual_seed(1)
    z = F.normalize(torch.randn(16, 2, 4, dtype=torch.double), dim=2)
    y = torch.randint(0, 3, (16,))
    is_syn = torch.rand(16) < 0.6
    prototypes = F.normalize(torch.randn(2, 2, 4, dtype=torch.double), dim=2) * 0.7  # means of unit vectors
    prototype_labels = torch.tensor([0, 2])
    cfg = dataclasses.replace(sau.TINY, strategy=strategy)
    loss, noisy = sau.scl_loss(z, y, is_syn, prototypes, prototype_labels, cfg)
    expected, official_noisy = official_scl(z, y, is_syn, prototypes, prototype_labels, strategy, cfg.tau)
    assert 0 < int(noisy.sum()) < int(is_syn.sum())  # the case has clean and noisy synthetic images
    assert torch.equal(noisy, official_noisy)
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------- prototype bank


def test_prototypes_are_the_class_means_of_filled_entries():
    bank = torch.zeros(5, 2, 2)
    bank[0], bank[3], bank[4] = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 9.0
    labels = torch.tensor([0, -1, -1, 0, 2])  # class 1 never filled; row 1's zeros are not an entry
    prototypes, classes = sau.class_prototypes(bank, labels, num_classes=3)
    assert classes.tolist() == [0, 2]
    torch.testing.assert_close(prototypes, torch.tensor([[[0.5, 0.5], [0.0, 1.0]], [[9.0, 9.0], [9.0, 9.0]]]))
    empty, none = sau.class_prototypes(bank, torch.full((5,), -1), num_classes=3)
    assert empty.shape == (0, 2, 2) and none.numel() == 0


def test_bank_holds_real_images_only_and_prototypes_come_from_earlier_steps():
    torch.manual_seed(0)
    model = sau.build(sau.TINY, tiny_info())
    batch = tiny_batch()
    _, metrics = sau.train_step(model, batch, sau.TINY, 0)
    assert metrics["num_prototypes"].item() == 0  # this step's own images are not prototypes yet
    filled = (model.bank_labels >= 0).nonzero().flatten().tolist()
    assert filled == [0, 4, 9]  # the real images' idx
    assert model.bank_labels[[4, 0, 9]].tolist() == [0, 1, 2]
    torch.testing.assert_close(model.bank[filled].norm(dim=2), torch.ones(3, 2))
    _, metrics = sau.train_step(model, tiny_batch(seed=1), sau.TINY, 1)
    assert metrics["num_prototypes"].item() == 3


# ---------------------------------------------------------------------------------------------- evaluation


def test_many_medium_few_groups_from_class_counts():
    groups = shot_groups(torch.tensor([150, 101, 100, 21, 20, 5]))
    assert groups["many"].tolist() == [True, True, False, False, False, False]
    assert groups["medium"].tolist() == [False, False, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, True, True]


def identity_classifier_model(class_counts: tuple[int, ...]) -> sau.SAU:
    """An SAU whose fc returns its input: x (B, C, 1, 1) are the logits."""
    c = len(class_counts)
    encoder = Classifier(nn.Flatten(), c, c)
    with torch.no_grad():
        encoder.head.weight.copy_(torch.eye(c))
        encoder.head.bias.zero_()
    return sau.SAU(encoder, 8, 4, num_train=1, class_counts=class_counts)


def test_eval_step_sums_group_accuracies():
    model = identity_classifier_model((200, 50, 50, 10))  # many {0}, medium {1, 2}, few {3}
    y = torch.tensor([0, 0, 1, 2, 2, 3])
    predicted = torch.tensor([0, 1, 1, 2, 0, 0])  # right: 0, 1, 2 / wrong: 0 -> 1, 2 -> 0, 3 -> 0
    x = F.one_hot(predicted, 4).float()[:, :, None, None]
    with torch.no_grad():
        sums = sau.eval_step(model, {"x": x, "y": y, "idx": torch.arange(6)}, sau.TINY)
    assert {k: int(sums[k]) for k in ("acc", "n", "many_correct", "many_n", "medium_correct", "medium_n",
                                      "few_correct", "few_n")} == {
        "acc": 3, "n": 6, "many_correct": 1, "many_n": 2, "medium_correct": 2, "medium_n": 3, "few_correct": 0,
        "few_n": 1}
    means = {k: float(v) / 6 for k, v in sums.items() if k != "n"}  # the orchestrator's division by n
    summary = shot_summary(means)
    assert summary == pytest.approx({"many_acc": 1 / 2, "medium_acc": 2 / 3, "few_acc": 0.0})


def test_a_group_without_classes_reports_nothing_and_class_counts_survive_a_resume():
    model = identity_classifier_model((200, 150, 50))
    with torch.no_grad():
        sums = sau.eval_step(model, {"x": torch.eye(3)[:, :, None, None], "y": torch.arange(3)}, sau.TINY)
    means = {k: float(v) / 3 for k, v in sums.items() if k != "n"}
    assert set(shot_summary(means)) == {"many_acc", "medium_acc"}
    resumed = identity_classifier_model((0, 0, 0))
    resumed.load_state_dict(model.state_dict())
    assert resumed.class_counts.tolist() == [200, 150, 50]


# ---------------------------------------------------------------------------------------------- the step


def test_a_tiny_step_gives_a_finite_loss_gradients_and_metrics():
    torch.manual_seed(0)
    model = sau.build(sau.TINY, tiny_info())
    loss, metrics = sau.train_step(model, tiny_batch(), sau.TINY, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert set(metrics) == {"loss_mix", "loss_scl", "noisy_fraction", "num_prototypes", "acc"}
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert loss.item() == pytest.approx(metrics["loss_mix"].item() + metrics["loss_scl"].item(), rel=1e-6)
    assert model.training


@pytest.mark.parametrize("field, kept", [("lambda_mix", "loss_scl"), ("lambda_scl", "loss_mix")])
def test_a_zero_weight_removes_its_branch_from_the_loss_and_keeps_every_gradient(field: str, kept: str):
    """The ablations lambda_mix 0 (SAU without L_mix) and lambda_scl 0 (without L_SCL): the branch is still computed
    (DDP needs a gradient on every parameter) but the loss is the other branch alone."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(sau.TINY, **{field: 0.0})
    sau.check(cfg)
    model = sau.build(cfg, tiny_info())
    loss, metrics = sau.train_step(model, tiny_batch(), cfg, 0)
    assert loss.item() == pytest.approx(metrics[kept].item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_ce_classifier_ablation_trains_the_fc_by_plain_cross_entropy_on_view_1():
    """classifier_loss "ce" (SAU without its synthetic-unaware branch): L_mix's place is taken by the hard-label CE
    of the fc on view 1, computed here by hand from the same weights; L_SCL is the default's."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(sau.TINY, classifier_loss="ce")
    sau.check(cfg)
    model, batch = sau.build(cfg, tiny_info()), tiny_batch()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    loss, metrics = sau.train_step(model, batch, cfg, 0)
    expected = F.cross_entropy(reference.encoder(batch["x1"]), batch["y"])
    assert metrics["loss_mix"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(metrics["loss_mix"].item() + metrics["loss_scl"].item(), rel=1e-6)
    loss.backward()
    assert model.encoder.head.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="classifier_loss"):
        sau.check(dataclasses.replace(sau.TINY, classifier_loss="mixup"))


@pytest.mark.parametrize("strategy", sau.STRATEGIES)
def test_an_all_synthetic_first_batch_is_all_noisy_and_still_gives_gradients(strategy: str):
    """No real row and no prototype yet: no synthetic image can agree, every one is noisy (under drop, L_SCL is
    empty and 0); every parameter still gets a gradient (zeros at worst), as DDP needs."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(sau.TINY, strategy=strategy)
    model = sau.build(cfg, tiny_info())
    batch = {**tiny_batch(), "is_syn": torch.ones(6, dtype=torch.bool)}
    loss, metrics = sau.train_step(model, batch, cfg, 0)
    assert metrics["noisy_fraction"].item() == 1.0 and torch.isfinite(loss)
    if strategy == "drop":
        assert metrics["loss_scl"].item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.bank_labels == -1).all()  # synthetic images never enter the bank


def test_view1_accuracy_changes_no_state():
    torch.manual_seed(0)
    model = sau.build(sau.TINY, tiny_info())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sau.view1_accuracy(model, torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- config, files


def test_check_rejects_bad_values():
    sau.check(sau.TINY)
    for field, value in [("strategy", "keep"), ("lambda_mix", -1.0), ("lambda_scl", -0.5), ("arch", "resnet_nope"),
                         ("tau", 0.0)]:
        with pytest.raises(ConfigError) as err:
            sau.check(dataclasses.replace(sau.TINY, **{field: value}))
        assert err.value.field == field


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_hold_the_official_recipe(path: Path):
    raw = yaml.safe_load(path.read_text())
    cfg = method_config(sau.Config, raw["config"], path)
    sau.check(cfg)
    assert cfg == sau.Config()  # the file spells out the defaults
    optim = raw["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["batch_size"], optim["momentum"]) == (0.01, 5e-3, 128, 0.9)
    assert optim["steps"] == 200 * (50_000 // 128) and raw["data"]["imbalance_factor"] == 100
