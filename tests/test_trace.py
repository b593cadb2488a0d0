"""Tracing: every torchvision classification model with both frontends, Hugging Face models, and failures.

The sweep builds each torchvision model on the ``meta`` device: no weights are allocated or initialised, so tracing
and shape inference cost the same for vit_h_14 as for resnet18 and use no real memory. Outputs are compared with
the eager model on real random weights for a few representative models.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.fx as fx
import torchvision
from torchvision.models import get_model, list_models

import fxsparse
from fxsparse.errors import TraceError
from fxsparse.graph_utils import tensor_value
from fxsparse.models import BUILTIN_MODELS, build
from fxsparse.passes.shape_inference import propagate_shapes

from conftest import main_output, tiny_hf_model

TORCHVISION_MODELS = list_models(module=torchvision.models)

# The smallest input side each model accepts (default 32): ViT and MaxViT are built for 224 only, alexnet's and
# inception's pooling stacks need more than 32.
INPUT_SIDE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224} | {
    name: 224 for name in TORCHVISION_MODELS if name.startswith("vit_")
}

# Every architecture family of the zoo, by name prefix, and the member the default export sweep traces. Members of
# a family run the same code at other widths and depths. Symbolic tracing is swept over every model (about half a
# second each); torch.export costs 2-16 s a model on 2 cores (the full 80-model sweep takes 4-6 minutes), so by
# default it is swept over one member per family. FXSPARSE_FULL_SWEEP=1 exports every model.
FAMILIES = {
    "alexnet": "alexnet", "convnext_": "convnext_tiny", "densenet": "densenet121", "efficientnet_b": "efficientnet_b0",
    "efficientnet_v2_": "efficientnet_v2_s", "googlenet": "googlenet", "inception_v3": "inception_v3",
    "maxvit_": "maxvit_t", "mnasnet": "mnasnet0_5", "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_": "mobilenet_v3_small", "regnet_x_": "regnet_x_400mf", "regnet_y_": "regnet_y_400mf",
    "resnet": "resnet50", "resnext": "resnext50_32x4d", "wide_resnet": "wide_resnet50_2",
    "shufflenet_v2_": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "swin_v2_": "swin_v2_t", "swin_": "swin_t",
    "vgg": "vgg11_bn", "vit_": "vit_b_32",
}
FULL_SWEEP = os.environ.get("FXSPARSE_FULL_SWEEP") == "1"
EXPORT_SWEEP = TORCHVISION_MODELS if FULL_SWEEP else sorted(set(FAMILIES.values()) | {"resnet18", "squeezenet1_0"})


def family(name: str) -> str:
    """The longest family prefix of ``name``."""
    return max((prefix for prefix in FAMILIES if name.startswith(prefix)), key=len, default="")


# Models a frontend cannot trace, with the reason. Empty today: every torchvision model traces with both
# (the full export sweep was run with FXSPARSE_FULL_SWEEP=1).
EXPECTED_FAILURES: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def regnet_block_params_on_cpu():
    """RegNet computes its block widths with torch ops (then .tolist()) in its constructor; under
    ``torch.device("meta")`` those tensors have no values, so that one computation runs on the CPU."""
    from torchvision.models import regnet

    original = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = classmethod(original)


def build_on_meta(name: str) -> torch.nn.Module:
    with regnet_block_params_on_cpu(), torch.device("meta"):
        return get_model(name)


def image(name: str, device: str = "meta") -> torch.Tensor:
    side = INPUT_SIDE.get(name, 32)
    return torch.randn(1, 3, side, side, device=device)


def sweep_params(frontend: str, names: list[str]):
    params = []
    for name in names:
        reason = EXPECTED_FAILURES.get((name, frontend))
        marks = [pytest.mark.xfail(reason=reason, strict=True, raises=TraceError)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def test_list_is_the_whole_classification_zoo():
    assert len(TORCHVISION_MODELS) >= 80
    assert {"resnet18", "vit_b_16", "swin_v2_b", "regnet_y_128gf", "maxvit_t"} <= set(TORCHVISION_MODELS)


def test_every_model_belongs_to_an_exported_family():
    """A new architecture in torchvision fails here until it is given a family (and so an export test)."""
    assert [name for name in TORCHVISION_MODELS if not family(name)] == []
    assert set(FAMILIES.values()) <= set(TORCHVISION_MODELS)
    assert all(family(rep) == prefix for prefix, rep in FAMILIES.items())
    assert set(FAMILIES.values()) <= set(EXPORT_SWEEP)


@pytest.mark.parametrize("name", sweep_params("symbolic", TORCHVISION_MODELS))
def test_torchvision_symbolic_on_meta(name):
    model = build_on_meta(name)
    traced = fxsparse.trace(model, image(name), frontend="symbolic")
    assert traced.frontend == "symbolic"
    assert any(n.op == "call_module" for n in traced.module.graph.nodes)  # nn.Modules stay whole
    assert propagate_shapes(traced.module, traced.args, traced.kwargs) == "meta"
    out = tensor_value(output_node(traced.module).args[0])
    assert out is not None and tuple(out.shape) == (1, 1000) and out.device.type == "meta"
    assert all(p.device.type == "meta" for p in traced.module.parameters())


@pytest.mark.parametrize("name", sweep_params("export", EXPORT_SWEEP))
def test_torchvision_export_on_meta(name):
    model = build_on_meta(name)
    traced = fxsparse.trace(model, image(name), frontend="export")
    assert traced.frontend == "export"
    nodes = list(traced.module.graph.nodes)
    assert any(n.op == "call_function" and "aten" in str(n.target) for n in nodes)
    assert propagate_shapes(traced.module, traced.args, traced.kwargs) == "meta"
    out = tensor_value(output_node(traced.module).args[0][0])
    assert out is not None and tuple(out.shape) == (1, 1000)


def test_auto_prefers_symbolic_for_torchvision():
    traced = fxsparse.trace(build_on_meta("resnet18"), image("resnet18"))
    assert traced.frontend == "symbolic" and traced.notes == []


# ------------------------------------------------------------------------------------- outputs equal the eager ones

def tiny_swin() -> torch.nn.Module:
    """torchvision's Swin Transformer code (shifted windows, relative position bias) at a tiny width and depth."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4])


