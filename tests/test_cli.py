"""The command line as a user types it: `ls` over every experiment file, options before or after the file, and
`compare` leaving out the params that only name or place a run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.cli import _experiments_by_method, main
from orchestrator.compare import differing_params

REPO = Path(__file__).resolve().parents[1]


def test_ls_lists_every_experiment_file_including_those_that_inherit_their_method(tmp_path: Path) -> None:
    found = _experiments_by_method(REPO / "experiments")
    listed = [path for paths in found.values() for path in paths]
    assert sorted(listed) == sorted(str(p) for p in (REPO / "experiments").rglob("*.yaml"))
    assert "?" not in found  # every shipped file loads and names its method
    assert str(REPO / "experiments/supervised/digits_sweep.yaml") in found["supervised"]  # method from base:
    (tmp_path / "broken.yaml").write_text("method: [")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: child\n")
    (tmp_path / "parent.yaml").write_text("method: fixmatch\n")
    assert _experiments_by_method(tmp_path) == {"?": [str(tmp_path / "broken.yaml")],
                                                 "fixmatch": [str(tmp_path / "child.yaml"),
                                                              str(tmp_path / "parent.yaml")]}


@pytest.mark.parametrize("argv", [["check", "FILE", "--set", "optim.lr=0.05", "optim.steps=7"],
                                  ["check", "--set", "optim.lr=0.05", "optim.steps=7", "FILE"],
                                  ["check", "--set", "optim.lr=0.05", "FILE", "optim.steps=7"],
                                  ["check", "--set", "optim.lr=0.05", "--set", "optim.steps=7", "FILE"],
                                  ["check", "--set", "optim.lr=0.05", "FILE", "--set", "optim.steps=7"]])
def test_overrides_may_come_before_or_after_the_file_and_repeat(argv: list[str], capsys) -> None:
    argv = [str(REPO / "experiments/quickstart.yaml") if word == "FILE" else word for word in argv]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "7 steps" in summary and "with sgd lr 0.05" in summary


def test_a_missing_file_is_a_one_line_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--set", "optim.lr=0.05"])
    assert exit_.value.code == 2
    assert "the following arguments are required: file" in capsys.readouterr().err


def test_compare_leaves_out_params_that_only_name_or_place_a_run(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("cli-compare")
    runs = []
    for index, lr in enumerate(("0.1", "0.2")):
        run = client.create_run(experiment)
        for key, value in {"name": f"run-{index}", "storage_path": f"/runs/{index}", "optim.lr": lr,
                           "tracking.experiment": f"exp-{index}", "optim.steps": "100"}.items():
            client.log_param(run.info.run_id, key, value)
        runs.append(client.get_run(run.info.run_id))
    assert differing_params(runs) == ["optim.lr"]


def test_ray_info_lines_leave_the_console_but_not_the_files(tmp_path: Path) -> None:
    """On a worker, the root logger's console handler drops Ray's INFO records (the per-report lines), keeps its
    warnings and every record of ours; a file handler keeps them all."""
    import logging

    import ray

    from orchestrator.launch import keep_ray_info_off_the_console

    console, file = logging.StreamHandler(), logging.FileHandler(tmp_path / "worker.log")
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(file)
    try:
        keep_ray_info_off_the_console()
        keep_ray_info_off_the_console()  # a second call adds nothing
        inside_ray = str(Path(ray.__file__).parent / "train" / "v2" / "context.py")
        records = [logging.LogRecord("x", level, path, 1, "m", None, None)
                   for level, path in [(logging.INFO, inside_ray), (logging.WARNING, inside_ray),
                                       (logging.INFO, __file__)]]
        assert [console.filter(r) for r in records] == [False, True, True]
        assert all(file.filter(r) for r in records)
        assert len(console.filters) == 1
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()
