"""The `tune:` block: search-space parsing, validation errors before Ray starts, trial specs, schedulers and
searchers built from the file, and PBT's hyperparameters taking effect on a restored optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from ray import tune as ray_tune
from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

from orchestrator import preflight, tune
from orchestrator import spec as spec_mod
from orchestrator.cli import main
from orchestrator.optim import build_optimizer, build_scheduler, load_training_state
from orchestrator.search_space import Distribution, parse_space
from orchestrator.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "supervised" / "digits_sweep.yaml"


def sweep_file(tmp_path: Path, **tune_block) -> Path:
    raw = {
        "name": "s", "method": "supervised", "data": {"dataset": "digits", "image_size": 16},
        "config": {"arch": "small_cnn"}, "optim": {"lr": 0.1, "steps": 200, "batch_size": 32},
        "eval": {"every": 50},
        "tune": {"metric": "eval/acc", "mode": "max", "space": {"optim.lr": {"loguniform": [1.0e-3, 0.5]}},
                 **tune_block},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def load_error(path: Path, *overrides: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        preflight.load(path, list(overrides))
    return caught.value


def test_each_distribution_parses_to_its_ray_domain() -> None:
    space = parse_space({
        "optim.lr": {"loguniform": [1.0e-4, 0.1]}, "optim.momentum": {"uniform": [0.8, 0.99]},
        "optim.warmup_steps": {"randint": [0, 10]}, "config.a": {"quniform": [0.5, 0.9, 0.05]},
        "config.b": {"qloguniform": [1.0e-4, 1.0, 5.0e-5]}, "config.c": {"qrandint": [0, 100, 10]},
        "optim.nesterov": {"choice": [True, False]}, "seed": {"grid": [0, 1, 2]},
    }, None)
    assert space["optim.lr"] == Distribution("loguniform", (1.0e-4, 0.1))
    assert space["optim.warmup_steps"].probe_values() == [0, 9]  # randint excludes high
    assert space["config.c"].probe_values() == [0, 100]  # qrandint includes it
    lr = space["optim.lr"].to_ray()
    assert (lr.lower, lr.upper) == (1.0e-4, 0.1) and "LogUniform" in type(lr.get_sampler()).__name__
    assert space["config.a"].to_ray().get_sampler().q == 0.05
    assert space["seed"].to_ray() == {"grid_search": [0, 1, 2]}
    assert space["optim.nesterov"].to_ray().categories == [True, False]


def test_nested_space_reads_as_dotted_keys() -> None:
    nested = parse_space({"optim": {"lr": {"uniform": [0.1, 0.2]}}, "config": {"tau": {"choice": [0.1]}}}, None)
    assert set(nested) == {"optim.lr", "config.tau"}


@pytest.mark.parametrize("entry, key, expected", [
    ({"optim.lr": {"logunifrom": [0.1, 1]}}, "tune.space.optim.lr.logunifrom", "a distribution"),
    ({"optim.lr": {"uniform": [0.1]}}, "tune.space.optim.lr.uniform", "a list [low, high]"),
    ({"optim.lr": {"uniform": [0.5, 0.1]}}, "tune.space.optim.lr.uniform", "low < high"),
    ({"optim.lr": {"loguniform": [0, 0.1]}}, "tune.space.optim.lr.loguniform", "low > 0"),
    ({"optim.lr": {"quniform": [0.1, 0.5, 0]}}, "tune.space.optim.lr.quniform", "q > 0"),
    ({"optim.warmup_steps": {"randint": [0, 2.5]}}, "tune.space.optim.warmup_steps.randint", "an integer"),
    ({"optim.lr": {"choice": []}}, "tune.space.optim.lr.choice", "a non-empty list"),
    ({"optim.lr": 0.1}, "tune.space.optim.lr", "one distribution"),
    ({"optim.lrr": {"uniform": [0.1, 0.2]}}, "tune.space.optim.lrr", "did you mean 'lr'"),
    ({"config.archh": {"choice": ["small_cnn"]}}, "tune.space.config.archh", "did you mean 'arch'"),
    ({"optim.lr": {"uniform": [-1.0, 0.2]}}, "tune.space.optim.lr", "optim.lr: expected greater than 0"),
    ({"name": {"choice": ["a", "b"]}}, "tune.space.name", "a key outside"),
    ({"resources.workers": {"choice": [1, 2]}}, "tune.space.resources.workers", "tune.resources"),
])
def test_bad_search_spaces_name_the_key(tmp_path: Path, entry, key, expected) -> None:
    error = load_error(sweep_file(tmp_path, space=entry))
    assert error.key == key and expected in error.expected
    assert error.file.endswith("sweep.yaml")


@pytest.mark.parametrize("block, key, expected", [
    ({"metric": "accuracy"}, "tune.metric", "eval/<name> or train/<name>"),
    ({"mode": "maximise"}, "tune.mode", "'min' or 'max'"),
    ({"space": {}}, "tune.space", "at least one dotted key"),
    ({"scheduler": {"name": "ashaa"}}, "tune.scheduler.name", "a Tune scheduler"),
    ({"scheduler": {"name": "asha", "grace": 10}}, "tune.scheduler.grace", "an argument of AsyncHyperBandScheduler"),
    ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "tune.scheduler", "arguments that"),
    ({"searcher": {"name": "skopt2"}}, "tune.searcher.name", "a Tune searcher"),
    ({"searcher": {"name": "bohb"}}, "tune.scheduler.name", "searcher bohb runs with scheduler bohb"),
    ({"searcher": {"name": "optuna"}, "space": {"optim.lr": {"grid": [0.1, 0.2]}}}, "tune.space.optim.lr",
     "grid needs searcher random"),
    ({"scheduler": {"name": "pbt", "mutations": {"optim.lr": {"uniform": [0.2, 0.1]}}}},
     "tune.scheduler.mutations.optim.lr.uniform", "low < high"),
    ({"num_samples": 0}, "tune.num_samples", "greater than 0"),
    ({"colour": 1}, "tune.colour", "a known key"),
    ({"reuse_actors": True}, "tune.reuse_actors", "false or null for method 'supervised'"),
])
def test_bad_tune_blocks_name_the_key(tmp_path: Path, block, key, expected) -> None:
    error = load_error(sweep_file(tmp_path, **block))
    assert error.key == key and expected in error.expected


def test_bad_random_searcher_arguments_are_a_spec_error_without_the_key(tmp_path: Path) -> None:
    error = load_error(sweep_file(tmp_path, searcher={"name": "random", "api_key": "sk-secret"}))
    assert error.key == "tune.searcher" and "unexpected keyword argument 'api_key'" in error.expected
    assert "sk-secret" not in str(error) and "'api_key': '***'" in str(error)


def test_check_refuses_a_bad_sweep_before_ray_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad experiment file")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["check", str(sweep_file(tmp_path, scheduler={"name": "ashaa"}))]) == 2
    assert "tune.scheduler.name" in capsys.readouterr().err
    assert main(["sweep", str(sweep_file(tmp_path, space={"optim.lr": {"uniform": [1, 0]}}))]) == 2
    assert "tune.space.optim.lr.uniform: expected low < high" in capsys.readouterr().err


def test_sweep_needs_a_tune_block_and_run_refuses_one(tmp_path: Path, capsys) -> None:
    quickstart = ROOT / "experiments" / "quickstart.yaml"
    assert main(["sweep", str(quickstart)]) == 2
    assert "tune: expected a `tune:` block" in capsys.readouterr().err
    from orchestrator.launch import launch

    with pytest.raises(SpecError, match="orchestrator sweep"):
        launch(spec_mod.load(SWEEP))


def test_trial_spec_applies_overrides_resources_and_report_cadence(tmp_path: Path) -> None:
    spec = spec_mod.load(sweep_file(tmp_path, report_every=25, resources={"workers": 1, "cpus_per_worker": 2}))
    trial = tune.trial_spec(spec, {"optim.lr": 0.02, "config.arch": "small_cnn"})
    assert trial.tune is None and trial.optim.lr == 0.02 and trial.optim.steps == 200
    assert (trial.resources.workers, trial.resources.cpus_per_worker) == (1, 2)
    assert trial.eval.every == trial.checkpoint.every == 25 and trial.log_every == 10
    assert tune.report_every(spec_mod.load(sweep_file(tmp_path))) == 50  # default: eval.every


def test_asha_and_pbt_are_built_in_optimizer_steps(tmp_path: Path) -> None:
    asha = tune.build_scheduler(spec_mod.load(sweep_file(tmp_path, scheduler={"name": "asha", "reduction_factor": 2})))
    assert isinstance(asha, AsyncHyperBandScheduler) and asha._time_attr == "step"
    assert [rung for rung, _ in asha._brackets[0]._rungs] == [200, 100, 50]  # max_t = steps, grace = report_every
    pbt = tune.build_scheduler(spec_mod.load(sweep_file(tmp_path, scheduler={"name": "pbt"})))
    assert isinstance(pbt, PopulationBasedTraining) and pbt._perturbation_interval == 200
    assert pbt._hyperparam_mutations["optim.lr"].lower == 1.0e-3  # the space, by default
    pbt = tune.build_scheduler(spec_mod.load(sweep_file(
        tmp_path, scheduler={"name": "pbt", "perturbation_interval": 100,
                             "mutations": {"optim.weight_decay": {"choice": [0.0, 1.0e-4]}}})))
    assert pbt._hyperparam_mutations == {"optim.weight_decay": [0.0, 1.0e-4]}


@pytest.mark.parametrize("name, scheduler, cls_name", [
    ("random", "fifo", "BasicVariantGenerator"), ("optuna", "fifo", "OptunaSearch"),
    ("hyperopt", "asha", "HyperOptSearch"), ("bohb", "bohb", "TuneBOHB"),
])
def test_searchers_build_from_the_file(tmp_path: Path, name, scheduler, cls_name) -> None:
    spec = spec_mod.load(sweep_file(tmp_path, searcher={"name": name}, scheduler={"name": scheduler}))
    assert type(tune.build_searcher(spec)).__name__ == cls_name


def test_the_digits_sweep_file_is_valid() -> None:
    spec = spec_mod.load(SWEEP)
    assert spec.tune.scheduler.name == "asha" and set(tune.param_space(spec)) == {
        "optim.lr", "optim.weight_decay", "optim.warmup_steps"}
    assert isinstance(tune.param_space(spec)["optim.lr"], ray_tune.search.sample.Float)


def test_restored_optimizer_takes_the_new_hyperparameters() -> None:
    """A PBT exploit loads another trial's optimizer state under this trial's lr / weight decay."""
    base = spec_mod.load(SWEEP).optim
    params = [torch.nn.Parameter(torch.ones(3))]
    old = build_optimizer([{"params": params}], base.model_copy(update={"lr": 0.1, "weight_decay": 0.0}))
    old_schedule = build_scheduler(old, base.model_copy(update={"lr": 0.1}))
    params[0].grad = torch.ones(3)
    for _ in range(30):
        old.step()
        old_schedule.step()
    new_spec = base.model_copy(update={"lr": 0.5, "weight_decay": 1.0e-3})
    new = build_optimizer([{"params": params}], new_spec)
    new_schedule = build_scheduler(new, new_spec)
    load_training_state(new, new_schedule, old.state_dict(), old_schedule.state_dict())
    group = new.param_groups[0]
    assert new_schedule.last_epoch == 30 and group["weight_decay"] == 1.0e-3
    assert group["lr"] == pytest.approx(old.param_groups[0]["lr"] * 5)  # same point of the schedule, 5x the lr
    assert torch.equal(new.state[params[0]]["momentum_buffer"], old.state[params[0]]["momentum_buffer"])
