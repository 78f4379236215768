"""Experiment files: valid files load, bad ones fail with the file, the dotted key, expected and found."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import preflight
from orchestrator import spec as spec_mod
from orchestrator.cli import main
from orchestrator.spec import SpecError
from trainers import TRAINERS
from trainers._common.backbones import check_arch

REPO = Path(__file__).resolve().parents[1]

GOOD = """
name: good
method: supervised
data: {dataset: digits, image_size: 16}
config: {arch: small_cnn}
optim: {name: sgd, lr: 0.1, steps: 10, batch_size: 32}
resources: {workers: 2}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").rglob("*.yaml")))
def test_every_shipped_experiment_is_valid(path: str) -> None:
    spec = preflight.load(REPO / path)
    cfg = spec.method_config()
    if isinstance(getattr(cfg, "arch", None), str) and not cfg.arch.startswith("best:"):  # a search's winner
        check_arch(cfg.arch)


def test_defaults_and_method_config(tmp_path: Path) -> None:
    spec = spec_mod.load(write(tmp_path, GOOD))
    assert spec.resources.workers == 2 and spec.checkpoint.keep == 2 and spec.optim.schedule == "cosine"
    cfg = spec.method_config()
    assert cfg.arch == "small_cnn" and cfg.label_smoothing == 0.0
    assert spec.views == "plain"


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    spec = spec_mod.load(write(tmp_path, GOOD), ["optim.lr=0.01", "config.label_smoothing=0.1", "data.views=two_crop"])
    assert spec.optim.lr == 0.01 and spec.method_config().label_smoothing == 0.1 and spec.views == "two_crop"
    with pytest.raises(SpecError, match=r"optim\.lr: expected greater than 0, found -1"):
        spec_mod.load(write(tmp_path, GOOD), ["optim.lr=-1"])


def test_base_file_is_merged_one_level(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, "base: base.yaml\nname: child\noptim: {lr: 0.5}\n", "child.yaml")
    spec = spec_mod.load(child)
    assert spec.name == "child" and spec.optim.lr == 0.5 and spec.optim.steps == 10
    write(tmp_path, "base: base.yaml\n", "middle.yaml")
    grandchild = write(tmp_path, "base: middle.yaml\nname: g\n", "grandchild.yaml")
    with pytest.raises(SpecError, match=r"middle\.yaml: base: expected no `base:` in a base file \(one level only\)"):
        spec_mod.load(grandchild)


BAD_FILES = [
    # (what is wrong, YAML text, the exact message after the file name)
    ("misspelt top-level key", GOOD + "seeed: 1\n",
     "seeed: expected a known key; did you mean 'seed'? (allowed here: name, method, seed, data, config, optim, "
     "resources, eval, checkpoint, log_every, storage_path, tune, repeat, tracking), found an unknown key"),
    ("misspelt nested key", GOOD.replace("lr: 0.1", "lrr: 0.1"),
     "optim.lrr: expected a known key; did you mean 'lr'? (allowed here: name, lr, momentum, nesterov, weight_decay, "
     "betas, schedule, power, warmup_steps, milestones, gamma, steps, batch_size, grad_accum, clip_grad_norm, amp), "
     "found an unknown key"),
    ("unknown method", GOOD.replace("method: supervised", "method: supervisd"),
     f"method: expected one of the known methods ({', '.join(sorted(TRAINERS))}); did you mean 'supervised'?, "
     "found 'supervisd'"),
    ("unknown method config field", GOOD.replace("arch: small_cnn", "archh: small_cnn"),
     "config.archh: expected a field of trainers.supervised.Config; did you mean 'arch'? "
     "(fields: arch, label_smoothing, drop_rate, init_from, class_weighting, cb_beta, shot_accuracy), found an "
     "unknown key"),
    ("wrong type in method config", GOOD.replace("arch: small_cnn", "label_smoothing: lots"),
     "config.label_smoothing: expected a valid number, unable to parse string as a number, found 'lots'"),
    ("wrong type", GOOD.replace("steps: 10", "steps: ten"),
     "optim.steps: expected a valid integer, unable to parse string as an integer, found 'ten'"),
    ("bad choice", GOOD.replace("name: sgd", "name: adam"),
     "optim.name: expected 'sgd', 'adamw' or 'lars', found 'adam'"),
    ("missing required key", GOOD.replace("steps: 10, ", ""),
     "optim.steps: expected this required key to be set, found nothing"),
    ("dataset needs a root", GOOD.replace("dataset: digits", "dataset: cifar10"),
     "data: expected a `root` directory for dataset 'cifar10', found {'dataset': 'cifar10', 'image_size': 16}"),
    ("batch not divisible", GOOD.replace("batch_size: 32", "batch_size: 33"),
     "optim.batch_size: expected a multiple of resources.workers x optim.grad_accum = 2 "
     "(the global batch is split evenly), found 33"),
    ("bad name", GOOD.replace("name: good", "name: 'a b'"),
     "name: expected a name of letters, digits, '_', '.' and '-' (it names the run directory), found 'a b'"),
    ("not a mapping", "- just\n- a list\n", "expected a mapping of keys at the top level, found ['just', 'a list']"),
    ("broken YAML", "name: [unclosed\n", "expected valid YAML (line 2): expected ',' or ']', but got '<stream end>'"),
]


@pytest.mark.parametrize("what, text, message", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_files_name_file_key_expected_found(tmp_path: Path, what: str, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        spec_mod.load(path)
    assert str(err.value) == f"{path}: {message}"


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"<overrides>: lr: expected an override of the form dotted.key=value"):
        spec_mod.load(write(tmp_path, GOOD), ["lr"])


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a fresh process: nothing of this test session's Ray is shared."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_exits_2_naming_the_key_before_ray_starts(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, GOOD.replace("lr: 0.1", "lrr: 0.1"))
    out = cli(command, str(path))
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {path}: optim.lrr: expected a known key; did you mean 'lr'?")
    assert "Ray" not in out.stderr + out.stdout


def test_run_refuses_a_missing_dataset_root_before_ray_starts(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    path = write(tmp_path, GOOD.replace("dataset: digits", f"dataset: cifar10, root: {missing}"))
    out = cli("run", str(path))
    assert out.returncode == 2
    assert f"{path}: data.root: expected an existing dataset directory (or data.download: true), found '{missing}'" in out.stderr
    assert "Ray" not in out.stderr + out.stdout


def test_check_accepts_a_good_file(tmp_path: Path, capsys) -> None:
    assert main(["check", str(write(tmp_path, GOOD))]) == 0
    assert "ok:" in capsys.readouterr().out


def test_ls_lists_methods_papers_and_experiments() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "ls"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    methods = {line.split()[0]: line for line in lines if not line.startswith(" ")}
    assert set(methods) == set(TRAINERS) and "baseline" in methods["supervised"]
    assert {"experiments/quickstart.yaml", "experiments/supervised/cifar10_wrn28_2.yaml"} <= {l.strip() for l in lines}
