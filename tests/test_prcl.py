"""PRCL: the mutual likelihood score and the precision-weighted prototypes by hand, the contrastive term's anchors,
negatives and gradients, ClassMix, the unlabeled image weights, mIoU from eval_step + eval_summary, the EMA and
lambda_c schedules, the param groups, and TINY train steps (finite, gradients, determinism)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from orchestrator.cli import main
from trainers import prcl
from trainers._common.contract import ConfigError, DataInfo

CFG = prcl.TINY
INFO = DataInfo(num_classes=4, image_size=32, in_channels=3, num_train=8, num_labeled=2, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225))


def make_model(seed: int = 0) -> prcl.PRCL:
    torch.manual_seed(seed)
    return prcl.build(CFG, INFO).train()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, INFO.num_classes, (2, 32, 32), generator=g)
    y[0, :4] = prcl.IGNORE
    return {"x": torch.randn(2, 3, 32, 32, generator=g), "y": y, "u": torch.randn(2, 3, 32, 32, generator=g)}


# ---------------------------------------------------------------------------------------------- MLS, prototypes


def test_mls_of_equal_means_is_the_log_term():
    mu = torch.tensor([[3.0, 4.0, 0.0]])
    s2 = torch.tensor([[0.1, 0.2, 0.4]])
    expected = -0.5 * torch.log(2 * s2).mean()
    torch.testing.assert_close(prcl.mls(mu, mu, s2, s2), expected[None])


def test_mls_matches_a_direct_computation_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    s2_a, s2_b = torch.rand(5, 7, generator=g) + 0.05, torch.rand(5, 7, generator=g) + 0.05
    for n in range(5):
        a, b = mu_a[n] / mu_a[n].norm(), mu_b[n] / mu_b[n].norm()
        direct = -0.5 * sum(((a[d] - b[d]) ** 2 / (s2_a[n, d] + s2_b[n, d]) + math.log(s2_a[n, d] + s2_b[n, d]))
                            for d in range(7)) / 7
        assert prcl.mls(mu_a, mu_b, s2_a, s2_b)[n].item() == pytest.approx(float(direct), rel=1e-5)
    torch.testing.assert_close(prcl.mls(mu_a, mu_b, s2_a, s2_b), prcl.mls(mu_b, mu_a, s2_b, s2_a))


def test_a_larger_variance_lowers_the_penalty_of_a_distance():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])

    def penalty(s2: float) -> float:  # how much the distance a-b costs at variance s2 per side
        v = torch.full((1, 2), s2)
        return (prcl.mls(a, a, v, v) - prcl.mls(a, b, v, v)).item()

    assert penalty(0.5) < penalty(0.1) < penalty(0.01)
    assert penalty(0.1) == pytest.approx(0.5 * 1.0 / 0.2, rel=1e-5)  # mean_d (a - b)^2 = 1, s2_a + s2_b = 0.2


def test_prototype_is_precision_weighted_and_a_confident_pixel_dominates():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [5.0, 5.0]])
    s2 = torch.tensor([[1e-4, 1e-4], [1.0, 1.0], [0.5, 0.25], [0.3, 0.3]])
    label = torch.tensor([0, 0, 0, 2])
    proto_mu, proto_s2 = prcl.prototypes(mu, s2, label, num_classes=3)
    precision = torch.tensor([1e4 + 1 + 2, 1e4 + 1 + 4])
    torch.testing.assert_close(proto_s2[0], 1 / precision)
    torch.testing.assert_close(proto_mu[0], torch.tensor([1e4, 1 + 8]) / precision)
    assert proto_mu[0, 0] > 0.999 and proto_mu[0, 1] < 1e-3  # the very confident pixel (1, 0) dominates
    torch.testing.assert_close(proto_mu[2], mu[3])  # one pixel: its own distribution
    torch.testing.assert_close(proto_s2[2], s2[3])


# ---------------------------------------------------------------------------------------------- contrastive term


def contrast_inputs(seed: int = 0):
    """Three classes of 20 pixels; in class 0 only pixels 0..4 are hard (probability < 0.8)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(3).repeat_interleave(20)
    mu = torch.randn(60, 8, generator=g).requires_grad_()
    s2 = (torch.rand(60, 8, generator=g) * 0.8 + 0.1).requires_grad_()
    prob = torch.full((60,), 0.5)
    prob[5:20] = 0.95
    return mu, s2, label, prob


