"""nn.MultiheadAttention, lowered (fxsparse.lower) into linear projections, views into heads and scaled dot-product
attention so that its heads prune: lowering alone changes no output; a call it cannot lower stays whole, with the
reason in the report; torchvision's ViT loses whole heads exactly, through masks, Prune, iterative Prune, save and
load; and in-place compiles and plans keep the module whole, so they still map onto the user's own model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.modules import LoweredMultiheadAttention
from fxsparse.passes import Prune, Shrink

from conftest import assert_shrinks_exactly, channel_facts, random_unit_masks, randomize_constants

pytestmark = pytest.mark.usefixtures("one_thread")

torchvision = pytest.importorskip("torchvision")

E, HEADS, SEQ, BATCH = 16, 4, 5, 2  # head_dim 4
KDIM, VDIM = 6, 10


class Attention(nn.Module):
    """A linear layer, one nn.MultiheadAttention called as ``call`` says, a linear head.

    "self": self-attention with need_weights=False; "cross": key and value from other inputs, only output [0] read;
    "bool mask" / "float mask": a causal attn_mask; "weights used": both outputs returned; "padding": a
    key_padding_mask."""

    def __init__(self, call: str = "self", batch_first: bool = True, **options):
        super().__init__()
        self.call = call
        self.embed = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **options)
        self.head = nn.Linear(E, 3)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        self.register_buffer("bool_mask", causal)
        self.register_buffer("float_mask", torch.zeros(SEQ, SEQ).masked_fill(causal, float("-inf")))

    def forward(self, x, key=None, value=None, padding=None):
        x = self.embed(x)
        if self.call == "cross":
            return self.head(self.attn(x, key, value)[0])
        if self.call == "weights used":
            out, weights = self.attn(x, x, x)
            return self.head(out), weights
        options = {"bool mask": {"attn_mask": self.bool_mask}, "float mask": {"attn_mask": self.float_mask},
                   "padding": {"key_padding_mask": padding}}.get(self.call, {})
        out, _ = self.attn(x, x, x, need_weights=False, **options)
        return self.head(out)


def inputs_for(model: Attention, seed: int = 0) -> tuple:
    """Random inputs in the module's layout ([batch, seq, dim] or [seq, batch, dim])."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(dim: int) -> torch.Tensor:
        shape = (BATCH, SEQ, dim) if model.attn.batch_first else (SEQ, BATCH, dim)
        return torch.randn(*shape, generator=generator)

    x = tensor(E)
    if model.call == "cross":
        return x, tensor(model.attn.kdim), tensor(model.attn.vdim)
    if model.call == "padding":
        return x, None, None, torch.tensor([[False] * SEQ, [False] * (SEQ - 2) + [True] * 2])
    return (x,)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def lowering_rows(result) -> list[dict]:
    return result.report.pass_record("LowerModules").rows


LOWERED = {
    "self, batch first": ("self", True, {}),
    "self, sequence first": ("self", False, {}),
    "cross, kdim and vdim": ("cross", True, {"kdim": KDIM, "vdim": VDIM}),
    "cross, kdim and vdim, sequence first": ("cross", False, {"kdim": KDIM, "vdim": VDIM}),
    "cross, packed weights": ("cross", True, {}),
    "bool mask": ("bool mask", True, {}),
    "float mask, sequence first": ("float mask", False, {}),
    "no bias": ("self", True, {"bias": False}),
    "dropout, in eval": ("self", True, {"dropout": 0.5}),
}


@pytest.mark.parametrize("case", list(LOWERED))
def test_lowering_changes_no_output(case):
    call, batch_first, options = LOWERED[case]
    torch.manual_seed(0)
    model = randomize_constants(Attention(call, batch_first, **options).eval())
    result = fxsparse.compile(model, inputs_for(model))
    row, = lowering_rows(result)
    assert row["module"] == "attn" and row["result"].startswith("lowered into q_proj")
    lowered = result.module
    assert isinstance(lowered.attn, LoweredMultiheadAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in lowered.modules())
    assert lowered.attn.k_proj.in_features == options.get("kdim", E)
    assert lowered.attn.v_proj.in_features == options.get("vdim", E)
    assert result.report.after["parameters"] == result.report.before["parameters"]  # in_proj is gone, not kept
    fresh = inputs_for(model, seed=1)
    with torch.no_grad():
        assert relative_difference(model(*fresh), lowered(*fresh)) < 2e-6


