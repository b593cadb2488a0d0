"""Channel permutation: the index-map rewrite reorders channels without changing any output (any permutation, on
every coupling kind and on real families), and the N:M search keeps more magnitude, deterministically."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxsparse
from conftest import channel_facts, main_output, randomize_constants, tiny_hf_model
from fxsparse.channels import REMOVE, REORDER
from fxsparse.inputs import inputs_like, normalize_example_inputs
from fxsparse.passes import ChannelPermutation
from fxsparse.permutation import nm_kept, search_permutation
from fxsparse.plan import Plan
from fxsparse.rewrite import reindex
from fxsparse.testing import random_reorder
from test_rules import IMAGE, Concat, Depthwise, GatedHalves, Grouped, Heads, LinearNorm, Residual, SliceChannels

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_reorders_exactly(model: nn.Module, example, frontend: str = "auto", seed: int = 0) -> int:
    """Apply a random permutation of every reorderable group through the one rewrite; outputs and parameter shapes
    must not change. Returns how many parameter tensors moved."""
    model = randomize_constants(model.eval())
    traced = fxsparse.trace(model, example, frontend=frontend)
    facts = channel_facts(model, example, frontend=frontend)
    index_map = random_reorder(facts, seed)
    new, gathers = reindex(traced.module, facts, index_map, traced.args, traced.kwargs, Plan())
    args, kwargs = inputs_like(*normalize_example_inputs(example), torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = main_output(model(*args, **kwargs)), main_output(new(*args, **kwargs))
    assert expected.abs().max() > 0
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"a permutation changed the output: relative {error:.2e}"
    shapes_before = {k: v.shape for k, v in traced.module.state_dict().items()}
    assert {k: v.shape for k, v in new.state_dict().items()} == shapes_before
    moved = sum(1 for k, v in new.state_dict().items() if not torch.equal(v, traced.module.state_dict()[k]))
    return moved


@pytest.mark.parametrize("net", [Residual, GatedHalves, Concat, SliceChannels, Depthwise, Grouped, LinearNorm],
                         ids=lambda c: c.__name__)
def test_any_permutation_of_each_coupling_kind_changes_no_output(net):
    example = torch.randn(2, 5, 6) if net is LinearNorm else IMAGE
    assert assert_reorders_exactly(net(), example) > 0


@pytest.mark.parametrize("fused", [False, True])
def test_heads_and_dims_inside_every_head_move_together(fused):
    assert assert_reorders_exactly(Heads(fused=fused), torch.randn(2, 5, 16)) > 0


def test_layer_norm_blocks_removal_but_not_reordering():
    facts = channel_facts(LinearNorm(), torch.randn(2, 5, 6))
    removable = {u for g in facts.groups_for(REMOVE) for u in g.units.tolist()}
    reorderable = {u for g in facts.groups_for(REORDER) for u in g.units.tolist()}
    assert reorderable > removable


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_families_reorder_exactly(kind):
    model, inputs = tiny_hf_model(kind)
    assert assert_reorders_exactly(model, inputs) > 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5", "vit_b_16"])
def test_torchvision_families_reorder_exactly(name):
    torchvision = pytest.importorskip("torchvision")
    options = {"image_size": 32, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 16,
               "mlp_dim": 32} if name == "vit_b_16" else {}
    model = getattr(torchvision.models, name)(**options) if not options else \
        torchvision.models.vision_transformer.VisionTransformer(**options)
    side = 32 if options else 64
    assert assert_reorders_exactly(model, torch.randn(1, 3, side, side)) > 0


def test_search_keeps_more_magnitude_deterministically():
    values = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    first = search_permutation(values, seed=3)
    again = search_permutation(values, seed=3)
    assert torch.equal(first.permutation, again.permutation)
    assert sorted(first.permutation.tolist()) == list(range(64))
    assert first.kept_after == pytest.approx(nm_kept(values.abs()[:, first.permutation], 2, 4))
    assert first.kept_before < first.kept_after < first.bound
    assert first.efficacy > 0.25


def test_pass_permutes_for_two_four_and_reports_each_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    result = fxsparse.compile(model, torch.randn(4, 16), passes=[ChannelPermutation("2:4")])
    rows = result.report.pass_record("ChannelPermutation").rows
    permuted = [r for r in rows if r["result"] == "permuted"]
    assert len(permuted) == 2
    assert all(r["kept after"] > r["kept before"] for r in permuted)
    verification = result.report.pass_record("ChannelPermutation").verification
    assert verification["max_rel"] <= 1e-5
    # the plan records each permutation as a gather of the original indices
    assert sorted(result.plan.kept["0.weight"][0]) == list(range(32))
    assert result.plan.kept["0.weight"][0] != list(range(32))


def test_bad_pattern_is_one_line_error():
    with pytest.raises(fxsparse.BadArgumentError, match="pattern"):
        ChannelPermutation("4:2")