def test_anchors_come_only_from_hard_pixels_and_a_class_without_any_is_skipped():
    _, _, label, prob = contrast_inputs()
    torch.manual_seed(0)
    anchors = prcl.sample_anchors(label, prob, 0, threshold=0.8, num=64)
    assert len(anchors) == 64 and set(anchors.tolist()) <= set(range(5))
    prob_all_easy = prob.clone()
    prob_all_easy[:20] = 0.9
    assert len(prcl.sample_anchors(label, prob_all_easy, 0, threshold=0.8, num=64)) == 0


def test_negatives_never_come_from_the_anchor_class():
    mu, s2, label, _ = contrast_inputs()
    present = label.unique()
    proto_mu, proto_s2 = prcl.prototypes(mu.detach(), s2.detach(), label, 3)
    torch.manual_seed(0)
    for i in range(3):
        negatives = prcl.sample_negatives(label, present, i, proto_mu, proto_s2, (16, 32), temp=100.0)
        assert negatives.shape == (16, 32)
        classes = label[negatives]
        assert (classes != i).all()
        assert set(classes.unique().tolist()) == {0, 1, 2} - {i}  # both other classes drawn at temp 100


def test_contrastive_loss_is_finite_and_its_gradients_reach_mu_and_sigma2():
    mu, s2, label, prob = contrast_inputs()
    torch.manual_seed(0)
    loss = prcl.prcl_loss(mu, s2, label, prob, 3, CFG)
    assert torch.isfinite(loss)
    loss.backward()
    for grad in (mu.grad, s2.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Gradients only through anchors: the easy pixels of class 0 (5..19) are never anchors.
    assert mu.grad[5:20].abs().sum() == 0 and mu.grad[:5].abs().sum() > 0


def test_contrastive_loss_averages_over_the_classes_present_and_skips_classes_without_hard_pixels():
    mu, s2, label, prob = contrast_inputs()
    prob[20:] = 0.99  # classes 1 and 2 have no hard pixel: only class 0 adds a term, the sum is divided by 3
    torch.manual_seed(0)
    loss = prcl.prcl_loss(mu, s2, label, prob, 3, CFG)
    torch.manual_seed(0)  # the same draws by hand: class 0's anchors, then its negatives
    anchors = prcl.sample_anchors(label, prob, 0, CFG.hard_threshold, CFG.num_queries)
    proto_mu, proto_s2 = prcl.prototypes(mu.detach(), s2.detach(), label, 3)
    shape = (CFG.num_queries, CFG.num_negatives)
    negatives = prcl.sample_negatives(label, label.unique(), 0, proto_mu, proto_s2, shape, CFG.temp)
    key_mu = torch.cat([proto_mu[0].expand(shape[0], 1, -1), mu.detach()[negatives]], dim=1)
    key_s2 = torch.cat([proto_s2[0].expand(shape[0], 1, -1), s2.detach()[negatives]], dim=1)
    logits = prcl.mls(mu[anchors][:, None], key_mu, s2[anchors][:, None], key_s2) / CFG.temp  # (Q, 1 + K)
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean() / 3
    torch.testing.assert_close(loss, expected)


def test_a_single_class_gives_zero_with_both_heads_in_the_graph():
    mu, s2, _, prob = contrast_inputs()
    loss = prcl.prcl_loss(mu, s2, torch.zeros(60, dtype=torch.long), prob, 3, CFG)
    assert loss.item() == 0.0
    loss.backward()
    assert mu.grad is not None and s2.grad is not None


# ---------------------------------------------------------------------------------------------- augmentation


def test_class_mix_pastes_the_source_pixels_exactly_where_its_selected_classes_are():
    g = torch.Generator().manual_seed(0)
    label = torch.stack([torch.randint(0, 4, (16, 16), generator=g), torch.randint(4, 8, (16, 16), generator=g)])
    image, conf = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    torch.manual_seed(0)
    out_image, out_label, out_conf = prcl.class_mix(image, label, conf)
    for i in range(2):
        source, other = i, 1 - i
        kept = out_label[i].unique()[torch.isin(out_label[i].unique(), label[source].unique())]
        assert len(kept) == len(label[source].unique()) // 2  # half of its 4 classes
        mask = torch.isin(label[source], kept)
        assert torch.equal(out_label[i][mask], label[source][mask])
        assert torch.equal(out_image[i][:, mask], image[source][:, mask])
        assert torch.equal(out_conf[i][mask], conf[source][mask])
        assert torch.equal(out_label[i][~mask], label[other][~mask])  # everything else from image i + 1
        assert torch.equal(out_image[i][:, ~mask], image[other][:, ~mask])


def test_rescale_at_scale_one_and_flip_keep_image_label_and_confidence_together():
    image, label, conf = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)), torch.rand(2, 8, 8)
    out = prcl.rescale_crop(image, label, conf, (1.0, 1.0))
    for a, b in zip(out, (image, label, conf)):
        assert torch.equal(a, b)
    flipped = prcl.hflip(image, label, conf, p=1.0)
    for a, b in zip(flipped, (image, label, conf)):
        assert torch.equal(a, b.flip(-1))