EAGER_MODELS = {
    "resnet18": lambda: get_model("resnet18"),
    "mobilenet_v3_small": lambda: get_model("mobilenet_v3_small"),  # squeeze-excite, hardswish
    "squeezenet1_1": lambda: get_model("squeezenet1_1"),  # concatenation
    "shufflenet_v2_x0_5": lambda: get_model("shufflenet_v2_x0_5"),  # channel shuffle, chunk
    "swin_tiny_config": tiny_swin,  # attention, window partition, roll
}


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
@pytest.mark.parametrize("name", list(EAGER_MODELS))
def test_torchvision_traced_equals_eager(name, frontend):
    torch.manual_seed(0)
    model = EAGER_MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    traced = fxsparse.trace(model, x, frontend=frontend)
    with torch.no_grad():
        expected, got = model(x), traced(x)
    if frontend == "symbolic":  # the same modules run in the same order: bit for bit
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_traced_equals_eager(name, frontend):
    torch.manual_seed(0)
    model, x = build(name)
    traced = fxsparse.trace(model, x, frontend=frontend)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- Hugging Face: auto -> export


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_auto_falls_back_to_export(kind):
    model, inputs = tiny_hf_model(kind)
    traced = fxsparse.trace(model, inputs, frontend="auto")
    assert traced.frontend == "export"
    assert traced.notes and "fell back to export" in traced.notes[0] and "symbolic" in traced.notes[0]
    with torch.no_grad():
        expected, got = main_output(model(**inputs)), main_output(traced(**inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # fresh inputs of the same shapes, not only the ones traced with
    fresh = {k: v.flip(-1).contiguous() for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(main_output(traced(**fresh)), main_output(model(**fresh)), rtol=1e-5, atol=1e-5)


def test_llama_uses_grouped_query_attention():
    model, _ = tiny_hf_model("llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    k_proj = model.model.layers[0].self_attn.k_proj
    q_proj = model.model.layers[0].self_attn.q_proj
    assert k_proj.out_features < q_proj.out_features


def test_hugging_face_keyword_inputs_with_mask_variation():
    model, inputs = tiny_hf_model("bert")
    traced = fxsparse.trace(model, inputs)
    masked = dict(inputs, attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(traced(**masked)), main_output(model(**masked)), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------------------------- failures


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor's value: symbolic tracing cannot branch on a Proxy, export cannot on a
    fake tensor."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_two_frontend_failure_message():
    with pytest.raises(TraceError) as caught:
        fxsparse.trace(DataDependent(), torch.randn(3))
    message = str(caught.value)
    lines = message.splitlines()
    assert 3 <= len(lines) <= 6, message
    assert lines[0] == "could not trace DataDependent:"
    assert lines[1].strip().startswith("symbolic:") and lines[2].strip().startswith("export:")
    for hint in ("leaf_modules", "concrete_args", "wrap"):
        assert hint in message
    assert all(len(line) < 400 for line in lines)


def test_single_frontend_failure_names_only_it():
    with pytest.raises(TraceError) as caught:
        fxsparse.trace(DataDependent(), torch.randn(3), frontend="symbolic")
    assert "symbolic:" in str(caught.value) and "export:" not in str(caught.value)


def test_leaf_modules_and_concrete_args_rescue_symbolic_tracing():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.gate = DataDependent()

        def forward(self, x, flip: bool = False):
            y = self.gate(self.lin(x))
            return -y if flip else y

    x = torch.randn(2, 3)
    with pytest.raises(TraceError):
        fxsparse.trace(Net(), x, frontend="symbolic")
    with pytest.raises(TraceError):  # the bool argument is still a Proxy
        fxsparse.trace(Net(), x, frontend="symbolic", leaf_modules=[DataDependent])
    traced = fxsparse.trace(Net(), x, frontend="symbolic", leaf_modules=[DataDependent], concrete_args={"flip": False})
    assert [n.target for n in traced.module.graph.nodes if n.op == "call_module"] == ["lin", "gate"]
    net = Net()
    traced = fxsparse.trace(net, x, frontend="symbolic", leaf_modules=["gate"], concrete_args={"flip": True})
    torch.testing.assert_close(traced(x), net(x, flip=True))


def test_trace_does_not_touch_the_model():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxsparse.trace(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
