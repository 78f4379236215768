"""`orchestrator submit`: the job it prepares and what it refuses. The quickstart submitted to a real two-node
cluster is in test_multinode.py."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import spec as spec_mod
from orchestrator.spec import SpecError
from orchestrator.submit import command_for, prepare

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def test_the_job_runs_the_file_from_the_uploaded_project(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = spec_mod.load(QUICKSTART, ["storage_path=/shared/runs"])
    job = prepare(spec, QUICKSTART, ["storage_path=/shared/runs"], REPO, "python3", "http://mlflow:5000")
    words = shlex.split(job.entrypoint)
    assert words == ["python3", "-m", "orchestrator", "run", "experiments/quickstart.yaml", "--set",
                     "storage_path=/shared/runs"]
    assert job.runtime_env["working_dir"] == str(REPO) and ".venv" in job.runtime_env["excludes"]
    assert job.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert job.submission_id.startswith("quickstart-digits-")


def test_paths_the_cluster_cannot_see_are_refused(monkeypatch) -> None:
    """A relative storage path or sqlite store would live in the job's temporary copy of the project."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SpecError, match="storage every node of the cluster sees"):
        prepare(spec_mod.load(QUICKSTART), QUICKSTART, [], REPO, "python", None)
    shared = spec_mod.load(QUICKSTART, ["storage_path=/shared/runs"])
    with pytest.raises(SpecError, match="an MLflow server the cluster reaches"):
        prepare(shared, QUICKSTART, [], REPO, "python", "sqlite:///mlflow.db")
    job = prepare(shared, QUICKSTART, [], REPO, "python", None)
    assert "MLFLOW_TRACKING_URI" not in job.runtime_env["env_vars"]  # the cluster's own setting applies


def test_sweeps_and_searches_are_submitted_as_such() -> None:
    assert command_for(spec_mod.load(REPO / "experiments" / "supervised" / "digits_sweep.yaml")) == "sweep"
    assert command_for(spec_mod.load(REPO / "experiments" / "nas_bench" / "macro_evolution.yaml")) == "search"


def test_a_file_outside_the_project_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "exp.yaml"
    outside.write_text(QUICKSTART.read_text())
    with pytest.raises(SpecError, match="inside the working directory"):
        prepare(spec_mod.load(outside), outside, [], REPO, "python", None)


def test_a_bad_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(QUICKSTART.read_text()), "optim": {"lr": -1}}))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(bad), "--address", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "optim" in done.stderr


def git_repo(root: Path) -> Path:
    """A one-commit git repository with one tracked file."""
    for command in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", *command], cwd=root, check=True)
    (root / "train.py").write_text("lr = 0.1\n")
    subprocess.run(["git", "add", "train.py"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "first"], cwd=root, check=True)
    return root


def test_the_job_carries_the_commit_dirty_flag_and_diff_of_the_submitting_checkout(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """The uploaded copy has no .git: the submitting machine's git state travels as GIT_ENV, and a run started
    under it is tagged with that state and logs that diff, not its own directory's."""
    from orchestrator import tracking

    (tmp_path / "project").mkdir()
    project = git_repo(tmp_path / "project")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert tracking.submitted_git_state(project) == {"LAB_GIT_SHA": sha, "LAB_GIT_DIRTY": "False", "LAB_GIT_DIFF": ""}
    (project / "train.py").write_text("lr = 0.2\n")
    carried = tracking.submitted_git_state(project)
    assert carried["LAB_GIT_DIRTY"] == "True" and "+lr = 0.2" in carried["LAB_GIT_DIFF"]
    shutil.copytree(QUICKSTART.parent, project / "experiments")
    spec = spec_mod.load(project / "experiments" / "quickstart.yaml", ["storage_path=/shared/runs"])
    job = prepare(spec, project / "experiments" / "quickstart.yaml", [], project, "python3", None)
    assert {k: job.runtime_env["env_vars"][k] for k in carried} == carried

    elsewhere = tmp_path / "job_copy"
    elsewhere.mkdir()
    assert tracking.git_state(elsewhere) == {"git_sha": "unknown"} and tracking.git_diff(elsewhere) == ""
    for key, value in carried.items():
        monkeypatch.setenv(key, value)
    assert tracking.git_state(elsewhere) == {"git_sha": sha, "git_dirty": "True"}
    assert tracking.git_diff(elsewhere) == carried["LAB_GIT_DIFF"]
