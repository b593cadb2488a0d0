"""The report: readable tables, JSON, and MACs that agree with torch.utils.flop_counter."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxsparse
from fxsparse.models import build
from fxsparse.pass_manager import Pass
from fxsparse.report import MAX_ROWS_SHOWN

from conftest import tiny_hf_model


class ManyRows(Pass):
    name = "ManyRows"

    def run(self, ctx):
        return [{"node": n.name, "op": n.op} for n in ctx.module.graph.nodes]

    def summary(self, rows):
        return f"{len(rows)} nodes listed"


def eager_macs(model, args=(), kwargs=None) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **(kwargs or {}))
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def result():
    model, x = build("resnet")
    return fxsparse.compile(model, x, ["ShapeInference", ManyRows()])


def test_str_has_the_tables(result):
    text = str(result.report)
    assert text.startswith("fxsparse report: SmallResNet (frontend: symbolic)")
    for heading in ("== ManyRows: ", "== passes", "== summary"):
        assert heading in text
    for column in ("pass", "seconds", "what it did", "verified", "before", "after", "ratio", "node", "op"):
        assert column in text
    for row in ("parameters", "MACs", "size", "ShapeInference", "total"):
        assert row in text
    rows = result.report.pass_record("ManyRows").rows
    assert len(rows) > MAX_ROWS_SHOWN
    assert f"... {len(rows) - MAX_ROWS_SHOWN} more rows" in text
    assert "172.19K" in text and "1.000x" in text


def test_to_dict_is_json(result):
    data = result.report.to_dict()
    text = json.dumps(data)  # no default=: every value is plain JSON
    again = json.loads(text)
    assert again["model"] == "SmallResNet" and again["frontend"] == "symbolic"
    assert [p["name"] for p in again["passes"]] == ["ShapeInference", "ManyRows"]
    assert again["before"] == again["after"]
    assert len(again["passes"][1]["rows"]) == len(result.report.pass_record("ManyRows").rows)
    assert json.loads(result.report.to_json()) == again


def test_report_of_a_verified_rewrite_is_json():
    from test_pass_manager import ReluToSelf

    model, x = build("transformer")
    result = fxsparse.compile(model, x, [ReluToSelf()])
    json.dumps(result.report.to_dict())


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_macs_equal_flop_counter_builtin(name):
    model, x = build(name)
    result = fxsparse.compile(model, x, ["ShapeInference"])
    assert result.report.before["macs"] == eager_macs(model, (x,)) > 0
    assert result.report.before["parameters"] == sum(p.numel() for p in model.parameters())


def test_macs_equal_flop_counter_torchvision():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    result = fxsparse.compile(model, x, ["ShapeInference"])
    assert result.report.before["macs"] == eager_macs(model, (x,))
    assert result.report.before["bytes"] == sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()) + sum(
        t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_floating_point()
    )


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_macs_equal_flop_counter_export(kind):
    model, inputs = tiny_hf_model(kind)
    result = fxsparse.compile(model, inputs, ["ShapeInference"])
    assert result.report.frontend == "export"
    assert result.report.before["macs"] == eager_macs(model, kwargs=inputs) > 0
    assert "note: fell back to export" in str(result.report)
