"""The fxsparse command line: demo, compile, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxsparse
from fxsparse import cli
from fxsparse.plan import Plan


def fxsparse_command() -> list[str]:
    """The installed console script (as a user runs it), else ``python -m fxsparse.cli``."""
    script = Path(sys.executable).with_name("fxsparse")
    if script.exists():
        return [str(script)]
    found = shutil.which("fxsparse")
    return [found] if found else [sys.executable, "-m", "fxsparse.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [*fxsparse_command(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("fxsparse") == "fxsparse.cli:main"


def test_demo_subprocess(tmp_path):
    done = run_cli("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("fxsparse report:") == 2
    assert "SmallResNet" in out and "SmallTransformer" in out
    assert "== summary" in out and "== passes" in out
    for name in cli.DEMO_PASSES:
        assert name in out
    assert "demo done: 2 models" in out
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # the demo cleans up after itself


def test_demo_pass_list_is_a_module_constant():
    assert isinstance(cli.DEMO_PASSES, list) and cli.DEMO_PASSES
    assert set(cli.DEMO_PASSES) <= set(fxsparse.passes.PASSES)


def test_main_in_process_leaves_logging_as_it_found_it(tmp_path):
    import logging

    package, torch_logger = logging.getLogger("fxsparse"), logging.getLogger("torch")
    before = (package.handlers[:], package.propagate, package.level, torch_logger.level)
    assert cli.main(["-q", "compile", "resnet", "--passes", "ShapeInference", "--output", str(tmp_path / "m.pt2")]) == 0
    assert (package.handlers[:], package.propagate, package.level, torch_logger.level) == before


def test_demo_keeps_files_when_asked(tmp_path, capsys):
    assert cli.main(["-q", "demo", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "resnet.plan.json", "resnet.pt2", "transformer.plan.json", "transformer.pt2",
    ]
    assert Plan.load(tmp_path / "resnet.plan.json").model == "SmallResNet"
    assert f"files in {tmp_path}" in capsys.readouterr().out


def test_compile_torchvision_subprocess(tmp_path):
    done = run_cli(
        "compile", "torchvision:resnet18", "--passes", "ShapeInference", "--input-shape", "1,3,64,64",
        "--output", "out.pt2", "--plan", "plan.json", "--report-json", "report.json", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fxsparse report: ResNet (frontend: symbolic)" in done.stdout
    assert "11.69M" in done.stdout  # resnet18's parameters
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.model == "ResNet" and [p["name"] for p in plan.passes] == ["ShapeInference"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passes"][0]["name"] == "ShapeInference"
    loaded = fxsparse.load(tmp_path / "out.pt2")
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert loaded.fxsparse_plan.to_dict() == plan.to_dict()


def test_bad_model_spec_is_one_line_exit_2(tmp_path):
    done = run_cli("compile", "torchvision:no_such_net", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fxsparse: error: model 'torchvision:no_such_net'")
    assert done.stdout == ""


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compile", "nonsense"], ["model 'nonsense'", "built-in"]),
        (["compile", "missing.py:make"], ["no file"]),
        (["compile", "resnet", "--passes", "ShapeInference,Nope"], ["--passes", "'Nope'"]),
        (["compile", "resnet", "--input-shape", "1,x,3"], ["--input-shape"]),
        (["compile", "resnet", "--input-shape", "1,5,32,32"], ["example_inputs", "5 channels"]),
        (["compile", "fxsparse.models:no_such_factory"], ["no attribute 'no_such_factory'"]),
        (["compile", "fxsparse.models:BUILTIN_MODELS"], ["not callable"]),
        (["compile", "resnet", "-o", "Prune.rate=0.3"], ["Prune.rate", "ratio"]),
        (["compile", "resnet", "-o", "Prune=0.3"], ["'Prune=0.3'", "PASS.OPTION=VALUE"]),
        (["compile", "resnet", "--passes", "Prune", "-o", "Shrink.verify=1"], ["'Shrink'", "not in --passes"]),
    ],
)
def test_errors_in_process(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxsparse: error: "), err
    for word in words:
        assert word in err[0]


def test_trace_error_keeps_its_hint_lines(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.py").write_text(textwrap.dedent("""
        import torch

        class Branchy(torch.nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x

        def make():
            return Branchy(), torch.randn(3)
    """))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "bad.py:make"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["loaded bad.py:make (Branchy)", "compiling bad.py:make with " + ", ".join(cli.DEMO_PASSES)]
    assert err[2] == "fxsparse: error: could not trace Branchy:"
    assert err[3].startswith("  symbolic: ") and err[4].startswith("  export: ")
    assert len(err) == 6 and "leaf_modules" in err[5]


def test_compile_user_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def with_inputs():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)), None

        def plain():
            return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))

        def pair():
            return plain(), torch.randn(4, 6)
    """))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "compile", "mine.py:pair"]) == 0
    assert "fxsparse report: Sequential (frontend: symbolic)" in capsys.readouterr().out
    assert cli.main(["-q", "compile", "mine.py:plain"]) == 2
    assert "give --input-shape" in capsys.readouterr().err
    assert cli.main(["-q", "compile", f"{tmp_path / 'mine.py'}:plain", "--input-shape", "3,6", "--frontend", "export"]) == 0
    assert "(frontend: export)" in capsys.readouterr().out


def test_compile_builtin_with_default_passes(capsys):
    assert cli.main(["-q", "compile", "transformer"]) == 0
    out = capsys.readouterr().out
    assert "fxsparse report: SmallTransformer" in out
    assert all(name in out for name in cli.DEMO_PASSES)


def test_pass_options_reach_the_pass(tmp_path):
    assert cli.main(["-q", "compile", "resnet", "-o", "Prune.ratio=0.25", "-o", "Prune.importance=l1",
                     "--plan", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    settings = next(p["settings"] for p in plan["passes"] if p["name"] == "Prune")
    assert settings["ratio"] == 0.25 and settings["importance"] == "l1"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["compile", "resnet", "--frontend", "jit"])
    assert caught.value.code == 2