def test_attention_dropout_still_follows_train_and_eval():
    torch.manual_seed(0)
    model = Attention("self", dropout=0.5).eval()
    x, = inputs_for(model)
    lowered = fxsparse.compile(model, x).module
    with torch.no_grad():
        lowered.train()
        assert not torch.allclose(lowered(x), lowered(x))
        lowered.eval()
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-6)


KEPT_WHOLE = {
    "weights used": (Attention("weights used"), "its attention weights are used"),
    "key_padding_mask": (Attention("padding"), "key_padding_mask"),
    "add_bias_kv": (Attention("self", add_bias_kv=True), "add_bias_kv=True"),
    "add_zero_attn": (Attention("self", add_zero_attn=True), "add_zero_attn=True"),
}


@pytest.mark.parametrize("case", list(KEPT_WHOLE))
def test_a_call_that_cannot_be_lowered_stays_whole_and_the_report_says_why(case):
    torch.manual_seed(0)
    model, reason = KEPT_WHOLE[case]
    model = randomize_constants(model.eval())
    example = inputs_for(model)
    result = fxsparse.compile(model, example, ["DependencyGroups"])
    row, = lowering_rows(result)
    assert row["result"].startswith("kept whole") and reason in row["result"]
    assert result.report.pass_record("LowerModules").summary == "lowered 0 of 1 nn.MultiheadAttention"
    assert isinstance(result.module.attn, nn.MultiheadAttention)
    barriers = [r for r in result.report.pass_record("DependencyGroups").rows if r["group"] == "barrier"]
    assert [r["kind"] for r in barriers] == ["attn"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(*example), model(*example))


@pytest.mark.parametrize("call, batch_first, options", [
    ("self", False, {}),
    ("cross", True, {"kdim": KDIM, "vdim": VDIM}),
])
def test_pruning_a_lowered_attention_removes_whole_heads(call, batch_first, options):
    torch.manual_seed(0)
    model = randomize_constants(Attention(call, batch_first, **options).eval())
    result = fxsparse.compile(model, inputs_for(model), [Prune(ratio=0.5), Shrink()])
    assert result.report.pass_record("Shrink").verification["max_rel"] < 1e-4
    attn = result.module.attn
    head_dim = E // HEADS
    assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == 2 * head_dim
    assert attn.out_proj.in_features == 2 * head_dim
    # the channels into and out of the attention go too: linear layers make and read them
    assert attn.q_proj.in_features == attn.out_proj.out_features == E // 2
    assert attn.k_proj.in_features == options.get("kdim", E // 2)  # a model input when kdim is set: kept


# -- torchvision's VisionTransformer ------------------------------------------------------------------------------
IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
VIT_LAYERS = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]


