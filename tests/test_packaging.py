"""The distribution installs orchestrator, trainers and lab_kernels and the console script, and shadows nothing.

Hugging Face's `kernels` distribution (required by transformers >= 5.25) installs an import package `kernels`;
diffusers and transformers import it. The project's ops are `lab_kernels`, so both load in one process from the
repository root (where the README's commands, the tests and `ray job submit --working-dir .` run), from any other
directory, from a built wheel, and in a Ray job given the project as its working directory (test_multinode.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "trainers", "lab_kernels")

# Diffusers pipelines, a transformers model and the project's ops in one fresh interpreter; `origins` says where
# `lab_kernels` and `kernels` came from ("-" when no `kernels` is importable).
IMPORT_ALL = """
import importlib.util
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from transformers import GPT2Config, GPT2LMHeadModel
import lab_kernels
from lab_kernels.complex_attention import ComplexMultiHeadAttention
from lab_kernels.vq_logits import VQLogits
from lab_kernels.grouping import optimal_group_size
import trainers.confiner, trainers.lm
GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
spec = importlib.util.find_spec("kernels")
origins = (lab_kernels.__file__, spec.origin if spec else "-")
"""


def hugging_face_kernels_installed() -> bool:
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return False
    return True


def check_origins(origins: str, ours_under: Path) -> None:
    """Our ops come from `ours_under`; `kernels` is Hugging Face's when installed and never a folder of ours."""
    ours, theirs = origins.split()[-2:]
    assert Path(ours).resolve().is_relative_to(ours_under.resolve()), ours
    if hugging_face_kernels_installed():
        origin = Path(theirs).resolve()
        installed_at = Path(metadata.distribution("kernels").locate_file("")).resolve()
        assert origin == installed_at / "kernels" / "__init__.py", theirs
    else:
        assert theirs == "-"


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code + "\nprint(*origins)"], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_diffusers_transformers_and_our_ops_import_together(where: str, tmp_path: Path) -> None:
    out = run_python(IMPORT_ALL, cwd=REPO if where == "repository root" else tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    check_origins(out.stdout, REPO / "lab_kernels")


def test_no_importable_kernels_folder_at_the_repository_root() -> None:
    assert not (REPO / "kernels").exists()


def test_a_built_wheel_holds_our_packages_only_and_imports_beside_hugging_face(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("lab_orchestrator-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == set(PACKAGES)

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_python(IMPORT_ALL, cwd=elsewhere, env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    check_origins(out.stdout, site / "lab_kernels")


def test_console_script_and_module_entry_point() -> None:
    script = Path(sys.executable).with_name("orchestrator")
    assert script.is_file(), f"console script missing at {script}"
    for command in ([str(script), "--help"], [sys.executable, "-m", "orchestrator", "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "run" in out.stdout and "check" in out.stdout, out.stderr


def test_import_packages_come_from_this_checkout(tmp_path: Path) -> None:
    out = run_python("import orchestrator, trainers, lab_kernels\n"
                     "origins = (orchestrator.__file__, trainers.__file__, lab_kernels.__file__)", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(Path(p).resolve().is_relative_to(REPO) for p in out.stdout.split())
