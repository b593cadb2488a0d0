"""Errors a user can make get one line naming the argument; compile never changes the user's model."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxsparse
from fxsparse.errors import BadArgumentError, FxsparseError
from fxsparse.models import build

from conftest import tiny_hf_model


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_unknown_pass_name():
    model, x = build("resnet")
    with pytest.raises(BadArgumentError) as caught:
        fxsparse.compile(model, x, ["ShapeInference", "NoSuchPass"])
    text = one_line(caught.value)
    assert "passes[1]" in text and "NoSuchPass" in text and "ShapeInference" in text  # lists the known ones


@pytest.mark.parametrize(
    "inputs, words",
    [
        (None, ["example_inputs", "required"]),
        ("an image", ["example_inputs", "str"]),
        (42, ["example_inputs", "int"]),
        ((1, 2), ["example_inputs", "no tensor"]),
        (torch.randn(2, 5, 32, 32), ["example_inputs", "(2, 5, 32, 32)", "3 channels"]),
        ((torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)), ["example_inputs", "too many positional"]),
        ({"image": torch.randn(2, 3, 32, 32)}, ["example_inputs", "image"]),
    ],
    ids=["none", "string", "int", "no-tensor", "wrong-channels", "too-many", "wrong-keyword"],
)
def test_wrong_example_inputs(inputs, words):
    model, _ = build("resnet")
    with pytest.raises(BadArgumentError) as caught:
        fxsparse.compile(model, inputs, ["ShapeInference"])
    text = one_line(caught.value)
    assert text.startswith("example_inputs"), text
    for word in words:
        assert word in text


def test_wrong_keyword_for_hugging_face():
    """HF forwards take **kwargs, so a misspelt keyword binds; export then fails and the TraceError says why."""
    model, inputs = tiny_hf_model("bert")
    with pytest.raises(fxsparse.TraceError) as caught:
        fxsparse.compile(model, {"input_idz": inputs["input_ids"]}, [])
    assert "input_ids" in str(caught.value).splitlines()[2]


@pytest.mark.parametrize("not_a_model", [None, "resnet18", torch.randn(3), lambda x: x])
def test_model_not_a_module(not_a_model):
    with pytest.raises(BadArgumentError) as caught:
        fxsparse.compile(not_a_model, torch.randn(1, 3, 8, 8), [])
    text = one_line(caught.value)
    assert text.startswith("model must be a torch.nn.Module")
    with pytest.raises(BadArgumentError):
        fxsparse.trace(not_a_model, torch.randn(1, 3, 8, 8))


def test_unknown_frontend():
    model, x = build("resnet")
    with pytest.raises(BadArgumentError) as caught:
        fxsparse.compile(model, x, [], frontend="jit")
    assert "frontend" in one_line(caught.value)


def test_errors_are_one_family():
    for cls in (fxsparse.BadArgumentError, fxsparse.TraceError, fxsparse.PassOrderError, fxsparse.VerificationError,
                fxsparse.MaskError, fxsparse.PlanMismatchError, fxsparse.UnsupportedOpError):
        assert issubclass(cls, FxsparseError)
    assert issubclass(BadArgumentError, ValueError)


# ------------------------------------------------------------------------------------- the user's model is untouched


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    state.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return state


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor], ids: dict[str, int]):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert {k: id(v) for k, v in model.named_parameters()} == ids  # the same Parameter objects, too


@pytest.mark.parametrize("make", ["resnet-train", "torchvision", "bert", "llama"])
def test_compile_leaves_the_model_bit_identical(make):
    if make == "resnet-train":
        model, x = build("resnet")
        model.train()  # BatchNorm in training mode would update its running stats if compile ran it
        inputs = x
    elif make == "torchvision":
        model, inputs = torchvision.models.mobilenet_v3_small().train(), torch.randn(2, 3, 64, 64)
    else:
        model, inputs = tiny_hf_model(make)
        model.train()
    was_training = model.training
    before = snapshot(model)
    ids = {k: id(v) for k, v in model.named_parameters()}
    result = fxsparse.compile(model, inputs, ["ShapeInference"])
    assert_untouched(model, before, ids)
    assert model.training == was_training
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), result.module.parameters()))


def test_failed_compile_leaves_the_model_bit_identical():
    model, x = build("resnet")
    model.train()
    before = snapshot(model)
    ids = {k: id(v) for k, v in model.named_parameters()}
    with pytest.raises(FxsparseError):
        fxsparse.compile(model, x, ["ShapeInference", "NoSuchPass"])
    with pytest.raises(FxsparseError):
        fxsparse.compile(model, torch.randn(2, 4, 32, 32), ["ShapeInference"])
    assert_untouched(model, before, ids)
    assert model.training
