"""Packaging: a regular (non-editable) install ships fxsparse.passes and the CLI; README and CI agree."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

DEMO_COMMAND = "pip install torch==2.13.0 && pip install . && fxsparse demo"
TEST_COMMAND = 'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]" && python -m pytest -q tests'


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout itself is left alone)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("fxsparse", "passes"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)]
    if _setuptools_ok():
        command.insert(-1, "--no-build-isolation")  # no download of setuptools: faster, works offline
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = (work / "dist").glob("fxsparse-*.whl")
    return built


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxsparse/passes/__init__.py" in names and "fxsparse/passes/shape_inference.py" in names
    assert "fxsparse/cli.py" in names and "fxsparse/models.py" in names and "fxsparse/rules/__init__.py" in names
    assert not any(name.startswith("passes/") for name in names)  # passes/ is installed as fxsparse.passes only
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fxsparse = fxsparse.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_passes_import_from_a_regular_install(wheel, tmp_path):
    """Install the wheel into a folder of its own (pip install --target) and import from there only."""
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "import fxsparse, fxsparse.passes, fxsparse.passes.shape_inference, fxsparse.cli, fxsparse.models\n"
        f"assert fxsparse.__file__.startswith({str(target)!r}), fxsparse.__file__\n"
        f"assert fxsparse.passes.__file__.startswith({str(target)!r}), fxsparse.passes.__file__\n"
        "assert fxsparse.passes.PASSES['ShapeInference'] is fxsparse.passes.ShapeInference\n"
        "import torch\n"
        "model, x = fxsparse.models.build('resnet')\n"
        "print(fxsparse.compile(model, x, ['ShapeInference']).report.frontend)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "symbolic"


def test_readme_starts_with_the_two_commands():
    lines = [line.strip() for line in README.read_text().splitlines()]
    commands = [line for line in lines if line.startswith("pip install")]
    assert commands[:2] == [DEMO_COMMAND, TEST_COMMAND]
    first_code = lines.index("```bash")
    assert lines[first_code + 1: first_code + 3] == [DEMO_COMMAND, TEST_COMMAND]
    assert first_code < 8  # near the top


def test_ci_runs_the_readme_test_command():
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert TEST_COMMAND in text.splitlines()
    assert CI_RUN.stat().st_mode & stat.S_IXUSR


def test_torch_requirement_admits_the_demo_wheel():
    """`pip install .` beside torch 2.13.0 must not pull another torch."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch_requirement == "torch>=2.5"
    assert project["scripts"]["fxsparse"] == "fxsparse.cli:main"