def test_rescale_pads_with_ignore_and_zero_confidence():
    torch.manual_seed(0)
    image, label, conf = torch.randn(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.long), torch.ones(1, 16, 16)
    out_image, out_label, out_conf = prcl.rescale_crop(image, label, conf, (0.5, 0.5))
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert (out_label == prcl.IGNORE).sum() == 16 * 16 - 8 * 8
    assert torch.equal(out_label == prcl.IGNORE, out_conf == 0)


def test_colour_jitter_keeps_pixels_in_range_and_p0_is_identity():
    model = make_model()
    image = (torch.rand(2, 3, 8, 8) - model.mean) / model.std
    torch.testing.assert_close(prcl.colour_jitter(image, model.mean, model.std, p=0.0), image)
    raw = prcl.colour_jitter(image, model.mean, model.std, p=1.0) * model.std + model.mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


# ---------------------------------------------------------------------------------------------- unlabeled loss


def test_an_image_without_confident_pixels_has_weight_zero():
    label = torch.tensor([[[0, 1], [1, prcl.IGNORE]], [[2, 2], [0, 1]]])
    conf = torch.tensor([[[0.5, 0.96], [0.9, 0.0]], [[0.99, 0.97], [0.1, 0.98]]])
    torch.testing.assert_close(prcl.image_weights(label, conf, 0.97), torch.tensor([0.0, 0.75]))
    logits = torch.randn(2, 3, 2, 2)
    ce = F.cross_entropy(logits, label, ignore_index=prcl.IGNORE, reduction="none")
    expected = 0.75 * ce[1].sum() / 7  # 7 non-ignored pixels; image 0 weighs 0
    torch.testing.assert_close(prcl.unsup_loss(logits, label, conf, 0.97), expected)


# ---------------------------------------------------------------------------------------------- evaluation


class FixedTeacher(nn.Module):
    def __init__(self, preds: list[torch.Tensor], num_classes: int):
        super().__init__()
        self.preds, self.num_classes = preds, num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (F.one_hot(self.preds.pop(0), self.num_classes).permute(0, 3, 1, 2).float(),)


