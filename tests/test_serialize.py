"""save/load: a compiled model and its plan survive the trip to disk and back."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torchvision

import fxsparse
from fxsparse.errors import FxsparseError, PlanMismatchError
from fxsparse.plan import Plan
from fxsparse.models import build
from fxsparse.serialize import PLAN_FILE, REPORT_FILE, load_module

from conftest import main_output, tiny_hf_model


def assert_plans_equal(a: Plan, b: Plan):
    assert a.to_dict() == b.to_dict()


def test_round_trip_symbolic_torchvision(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxsparse.compile(model, x, ["ShapeInference"])
    assert result.report.frontend == "symbolic"
    path = result.save(tmp_path / "resnet18.pt2")
    loaded = fxsparse.load(path)
    fresh = torch.randn(3, 3, 64, 64)  # another batch size too: the saved program is not tied to batch 2
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module(x))
        assert torch.equal(loaded(x), model(x))
        torch.testing.assert_close(loaded(fresh[:2]), model(fresh[:2]), rtol=0, atol=0)
    assert_plans_equal(loaded.fxsparse_plan, result.plan)
    assert loaded.fxsparse_plan.frontend == "symbolic" and loaded.fxsparse_plan.model == "ResNet"
    assert loaded.fxsparse_plan.shapes_before["fc.weight"] == [1000, 512]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_round_trip_export_hugging_face(tmp_path, kind):
    model, inputs = tiny_hf_model(kind)
    result = fxsparse.compile(model, inputs, ["ShapeInference"])
    assert result.report.frontend == "export"
    path = result.save(tmp_path / f"{kind}.pt2")
    loaded = fxsparse.load(path)
    with torch.no_grad():
        expected = main_output(model(**inputs))
        assert torch.equal(main_output(loaded(**inputs)), main_output(result.module(**inputs)))
        torch.testing.assert_close(main_output(loaded(**inputs)), expected, rtol=1e-5, atol=1e-5)
    assert_plans_equal(loaded.fxsparse_plan, result.plan)


def test_saved_file_holds_plan_and_report(tmp_path):
    model, x = build("transformer")
    result = fxsparse.compile(model, x, ["ShapeInference"])
    path = result.save(tmp_path / "t.pt2")
    _, extra = load_module(path)
    assert Plan.from_dict(extra[PLAN_FILE]).to_dict() == result.plan.to_dict()
    assert extra[REPORT_FILE]["model"] == "SmallTransformer"
    assert [p["name"] for p in extra[REPORT_FILE]["passes"]] == ["ShapeInference"]


def test_saved_file_loads_without_the_model_code(tmp_path):
    """An exported program needs no fxsparse.models (nor the user's classes) to load and run."""
    model, x = build("resnet")
    result = fxsparse.compile(model, x, ["ShapeInference"])
    path = result.save(tmp_path / "r.pt2")
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import sys, torch\n"
        "program = torch.export.load(sys.argv[1])\n"
        "x, y = torch.load(sys.argv[2]), torch.load(sys.argv[3])\n"
        "assert torch.equal(program.module()(x), y)\n"
        "assert 'fxsparse' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_plan_save_load_round_trip(tmp_path):
    model, x = build("resnet")
    result = fxsparse.compile(model, x, ["ShapeInference"])
    result.plan.record_kept("fc.weight", 1, [0, 2, 5])
    path = result.plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["model"] == "SmallResNet"
    again = Plan.load(path)
    assert again.to_dict() == result.plan.to_dict()
    assert again.kept == {"fc.weight": {1: [0, 2, 5]}}
    again.check_fits(model)
    with pytest.raises(PlanMismatchError, match="fc.weight"):
        again.check_fits(build("resnet", num_classes=7)[0])


@torch.fx.wrap
def flip_if_negative(x):
    """Python on a tensor's value, kept whole by symbolic tracing, which torch.export cannot take."""
    return x if float(x.sum()) > 0 else -x


class NotExportable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return flip_if_negative(self.lin(x))


def test_pickle_fallback_when_export_cannot_take_the_graph(tmp_path):
    x = torch.randn(2, 4)
    result = fxsparse.compile(NotExportable(), x, [], frontend="symbolic")  # no meta shapes for .item()
    path = result.save(tmp_path / "pickled.pt2")
    loaded = fxsparse.load(path)
    assert isinstance(loaded, fx.GraphModule)
    assert torch.equal(loaded(x), result.module(x))
    assert_plans_equal(loaded.fxsparse_plan, result.plan)


def test_load_errors(tmp_path):
    with pytest.raises(FxsparseError, match="no saved model"):
        fxsparse.load(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a model")
    with pytest.raises(FxsparseError, match="not a model saved by fxsparse"):
        fxsparse.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(FxsparseError, match="not a model saved by fxsparse"):
        fxsparse.load(other)
