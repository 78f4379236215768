"""The launcher's pieces that need no Ray: data order and resume position, the DDP step wrapper, progress text."""

from __future__ import annotations

import itertools

import torch

import trainers

from orchestrator.data import build_data
from orchestrator.launch import TrainStep, epoch_order, step_batches
from orchestrator.progress import describe, format_eta
from orchestrator.spec import DataSpec


def test_epoch_order_splits_a_permutation_over_ranks() -> None:
    ranks = [epoch_order(103, 8, rank, 3, seed=1, epoch=0) for rank in range(3)]
    assert all(len(r) == 4 and all(len(b) == 8 for b in r) for r in ranks)  # 103 // 3 = 34 -> 4 batches of 8
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))
    assert epoch_order(103, 8, 0, 3, 1, 0) == ranks[0] and epoch_order(103, 8, 0, 3, 1, 1) != ranks[0]


def test_resumed_batches_continue_where_the_checkpoint_left() -> None:
    data = build_data(DataSpec(dataset="digits"), seed=0, views="plain")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    fresh = [b["idx"] for b in itertools.islice(step_batches(data.train, 64, 0, 1, 0, 0, 0, cpu), 30)]
    resumed = [b["idx"] for b in itertools.islice(step_batches(data.train, 64, 0, 1, 0, 17, 0, cpu), 13)]
    assert all(torch.equal(a, b) for a, b in zip(fresh[17:], resumed))  # 21 batches per epoch: crosses an epoch


def test_train_step_wrapper_runs_the_pure_step() -> None:
    model = torch.nn.Linear(3, 1)

    def step_fn(m, batch, cfg, step):
        return m(batch["x"]).sum() * cfg, {"step": step}

    loss, metrics = TrainStep(model, step_fn, 2.0)({"x": torch.ones(2, 3)}, 5)
    assert metrics == {"step": 5} and torch.allclose(loss, model(torch.ones(2, 3)).sum() * 2)


def test_progress_text() -> None:
    assert format_eta(59) == "0m59s" and format_eta(3725) == "1h02m"
    line = describe({"step": 50, "train/loss": 0.5, "samples_per_s": 640.0, "steps_per_s": 10.0}, 100)
    assert line == "step 50/100 loss 0.5000 640 samples/s eta 0m05s"


def test_gradient_accumulation_equals_one_big_batch() -> None:
    """Two micro-batches of 16 with grad_accum=2 take the same optimizer step as one batch of 32."""
    from orchestrator import spec as spec_mod
    from orchestrator.launch import Position, Setup, TorchEngine
    from orchestrator.optim import build_optimizer, build_scheduler, default_param_groups

    method = trainers.get("supervised")
    data = build_data(DataSpec(dataset="digits"), seed=0, views="plain")
    batch = torch.utils.data.default_collate([data.train[i] for i in range(32)])
    halves = [{k: v[:16] for k, v in batch.items()}, {k: v[16:] for k, v in batch.items()}]

    def one_step(accum: int, batches: list) -> torch.nn.Module:
        raw = {"name": "a", "method": "supervised", "data": {"dataset": "digits"}, "config": {"arch": "small_cnn"},
               "optim": {"steps": 1, "batch_size": 32, "grad_accum": accum, "lr": 0.5}}
        spec = spec_mod.validate(raw)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))  # no batch statistics
        optimizer = build_optimizer(default_param_groups(model), spec.optim)
        setup = Setup(spec, method, method.TINY, data, model, optimizer, build_scheduler(optimizer, spec.optim))
        engine = TorchEngine(setup, TrainStep(model, method.train_step, method.TINY), torch.device("cpu"))
        position = Position()
        engine.optimizer_step(iter(batches), position)
        assert (position.step, position.micro) == (1, accum)
        return model

    big, accumulated = one_step(1, [batch]), one_step(2, halves)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b)


def test_in_process_training_matches_the_quickstart_recipe() -> None:
    """The Ray-free loop (benchmarks use it) trains the quickstart model to the same quality, quickly."""
    from pathlib import Path

    from orchestrator import spec as spec_mod
    from orchestrator.launch import train_in_process

    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    spec = spec_mod.load(quickstart, ["optim.steps=150", "resources.workers=1", "eval.every=null"])
    metrics = train_in_process(spec, torch.device("cpu"))
    assert metrics["step"] == 150 and metrics["eval/acc"] >= 0.9
