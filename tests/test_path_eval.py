"""A search's trial over a trained supernet (method path_eval) and the chain to retraining (`best:` references),
without Ray: the same MethodContext that a Tune trial gives the method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trainers
from orchestrator import preflight, references
from orchestrator import spec as spec_mod
from orchestrator.data import build_data
from orchestrator.method_run import MethodContext, run_method
from orchestrator.spec import DataSpec, SpecError
from orchestrator.storage import RunDir
from trainers.nas.supernet import load_supernet, path_accuracy, recalibrate_bn
from trainers.path_eval import batches, build_supernet

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "experiments" / "kshot_nas" / "digits_search.yaml"
RETRAIN = REPO / "experiments" / "kshot_nas" / "digits_retrain.yaml"


@pytest.fixture(scope="module")
def digits():
    return build_data(DataSpec(dataset="digits", image_size=16, loader_workers=0), seed=0, views="plain")


@pytest.fixture(scope="module")
def supernet_file(tmp_path_factory, digits) -> Path:
    """A K = 2 supernet of macro_digits after a few training steps (so BN statistics and codes are not initial)."""
    spec = trainers.get("kshot_nas")
    torch.manual_seed(0)
    model = spec.build(spec.TINY, digits.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = torch.utils.data.default_collate([digits.train[i] for i in range(16)])
    for step in range(4):
        loss, _ = spec.train_step(model, batch, spec.TINY, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        spec.on_step_end(model, spec.TINY, step + 1)
    path = tmp_path_factory.mktemp("supernet") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def trial(tmp_path: Path, supernet: Path, arch: str, *overrides: str) -> dict[str, float]:
    spec = spec_mod.load(SEARCH, ["tune=null", f"config.supernet_from={supernet}", f"config.arch={arch}",
                                  "config.calib_batches=3", "config.eval_batches=2", *overrides])
    return run_method(spec, MethodContext(RunDir(str(tmp_path), "trial"), logger=None))


def test_a_trial_is_the_paths_accuracy_after_bn_recalibration(tmp_path: Path, supernet_file: Path, digits) -> None:
    metrics = trial(tmp_path, supernet_file, "macro_digits:1201")
    model = load_supernet(supernet_file, lambda m, c: build_supernet(m, c, digits.info))
    trained_mean = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    torch.manual_seed(0)
    seen = recalibrate_bn(model, "1201", batches(digits.train, 64, 3, True, 0))
    expected = path_accuracy(model, "1201", batches(digits.test, 64, 2, False, 0))
    assert metrics["eval/acc"] == expected and metrics["eval/calib_images"] == seen == 3 * 64
    assert trial(tmp_path, supernet_file, "macro_digits:1201") == metrics  # every trial calibrates alike
    recalibrated = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(trained_mean, recalibrated))
    assert metrics["eval/mflops"] == pytest.approx(trainers.nas.get_space("macro_digits").flops("1201"))


def test_a_trial_of_another_spaces_architecture_is_refused(tmp_path: Path, supernet_file: Path) -> None:
    with pytest.raises(ValueError, match="covers space macro_digits, not vit_digits"):
        trial(tmp_path, supernet_file, "vit_digits:0120")


def test_a_checkpoint_that_is_not_a_supernet_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(ValueError, match="not a supernet"):
        load_supernet(plain, lambda m, c: None)


def test_a_retraining_file_takes_the_winner_of_a_finished_search(tmp_path: Path) -> None:
    search_dir = tmp_path / "kshot-nas-digits-search"
    (search_dir / "search").mkdir(parents=True)
    best = {"arch": "macro_digits:2120", "eval/acc": 0.9, "parent_run_id": "abc123"}
    (search_dir / "search" / "best.json").write_text(json.dumps(best))
    spec = spec_mod.load(RETRAIN, [f"storage_path={tmp_path}"])
    resolved = references.resolve(spec, RETRAIN)
    assert resolved.config["arch"] == "macro_digits:2120"
    assert resolved.tracking.tags["source.config.arch"] == resolved.tracking.tags["mlflow.parentRunId"] == "abc123"
    preflight.check_inputs(resolved, RETRAIN)  # supervised accepts the resolved architecture


def test_a_run_method_without_data_says_it_needs_a_data_block(tmp_path: Path) -> None:
    ctx = MethodContext(RunDir(str(tmp_path), "run"), logger=None)
    ctx.spec = spec_mod.validate({"name": "x", "method": "nas_bench"})
    with pytest.raises(ValueError, match="needs a `data:` block"):
        ctx.data()


def test_missing_search_result_is_a_spec_error(tmp_path: Path) -> None:
    spec = spec_mod.load(RETRAIN, [f"storage_path={tmp_path}"])
    with pytest.raises(SpecError, match="config.arch.*run that search first"):
        references.resolve(spec, RETRAIN)
