"""Repeats without Ray: the `repeat:` block and `--seeds` (errors before Ray starts), the sweep a repeat becomes,
the parent run's mean/std (logged once), and `compare` grouping runs that differ only by seed."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import cli, compare, preflight, tune
from orchestrator.spec import SpecError
from orchestrator.tracking import Tracker

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def experiment(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "repeat.yaml"
    path.write_text(yaml.safe_dump({"base": str(QUICKSTART), "name": "rep", "storage_path": str(tmp_path / "runs"),
                                    **keys}))
    return path


@pytest.mark.parametrize(("repeat", "key", "expected"), [
    ({"seeds": []}, "repeat.seeds", "at least one seed"),
    ({"seeds": [0, 1, 0]}, "repeat.seeds", "each seed once (seed 0 is listed twice)"),
    ({"seeds": [-1]}, "repeat.seeds.0", "greater than or equal to 0"),
    ({"seeds": [2**63]}, "repeat.seeds.0", "less than 9223372036854775808"),
    ({"seeds": [1.5]}, "repeat.seeds.0", "a valid integer"),
    ({"seeds": ["1"]}, "repeat.seeds.0", "a valid integer"),
    ({"seeds": 3}, "repeat.seeds", "a valid list"),
    ({"seed": [1]}, "repeat.seeds", "this required key to be set"),
    ({"seeds": [1], "times": 2}, "repeat.times", "a known key"),
])
def test_a_bad_repeat_block_names_the_file_the_key_and_the_value(tmp_path, repeat, key, expected) -> None:
    path = experiment(tmp_path, repeat=repeat)
    with pytest.raises(SpecError) as caught:
        preflight.load(path)
    assert (caught.value.file, caught.value.key) == (str(path), key)
    assert expected in caught.value.expected


def test_seeds_flag_overrides_the_block_and_bad_seeds_stop_before_ray(tmp_path, monkeypatch, capsys) -> None:
    path = experiment(tmp_path, repeat={"seeds": [0, 1]})
    started = []
    monkeypatch.setattr(cli, "_run_repeat", lambda args, spec: started.append(spec.repeat.seeds) or 0)
    assert cli.main(["run", str(path)]) == 0
    assert cli.main(["run", str(path), "--seeds", "7,3"]) == 0
    assert cli.main(["run", "--set", "optim.lr=0.05", str(path), "--seeds", "5"]) == 0
    assert started == [[0, 1], [7, 3], [5]]
    assert cli.main(["run", str(path), "--seeds", "4,4"]) == 2
    assert "repeat.seeds: expected each seed once (seed 4 is listed twice), found [4, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        cli.main(["run", str(path), "--seeds", "0,x"])
    assert caught.value.code == 2 and "expected comma-separated integer seeds" in capsys.readouterr().err


def test_a_sweep_refuses_a_repeat_block(tmp_path, capsys) -> None:
    path = experiment(tmp_path, repeat={"seeds": [0, 1]},
                      tune={"metric": "eval/acc", "mode": "max", "space": {"optim.lr": {"grid": [0.1, 0.05]}}})
    assert cli.main(["sweep", str(path)]) == 2
    assert "repeat: expected no `repeat:` block for `orchestrator sweep`" in capsys.readouterr().err


def test_a_repeat_is_a_grid_over_seed_whose_trials_are_the_experiment_itself(tmp_path) -> None:
    spec = preflight.load(experiment(tmp_path, repeat={"seeds": [2, 0, 5]}, eval={"every": 50}))
    repeat = tune.repeat_spec(spec)
    assert repeat.name == "rep-repeat" and repeat.repeat == spec.repeat
    assert tune.param_space(repeat) == {"seed": {"grid_search": [2, 0, 5]}}
    trial = tune.trial_spec(repeat, {"seed": 5})
    assert trial.seed == 5 and trial.tune is None and trial.repeat is None
    assert trial.model_dump(exclude={"seed", "name"}) == spec.model_copy(update={"repeat": None}).model_dump(
        exclude={"seed", "name"})  # same evaluations, checkpoints and resources as a plain run


def fake_repeat(tracker: Tracker, seeds: dict[int, dict[str, float]], lr: str = "0.1") -> tuple[str, list[str]]:
    """A repeat parent with one completed child per seed (params seed and optim.lr, the given final metrics)."""
    experiment_id = tracker.experiment_id("fake")
    parent = tracker.client.create_run(experiment_id, run_name="rep-repeat", tags={
        "orchestrator.kind": "repeat", "repeat": "true", "sweep": "rep-repeat"}).info.run_id
    children = []
    for seed, metrics in seeds.items():
        run = tracker.client.create_run(experiment_id, run_name=f"rep-seed{seed}", tags={
            "mlflow.parentRunId": parent, "seed": str(seed), "tune.status": "completed"}).info.run_id
        tracker.client.log_param(run, "seed", seed)
        tracker.client.log_param(run, "optim.lr", lr)
        tracker.client.log_param(run, "name", "rep-repeat")
        for key, value in metrics.items():
            tracker.client.log_metric(run, key, value, step=6)
        tracker.client.log_metric(run, "system/cpu_utilization_percentage", 50.0)
        tracker.client.set_terminated(run)
        children.append(run)
    return parent, children


def test_the_parent_gets_mean_std_and_the_seed_table_once(mlflow_uri, tmp_path) -> None:
    tracker = Tracker(mlflow_uri)
    parent, _ = fake_repeat(tracker, {1: {"eval/acc": 0.8, "eval/loss": 0.5}, 0: {"eval/acc": 0.9, "eval/loss": 0.3}})
    for _ in range(2):  # finished, then the same command again
        rows = tune._finish_repeat_run(tracker, parent, "FINISHED")
    assert [(r["seed"], r["eval/acc"]) for r in rows] == [(0, 0.9), (1, 0.8)]
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(parent).data.metrics
    assert metrics["eval/acc_mean"] == pytest.approx(0.85) and metrics["seeds/completed"] == 2
    assert metrics["eval/acc_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert "system/cpu_utilization_percentage_mean" not in metrics
    assert len(client.get_metric_history(parent, "eval/loss_mean")) == 1  # nothing logged twice
    table = Path(client.download_artifacts(parent, "seeds.csv", str(tmp_path)))
    assert [row["seed"] for row in csv.DictReader(table.open())] == ["0", "1"]


def test_compare_expands_a_repeat_and_groups_runs_that_differ_only_by_seed(mlflow_uri, tmp_path, capsys) -> None:
    tracker = Tracker(mlflow_uri)
    parent, _ = fake_repeat(tracker, {0: {"eval/acc": 0.9}, 1: {"eval/acc": 0.7}})
    _, others = fake_repeat(tracker, {0: {"eval/acc": 0.5}, 1: {"eval/acc": 0.6}, 2: {"eval/acc": 0.4}}, lr="0.05")
    out = tmp_path / "compare"
    assert cli.main(["compare", parent, *others, "--out", str(out), "--tracking-uri", mlflow_uri]) == 0
    printed = capsys.readouterr().out
    assert "0.8 ± 0.14" in printed and "0.5 ± 0.1" in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["seeds"], r["n"], r["optim.lr"]) for r in rows] == [("0,1", "2", "0.1"), ("0,1,2", "3", "0.05")]
    assert float(rows[0]["eval/acc_mean"]) == pytest.approx(0.8)
    assert float(rows[1]["eval/acc_std"]) == pytest.approx(0.1)
    assert "± " in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 5_000
    assert cli.main(["compare", "--repeat", "rep-repeat", "--out", str(out), "--tracking-uri", mlflow_uri]) == 0
    assert [r["n"] for r in csv.DictReader((out / "compare.csv").open())] == ["3"]  # the newest repeat of that name
    assert len(compare.seed_groups(compare.resolve_runs(MlflowClient(mlflow_uri), [], "fake", None))) == 2