def test_miou_from_eval_step_and_summary_by_hand():
    ig = prcl.IGNORE
    y1 = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, ig]]])
    p1 = torch.tensor([[[0, 1, 1, 1], [0, 0, 3, 2]]])
    y2 = torch.tensor([[[3, 3, 0, 0], [3, 3, 0, 0]]])
    p2 = torch.tensor([[[3, 3, 0, 0], [3, 0, 0, 0]]])
    model = nn.Module()
    model.teacher, model.num_classes = FixedTeacher([p1, p2], 5), 5
    sums = [prcl.eval_step(model, {"x": torch.zeros(1, 3, 2, 4), "y": y}, CFG) for y in (y1, y2)]
    totals = {k: sum(s[k] for s in sums).item() for k in sums[0]}
    assert totals["n"] == 2
    means = {k: v / totals["n"] for k, v in totals.items() if k != "n"}
    summary = prcl.eval_summary(means)
    # class 0: pred 0 on 3 + 5 pixels, label 0 on 4 + 4, both on 3 + 4 -> 7 / 9; class 1: 2 / 4 (pred 1 on 3, label
    # 1 on 3, both 2); class 2: predicted only on the ignored pixel -> no union, left out; class 3: 3 / 5 (pred 3 on
    # 1 + 3, label 3 on 4, both 3); class 4: absent.
    expected = {"iou000": 7 / 9, "iou001": 2 / 4, "iou003": 3 / 5}
    assert set(summary) == set(expected) | {"miou"}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value)
    assert summary["miou"] == pytest.approx(sum(expected.values()) / 3)


def test_eval_step_on_the_tiny_model_uses_num_classes():
    model = make_model().eval()
    sums = prcl.eval_step(model, {"x": torch.randn(2, 3, 32, 32), "y": torch.randint(0, 4, (2, 32, 32))}, CFG)
    assert sorted(k for k in sums if k.startswith("_inter")) == [f"_inter{c:03d}" for c in range(INFO.num_classes)]
    assert sum(sums[f"_union{c:03d}"] for c in range(4)) >= 2 * 32 * 32 / 2


# ---------------------------------------------------------------------------------------------- schedules, config


