"""The distribution installs orchestrator, trainers and kernels, the console script, and clashes with nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)


def test_our_kernels_package_does_not_pass_for_hugging_face_kernels() -> None:
    """HF's `kernels` library also installs an import package `kernels`; transformers and diffusers look it up."""
    out = run_python(
        "import kernels, transformers, diffusers\n"
        "from transformers.utils import is_kernels_available as t\n"
        "from diffusers.utils import is_kernels_available as d\n"
        "import transformers.integrations.hub_kernels\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))\n"
        "print(kernels.__file__, t(), d())\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    path, transformers_sees, diffusers_sees = out.stdout.split()
    assert Path(path).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert (transformers_sees, diffusers_sees) == ("False", "False")


def test_console_script_and_module_entry_point() -> None:
    script = Path(sys.executable).with_name("orchestrator")
    assert script.is_file(), f"console script missing at {script}"
    for command in ([str(script), "--help"], [sys.executable, "-m", "orchestrator", "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "run" in out.stdout and "check" in out.stdout, out.stderr


def test_import_packages_come_from_this_checkout() -> None:
    out = run_python("import orchestrator, trainers, kernels; print(orchestrator.__file__, trainers.__file__)")
    assert out.returncode == 0, out.stderr
    assert all(Path(p).resolve().is_relative_to(REPO) for p in out.stdout.split())
