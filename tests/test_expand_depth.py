"""ExpandDepth: copies of repeated blocks inserted so that the grown model computes what the model did, on real
families; the copies train; the plan replays the growth on a fresh instance."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

import fxsparse
from fxsparse import passes
from fxsparse.growth import apply_growth
from fxsparse.inputs import inputs_like, normalize_example_inputs
from fxsparse.metrics import count_parameters

from conftest import main_output, tiny_hf_model


def torchvision_model(kind: str):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)
    if kind == "resnet18":
        return torchvision.models.resnet18(num_classes=10).eval(), image
    if kind == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10).eval(), image
    if kind == "convnext":
        return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10).eval(), image
    if kind == "vit":
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                  num_classes=10)
        nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: outputs would all be zero
        return model.eval(), image
    raise ValueError(kind)


def grow(model, example, **options):
    args, kwargs = normalize_example_inputs(example)
    return fxsparse.compile(model, args, [passes.ExpandDepth(**options)], example_kwargs=kwargs, tolerance=1e-5)


def relative_error(reference, candidate, example) -> float:
    args, kwargs = inputs_like(*normalize_example_inputs(example), torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = main_output(reference(*args, **kwargs)), main_output(candidate(*args, **kwargs))
    assert expected.abs().max() > 0
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", ["resnet18", "mobilenet_v2", "convnext", "vit", "bert", "gpt2", "llama"])
def test_grown_model_computes_what_the_model_did(kind, one_thread):
    model, example = tiny_hf_model(kind) if kind in ("bert", "gpt2", "llama") else torchvision_model(kind)
    result = grow(model, example)
    grown = result.plan.extra["growth"]
    assert grown and all(any(isinstance(e, dict) for e in record["layout"]) for record in grown)
    assert count_parameters(result.module) > count_parameters(model)
    assert relative_error(model, result.module, example) <= 1e-5


def test_post_norm_bert_moves_the_norm_affine_into_the_copy(one_thread):
    model, example = tiny_hf_model("bert")
    with torch.no_grad():  # a non-trivial affine, so that moving it matters
        for layer in model.encoder.layer:
            layer.output.LayerNorm.weight.uniform_(0.5, 2.0)
            layer.output.LayerNorm.bias.uniform_(-1.0, 1.0)
    result = grow(model, example, factor=2, placement="stack")
    state = result.module.state_dict()
    # the last copy ends with block 1's old affine, block 1 itself now hands on the normalised value
    assert torch.equal(state["encoder.layer.3.output.LayerNorm.weight"], model.encoder.layer[1].output.LayerNorm.weight)
    assert torch.equal(state["encoder.layer.1.output.LayerNorm.weight"], torch.ones(32))
    assert relative_error(model, result.module, example) <= 1e-5


def test_copies_train_and_the_plan_replays_on_a_fresh_instance(one_thread):
    model, example = tiny_hf_model("gpt2")
    result = grow(model, example, factor=1.5, placement="stack")
    fresh, _ = tiny_hf_model("gpt2")
    apply_growth(fresh, result.plan)
    assert fresh.config.n_layer == 3 and len(fresh.transformer.h) == 3
    fresh.load_state_dict(result.module.state_dict(), strict=False)
    assert set(fresh.state_dict()) >= {name for name, _ in result.module.named_parameters()}
    assert relative_error(model, fresh.eval(), example) <= 1e-5

    grown = result.module.train()
    new_projection = dict(grown.named_parameters())["transformer.h.2.mlp.c_proj.weight"]
    assert new_projection.abs().max() == 0
    loss = main_output(grown(**example)).logsumexp(-1).mean()
    loss.backward()
    assert new_projection.grad is not None and new_projection.grad.abs().max() > 0
    torch.optim.SGD(grown.parameters(), lr=0.1).step()
    assert new_projection.abs().max() > 0


def test_inplace_grows_the_users_own_module_list(one_thread):
    model, example = torchvision_model("resnet18")
    reference = torchvision_model("resnet18")[0]
    result = fxsparse.compile(model, example, [passes.ExpandDepth(containers=["layer1"])], inplace=True)
    assert len(model.layer1) == 4 and isinstance(model.layer1, nn.Sequential)
    assert count_parameters(model) == count_parameters(result.module)
    assert relative_error(reference, model, example) <= 1e-5


def test_blocks_without_residual_are_reported_not_changed(one_thread):
    block = lambda: nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1))  # noqa: E731
    model = nn.Sequential(nn.Conv2d(3, 8, 1), block(), block(), block(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    result = grow(model, torch.randn(1, 3, 4, 4))
    rows = result.report.records[-1].rows
    assert "growth" not in result.plan.extra
    assert any("no residual connection" in row["status"] for row in rows)


def test_bad_options_are_one_line_errors():
    with pytest.raises(fxsparse.BadArgumentError, match="factor"):
        passes.ExpandDepth(factor=1)
    with pytest.raises(fxsparse.BadArgumentError, match="placement"):
        passes.ExpandDepth(placement="sideways")
    model, example = torchvision_model("resnet18")
    with pytest.raises(fxsparse.BadArgumentError, match="containers"):
        grow(model, example, containers=["layer9"])