def small_vit(num_heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=num_heads,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    return randomize_constants(model.eval())


def heads_kept(module: nn.Module, path: str, head_dim: int) -> int:
    """How many whole heads the q, k and v projections keep (asserting they agree and the output projection too)."""
    attn = module.get_submodule(path)
    width = attn.q_proj.out_features
    assert attn.k_proj.out_features == attn.v_proj.out_features == attn.out_proj.in_features == width
    assert width % head_dim == 0
    return width // head_dim


def test_vit_random_masks_on_heads_head_dims_and_mlp_shrink_exactly():
    model = small_vit()
    lowered = fxsparse.compile(model, IMAGE).module
    facts = channel_facts(lowered, IMAGE)
    heads = [g for g in facts.groups if g.kind == "heads/groups"]
    assert [g.size for g in heads] == [4, 4]
    assert {(f"{VIT_LAYERS[0]}.q_proj.weight", 0), (f"{VIT_LAYERS[0]}.out_proj.weight", 1)} <= set(heads[0].members)
    # The residual stream (conv_proj, class_token, pos_embedding, out_proj rows...) stays whole: every block's
    # LayerNorm normalises over it, and its statistics would change with any channel removed.
    in_groups = {target for g in facts.groups for target, _ in g.members}
    assert not {"conv_proj.weight", "class_token", "encoder.pos_embedding"} & in_groups
    result = assert_shrinks_exactly(lowered, IMAGE, random_unit_masks(facts))
    removed = [r for r in result.report.pass_record("Shrink").rows if r.get("kind") == "heads/groups"]
    assert [(r["units"], r["removed"]) for r in removed] == [(4, 2), (4, 2)]
    for path in VIT_LAYERS:
        attn = result.module.get_submodule(path)
        assert attn.q_proj.out_features == attn.k_proj.out_features == 2 * 4  # 2 heads x 4 of 8 query/key dims
        assert attn.v_proj.out_features == attn.out_proj.in_features == 2 * 4  # 2 heads x 4 of 8 value dims


def test_vit_prune_removes_half_the_heads_and_the_plan_keeps_whole_heads():
    model = small_vit()
    result = fxsparse.compile(model, IMAGE, [Prune(ratio=0.5), Shrink()])
    report, plan = result.report, result.plan
    assert report.pass_record("LowerModules").summary == "lowered 2 of 2 nn.MultiheadAttention"
    assert report.pass_record("Shrink").verification["max_rel"] < 1e-4
    assert plan.extra["lowered"] == VIT_LAYERS
    for path in VIT_LAYERS:
        assert heads_kept(result.module, path, head_dim=8) == 2
        kept_rows = plan.kept[f"{path}.q_proj.weight"][0]
        assert len(kept_rows) == 16 and len({row // 8 for row in kept_rows}) == 2  # two whole heads
        assert plan.kept[f"{path}.out_proj.weight"][1] == kept_rows
    assert report.after["parameters"] < 0.7 * report.before["parameters"]
    assert report.after["macs"] < 0.7 * report.before["macs"]


def test_vit_iterative_prune_reaches_the_ratio_over_heads():
    model = small_vit(num_heads=8)  # head_dim 4
    result = fxsparse.compile(model, IMAGE, [Prune(ratio=0.5, steps=2), Shrink()])
    for path in VIT_LAYERS:
        assert heads_kept(result.module, path, head_dim=4) == 4  # 8 -> 6 -> 4, not 6 -> 3
    assert all(r.verification["max_rel"] < 1e-4 for r in result.report.records if r.name == "Shrink")


def test_vit_with_pruned_heads_saves_and_loads(tmp_path):
    model = small_vit()
    result = fxsparse.compile(model, IMAGE, [Prune(ratio=0.5), Shrink()])
    loaded = fxsparse.load(result.save(tmp_path / "vit.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGE), result.module(IMAGE), rtol=1e-5, atol=1e-6)
    assert loaded.fxsparse_plan.extra["lowered"] == VIT_LAYERS


def test_vit_in_place_keeps_attention_whole_and_prunes_the_mlp():
    model = small_vit()
    attention = model.encoder.layers[0].self_attention
    result = fxsparse.compile(model, IMAGE, [Prune(ratio=0.5), Shrink()], inplace=True)
    assert model.encoder.layers[0].self_attention is attention and attention.in_proj_weight.shape == (96, 32)
    assert model.encoder.layers[0].mlp[0].out_features == 32
    assert any("2 nn.MultiheadAttention kept whole (inplace=True" in note for note in result.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGE), result.module(IMAGE), rtol=1e-4, atol=1e-5)


def test_vit_plan_applies_to_a_fresh_model_only_without_lowering():
    fresh = small_vit()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    lowered_plan = fxsparse.compile(small_vit(), IMAGE, [Prune(ratio=0.5), Shrink()]).plan
    with pytest.raises(fxsparse.PlanMismatchError, match="lower_modules=False"):
        fxsparse.apply_plan(fresh, lowered_plan)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    result = fxsparse.compile(small_vit(), IMAGE, [Prune(ratio=0.5), Shrink()], lower_modules=False)
    result.plan.apply_to(fresh)
    assert fresh.encoder.layers[1].mlp[0].out_features == 32
    fresh.load_state_dict(result.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGE), result.module(IMAGE), rtol=1e-4, atol=1e-5)