def test_ema_decay_schedule_and_first_update_copies_the_student():
    assert [prcl.ema_decay(t, 0.99) for t in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert prcl.ema_decay(99, 0.99) == pytest.approx(0.99) and prcl.ema_decay(10_000, 0.99) == 0.99
    model = make_model()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    prcl.on_step_end(model, CFG, step=1)  # update number 0: decay 0
    for t, s in zip(model.teacher.parameters(), model.student.parameters()):
        assert torch.equal(t, s)


def test_lambda_c_ramps_down():
    assert prcl.ramp_down(0, 200) == 1.0
    assert prcl.ramp_down(100, 200) == pytest.approx(math.exp(-1.25))
    assert prcl.ramp_down(199, 200) == pytest.approx(math.exp(-5 * (199 / 200) ** 2))
    assert prcl.ramp_down(200, 200) == 0.0


def test_param_groups_give_the_uncertainty_head_its_lr():
    model = make_model()
    groups = prcl.param_groups(model, prcl.Config())
    assert groups[1]["lr_scale"] == pytest.approx(5e-5 / 3.2e-3)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[1] == {id(p) for p in model.uncertainty.parameters()} and not ids[0] & ids[1]
    assert not ({id(p) for p in model.teacher.parameters()} & (ids[0] | ids[1]))


def test_check_rejects_bad_values_and_accepts_the_defaults():
    prcl.check(prcl.Config())
    prcl.check(CFG)
    for field, value in (("temp", 0.0), ("scale_range", (1.5, 0.5)), ("hard_threshold", 1.5), ("num_queries", 0)):
        with pytest.raises(ConfigError):
            prcl.check(dataclasses.replace(CFG, **{field: value}))


def test_uncertainty_is_in_the_unit_interval():
    head = prcl.UncertaintyHead(12, 6)
    s2 = head(torch.randn(2, 12, 5, 5) * 50)
    assert s2.shape == (2, 6, 5, 5) and (s2 > 0).all() and (s2 < 1).all()


# ---------------------------------------------------------------------------------------------- the step


def test_tiny_train_step_is_finite_with_gradients_on_the_student_only():
    model = make_model()
    loss, metrics = prcl.train_step(model, make_batch(), CFG, step=0)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert metrics["loss_prcl"] > 0 and metrics["lambda_c"] == 1.0
    loss.backward()
    for name, p in [*model.student.named_parameters(), *model.uncertainty.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_segmentation_view_batches_flatten_and_padding_gets_no_pseudo_label():
    model = make_model()
    batch = make_batch()
    u_valid = torch.ones(2, 32, 32, dtype=torch.bool)
    u_valid[:, :, 16:] = False
    torch.manual_seed(0)
    _, label, conf = prcl.strong_view(model, batch["u"], u_valid, dataclasses.replace(CFG, scale_range=(1.0, 1.0),
                                                                                    jitter_p=0.0, flip_p=0.0))
    assert (label[:, :, 16:] == prcl.IGNORE).all() and (conf[:, :, 16:] == 0).all()  # ClassMix keeps it (roll)
    view = {**batch, "u": batch["u"][:, None], "u_valid": u_valid[:, None]}  # (B, mu = 1, ...) as the view gives
    loss, _ = prcl.train_step(model, view, CFG, step=0)
    assert torch.isfinite(loss)


def run_two_steps(seed: int) -> tuple[list[float], list[torch.Tensor]]:
    model = make_model(seed)
    groups = [{**g, "lr": 0.01 * g.get("lr_scale", 1.0)} for g in prcl.param_groups(model, CFG)]
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(seed)
    losses = []
    for step in range(2):
        loss, _ = prcl.train_step(model, make_batch(step), CFG, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        prcl.on_step_end(model, CFG, step + 1)
        losses.append(loss.item())
    return losses, [t.detach().clone() for t in model.state_dict().values()]


def test_two_seeded_runs_are_bitwise_equal():
    losses_a, state_a = run_two_steps(3)
    losses_b, state_b = run_two_steps(3)
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


def test_the_evaluation_figure_shows_image_truth_and_prediction_per_row() -> None:
    info = DataInfo(num_classes=3, image_size=16, in_channels=3, num_train=4, num_labeled=2, mean=(0.5,) * 3,
                    std=(0.25,) * 3)
    torch.manual_seed(0)
    model = prcl.build(prcl.TINY, info).eval()
    y = torch.zeros(5, 16, 16, dtype=torch.long)
    y[:, :4] = 255
    y[:, 8:] = 2
    figure = np.asarray(Image.open(io.BytesIO(prcl.eval_figure(model, {"x": torch.randn(5, 3, 16, 16), "y": y},
                                                                prcl.TINY))))
    assert figure.shape == (4 * 16, 3 * 16, 3)  # 4 rows (FIGURE_ROWS), image | truth | prediction
    colours = prcl.palette(3)
    assert (figure[:4, 16:32] == 255).all() and (figure[8:16, 16:32] == colours[2]).all()
    assert (colours[0] == 0).all() and (colours[1] == (128, 0, 0)).all() and (colours[2] == (0, 128, 0)).all()


@pytest.mark.ray
def test_the_cpu_setting_trains_under_ray_with_miou_and_a_figure_in_mlflow(ray_cluster, mlflow_uri, tmp_path) -> None:
    """The shipped CPU file, shortened, on 2 workers: mIoU and per-class IoU reach MLflow, per-class pixel counts do
    not, and each evaluation logs its figure."""
    file = Path(__file__).parents[1] / "experiments" / "prcl" / "shapes_cpu.yaml"
    assert main(["run", str(file), "--set", f"storage_path={tmp_path / 'runs'}", "data.synthetic_per_class=20",
                 "optim.steps=8", "config.ramp_steps=8", "log_every=4", "eval.every=4", "checkpoint.every=8"]) == 0
    client = MlflowClient(mlflow_uri)
    run_id = json.loads((tmp_path / "runs" / "prcl-shapes" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert 0 <= run.data.metrics["eval/miou"] <= 1 and "eval/iou000" in run.data.metrics
    assert not any(k.startswith("eval/_") for k in run.data.metrics)
    assert {"train/loss_prcl", "train/lambda_c", "train/sigma2"} <= set(run.data.metrics)
    figures = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert figures == {"eval/figure_00000004.png", "eval/figure_00000008.png"}
