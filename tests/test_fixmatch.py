"""FixMatch: the confidence mask, hard and soft pseudo-labels, the masked consistency loss, the EMA evaluation model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import fixmatch
from trainers._common.contract import ConfigError


def digits_batch(batch_size: int = 8) -> tuple[dict[str, torch.Tensor], object]:
    data = build_data(DataSpec(dataset="digits", image_size=16, labeled_per_class=2, unlabeled_ratio=2), seed=0,
                      views="weak_strong")
    return torch.utils.data.default_collate([data.train[i] for i in range(batch_size)]), data.info


def test_mask_and_hard_pseudo_labels_on_a_hand_case() -> None:
    """Row 0 is confident (0.96 >= 0.95) in class 0; row 1 (max 0.5) is masked out; targets are the argmax."""
    logits_w = torch.tensor([[0.96, 0.02, 0.02], [0.2, 0.5, 0.3]]).log()
    targets, mask = fixmatch.pseudo_labels(logits_w, p_cutoff=0.95, hard_label=True, temperature=0.5)
    assert targets.tolist() == [0, 1]
    assert mask.tolist() == [1.0, 0.0]


def test_masked_consistency_loss_averages_over_all_unlabeled_images() -> None:
    """CE(row 0) = -log 0.5 = ln 2 is kept; row 1 is masked; the mean is over both rows: ln 2 / 2."""
    logits_s = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]).log()
    loss = fixmatch.consistency_loss(logits_s, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2) / 2))


def test_soft_pseudo_labels_are_the_probabilities_as_in_usb() -> None:
    """USB's fixmatch hands probabilities to its hook with softmax=False: the soft targets are p, T plays no part."""
    logits_w = torch.tensor([[0.6, 0.4]]).log()
    targets, mask = fixmatch.pseudo_labels(logits_w, p_cutoff=0.55, hard_label=False)
    torch.testing.assert_close(targets, torch.tensor([[0.6, 0.4]]))
    assert fixmatch.Config().temperature is None and mask.tolist() == [1.0]


def test_soft_pseudo_labels_are_sharpened_by_a_temperature_when_one_is_set() -> None:
    """softmax(log p / T) with T = 0.5 is p^2 renormalised: [0.6, 0.4] -> [0.36, 0.16] / 0.52; the mask uses T = 1."""
    logits_w = torch.tensor([[0.6, 0.4]]).log()
    targets, mask = fixmatch.pseudo_labels(logits_w, p_cutoff=0.55, hard_label=False, temperature=0.5)
    torch.testing.assert_close(targets, torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))
    assert mask.tolist() == [1.0]
    soft_loss = fixmatch.consistency_loss(torch.zeros(1, 2), targets, mask)
    torch.testing.assert_close(soft_loss, torch.tensor(math.log(2)))  # uniform prediction: H = ln 2


def test_the_step_adds_the_weighted_unlabeled_loss_and_gives_a_mask_ratio() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = dataclasses.replace(fixmatch.TINY, lambda_u=2.0)
    model = fixmatch.build(cfg, info)
    loss, metrics = fixmatch.train_step(model, batch, cfg, step=0)
    torch.testing.assert_close(loss.detach(), metrics["loss_x"] + 2.0 * metrics["loss_u"])
    assert 0.0 <= float(metrics["mask"]) <= 1.0


def test_evaluation_uses_the_ema_model() -> None:
    torch.manual_seed(0)
    batch, info = digits_batch()
    cfg = dataclasses.replace(fixmatch.TINY, ema_momentum=0.5)
    model = fixmatch.build(cfg, info)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = fixmatch.train_step(model, batch, cfg, step=0)
    loss.backward()
    optimizer.step()
    before = model.ema.head.weight.clone()
    fixmatch.on_step_end(model, cfg, step=1)
    torch.testing.assert_close(model.ema.head.weight, 0.5 * before + 0.5 * model.student.head.weight)
    assert all(not p.requires_grad for p in model.ema.parameters())

    eval_batch = {"x": batch["x_lb"], "y": batch["y_lb"]}
    model.eval()
    with torch.no_grad():
        sums = fixmatch.eval_step(model, eval_batch, cfg)
        for p in model.student.parameters():
            p.add_(1.0)  # the student moves; the evaluated model must not
        again = fixmatch.eval_step(model, eval_batch, cfg)
    assert int(sums["n"]) == len(eval_batch["y"])
    torch.testing.assert_close(sums["loss"], again["loss"])


def test_a_temperature_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigError, match="config.temperature"):
        fixmatch.check(dataclasses.replace(fixmatch.Config(), temperature=0.0))
