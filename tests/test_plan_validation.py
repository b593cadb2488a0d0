"""apply_plan checks a plan before it touches the model: every bad entry is a PlanMismatchError naming it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.passes import Prune, Shrink

X = torch.randn(2, 3, 16, 16)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.fixture(scope="module")
def plan_dict():
    result = fxsparse.compile(small_net(), X, passes=[Prune(ratio=0.5), Shrink()])
    data = result.plan.to_dict()
    assert data["kept"]["0.weight"]["0"] == sorted(data["kept"]["0.weight"]["0"])
    return data


def _apply_and_expect(data, needle, tmp_path=None):
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    plan = data if tmp_path is None else tmp_path
    if tmp_path is None:
        plan = fxsparse.Plan.from_dict(data) if isinstance(data, dict) else data
    with pytest.raises(fxsparse.PlanMismatchError, match=needle):
        fxsparse.apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].out_channels == 8


def test_a_valid_plan_validates_and_applies(plan_dict):
    plan = fxsparse.Plan.from_dict(plan_dict)
    plan.validate(small_net())
    model = fxsparse.apply_plan(small_net(), plan)
    assert model[0].out_channels == len(plan_dict["kept"]["0.weight"]["0"]) == 4


@pytest.mark.parametrize("edit, needle", [
    (lambda k: k.__setitem__(1, k[0]), r"kept\['0.weight'\]\[0\] holds index \d+ twice"),
    (lambda k: k.__setitem__(0, -1), r"kept\['0.weight'\]\[0\] holds index -1, outside 0..7"),
    (lambda k: k.__setitem__(-1, 8), r"kept\['0.weight'\]\[0\] holds index 8, outside 0..7"),
    (lambda k: k.reverse(), r"kept\['0.weight'\]\[0\] is not in increasing order"),
    (lambda k: k.pop(), r"kept\['0.weight'\]\[0\] keeps 3 indices but shapes_after"),
    (lambda k: k.__setitem__(0, 1.5), r"kept\['0.weight'\]\[0\] must be a list of integer indices"),
])
def test_a_bad_index_list_is_named_before_the_model_is_touched(plan_dict, edit, needle):
    data = copy.deepcopy(plan_dict)
    edit(data["kept"]["0.weight"]["0"])
    _apply_and_expect(data, needle)


def test_a_bad_dimension_or_unknown_tensor_is_named(plan_dict):
    data = copy.deepcopy(plan_dict)
    data["kept"]["0.weight"]["7"] = [0]
    _apply_and_expect(data, r"kept\['0.weight'\]\[7\]: '0.weight' has 4 dimensions")
    data = copy.deepcopy(plan_dict)
    data["kept"]["nope.weight"] = {"0": [0]}
    _apply_and_expect(data, r"kept\['nope.weight'\]\[0\] names a tensor the plan has no shape for")


def test_malformed_json_unknown_format_and_wrong_types(plan_dict, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "kept": ')
    _apply_and_expect(None, "is not valid JSON", tmp_path=bad)
    for data, needle in [({**plan_dict, "format": 99}, "plan format 99 is not the supported format"),
                         ([1, 2], "a plan is a JSON object, not list"),
                         ({**plan_dict, "kept": {"0.weight": {"zero": [1]}}}, "malformed plan")]:
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(data))
        _apply_and_expect(None, needle, tmp_path=path)
    with pytest.raises(fxsparse.BadArgumentError, match="plan must be"):
        fxsparse.apply_plan(small_net(), 42)


def test_reorders_and_repeats_are_legal_only_in_plans_that_reorder_or_grow(plan_dict):
    data = copy.deepcopy(plan_dict)
    data["kept"] = {"0.weight": {"0": [1, 0, 2, 3, 4, 5, 6, 7]}}  # a permutation of the full dimension
    data["shapes_after"] = dict(data["shapes_before"])
    fxsparse.Plan.from_dict(data).validate()
    data["kept"]["0.weight"]["0"] = [0, 0, 1, 2, 3, 4, 5, 6, 7]  # a repeat: the dimension grows to 9
    data["shapes_after"]["0.weight"] = [9, 3, 3, 3]
    fxsparse.Plan.from_dict(data).validate()
    data["kept"]["0.weight"]["0"] = [0, 0, 1, 2, 3, 4, 5, 6]  # a repeat in a plan of the same width
    data["shapes_after"]["0.weight"] = [8, 3, 3, 3]
    with pytest.raises(fxsparse.PlanMismatchError, match="holds index 0 twice, in a plan that does not grow"):
        fxsparse.Plan.from_dict(data).validate()
    data["kept"]["0.weight"]["0"] = [0, 1, 2, 3]
    data["scales"] = {"0.weight": {"0": [0.5, 0.5]}}
    data["shapes_after"]["0.weight"] = [4, 3, 3, 3]
    with pytest.raises(fxsparse.PlanMismatchError, match=r"scales\['0.weight'\]\[0\] does not match"):
        fxsparse.Plan.from_dict(data).validate()
