"""The trainer contract, over every method in trainers.TRAINERS (pure PyTorch, no Ray)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import trainers
from orchestrator.data import VIEWS, build_data
from orchestrator.spec import DataSpec
from trainers import TrainerSpec

METHODS = sorted(trainers.TRAINERS)


def tiny_data(spec: TrainerSpec):
    """The method's views of real data: the bundled digits at 16 px, 40 standard-library files as text, generated
    problems, or generated segmentation shapes."""
    if spec.views == "tokens":  # a 512-token vocabulary, 32-token windows
        return build_data(DataSpec(dataset="text", max_documents=40, vocab_size=512, seq_len=32), seed=0, views="tokens")
    if spec.views == "problems":  # generated two-operand sums
        return build_data(DataSpec(dataset="arithmetic", num_problems=64, num_test=16, max_operands=2, max_number=9),
                          seed=0, views="problems")
    if spec.views == "segmentation":  # the generated shapes, 32 px, 8 labeled images
        return build_data(DataSpec(dataset="shapes_seg", image_size=32, synthetic_per_class=4, num_labeled=8,
                                   unlabeled_ratio=1), seed=0, views="segmentation")
    labeled = {"labeled_per_class": 2} if spec.views.startswith("weak_strong") else {}
    return build_data(DataSpec(dataset="digits", image_size=16, unlabeled_ratio=2, **labeled), seed=0, views=spec.views)


def tiny_batch(spec: TrainerSpec, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], trainers.DataInfo]:
    data = tiny_data(spec)
    items = [data.train[i] for i in range(batch_size)]
    return torch.utils.data.default_collate(items), data.info


def one_run(name: str, steps: int, seed: int = 0) -> tuple[list[float], torch.nn.Module]:
    spec = trainers.get(name)
    torch.manual_seed(seed)
    batch, info = tiny_batch(spec)
    model = spec.build(spec.TINY, info)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        loss, metrics = spec.train_step(model, batch, spec.TINY, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if spec.on_step_end is not None:
            spec.on_step_end(model, spec.TINY, step + 1)
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("name", METHODS)
def test_spec_is_complete(name: str) -> None:
    spec = trainers.get(name)
    assert spec.name == name and spec.paper
    assert dataclasses.is_dataclass(spec.Config) and isinstance(spec.TINY, spec.Config)
    assert spec.views in VIEWS
    module = importlib.import_module(trainers.TRAINERS[name])
    assert spec.Config.__module__ == module.__name__ and module.__doc__, "the module docstring maps paper to fields"
    assert not spec.Config.__doc__.startswith("Config("), "Config needs a docstring of its own"


@pytest.mark.parametrize("name", [n for n in METHODS if trainers.get(n).run is None])
def test_one_step_is_finite_with_gradients(name: str) -> None:
    spec = trainers.get(name)
    batch, info = tiny_batch(spec)
    model = spec.build(spec.TINY, info)
    loss, metrics = spec.train_step(model, batch, spec.TINY, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if spec.dynamic_graph:  # a supernet's step trains one path: the other paths' parameters get no gradient
        grads = [g for g in grads if g is not None]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(not torch.is_tensor(v) or (v.ndim == 0 and not v.requires_grad) for v in metrics.values())


@pytest.mark.parametrize("name", [n for n in METHODS if trainers.get(n).run is None])
def test_two_seeded_runs_are_bitwise_equal(name: str) -> None:
    losses_a, model_a = one_run(name, steps=3)
    losses_b, model_b = one_run(name, steps=3)
    assert losses_a == losses_b
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key  # non-tensors: a module's extra state


# A policy-gradient loss is a surrogate of fresh rollouts each few steps, not an objective that descends on one
# batch (GRPO's is exactly 0 when every sample of a group scores the same); tests/test_rl.py checks that their
# reward rises instead.
SURROGATE_LOSSES = {"ppo", "grpo", "vapo"}


@pytest.mark.parametrize("name", [n for n in METHODS if trainers.get(n).run is None and n not in SURROGATE_LOSSES])
def test_a_few_steps_on_one_batch_lower_the_loss(name: str) -> None:
    losses, _ = one_run(name, steps=15)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", [n for n in METHODS if trainers.get(n).eval_step is not None])
def test_eval_step_returns_sums_with_a_count(name: str) -> None:
    spec = trainers.get(name)
    data = tiny_data(spec)
    batch = torch.utils.data.default_collate([data.test[i] for i in range(6)])
    model = spec.build(spec.TINY, data.info).eval()
    with torch.no_grad():
        sums = spec.eval_step(model, batch, spec.TINY)
    counted = batch["labels"].numel() if "labels" in batch else 6  # tokens, or images
    assert int(sums["n"]) == counted and all(torch.is_tensor(v) and v.ndim == 0 for v in sums.values())
