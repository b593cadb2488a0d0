"""The op-rule table, one rule kind at a time, on tiny graphs: which channels are tied, fixed or factored, and that
each graph then shrinks exactly (random half of its units removed, constants folded)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_shrinks_exactly, channel_facts, random_unit_masks, randomize_constants

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = torch.randn(2, 3, 8, 8)


def groups_of(facts, target: str, dim: int) -> list:
    """The groups a parameter dimension belongs to (none: it is fixed)."""
    return [g for g in facts.groups if (target, dim) in g.members]


def components(facts, target: str, dim: int) -> torch.Tensor:
    """The component (which channels go together) of each index of a parameter dimension."""
    analysis = facts.analysis
    return analysis.component[facts.graph.members[(target, dim)].labels]


def check_shrinks(model: nn.Module, example=IMAGE, **options):
    model = randomize_constants(model.eval())
    facts = channel_facts(model, example, **options)
    return assert_shrinks_exactly(model, example, random_unit_masks(facts), **options)


def conv_bn(c_in: int, c_out: int, **conv_options) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, **conv_options), nn.BatchNorm2d(c_out), nn.ReLU())


# -- elementwise: ties --------------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body, self.head = conv_bn(3, 8), conv_bn(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.body(x))


def test_residual_add_ties_the_stream():
    facts = channel_facts(Residual(), IMAGE)
    stream = groups_of(facts, "stem.0.weight", 0)
    assert len(stream) == 1 and stream[0].size == 8
    for member in [("body.0.weight", 0), ("body.0.weight", 1), ("body.1.running_mean", 0), ("head.weight", 1)]:
        assert member in stream[0].members
    assert torch.equal(components(facts, "stem.0.weight", 0), components(facts, "body.0.weight", 0))
    check_shrinks(Residual())


class GatedHalves(nn.Module):
    """chunk along channels, then the halves multiplied: index k of one half goes with index k of the other."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.out(a * torch.sigmoid(b))


def test_chunk_offsets_and_elementwise_tie_across_halves():
    facts = channel_facts(GatedHalves(), IMAGE)
    produced = components(facts, "conv.weight", 0)
    assert torch.equal(produced[:4], produced[4:])
    assert torch.equal(produced[:4], components(facts, "out.weight", 1))
    assert groups_of(facts, "conv.weight", 0)[0].size == 4
    result = check_shrinks(GatedHalves())
    assert result.module.conv.out_channels == 4 and result.module.out.in_channels == 2


# -- normalisation and reductions: fixes ---------------------------------------------------------------------------
class LinearNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.mid, self.down = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.down(F.gelu(self.mid(self.norm(self.up(x)))))


def test_layer_norm_fixes_what_it_normalises():
    facts = channel_facts(LinearNorm(), torch.randn(2, 5, 6))
    assert groups_of(facts, "up.weight", 0) == []
    assert groups_of(facts, "norm.weight", 0) == []
    assert [g.size for g in groups_of(facts, "mid.weight", 0)] == [12]
    assert groups_of(facts, "down.weight", 0) == []  # reaches the output
    result = check_shrinks(LinearNorm(), torch.randn(2, 5, 6))
    assert result.module.mid.out_features == 6 and result.module.norm.normalized_shape == (16,)


class ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        over_channels = self.a(x).mean(dim=1, keepdim=True)  # mixes channels: fixed
        over_space = self.b(x).mean(dim=(2, 3))  # per channel: prunable
        return self.out(over_space) + over_channels.flatten(1).sum(1, keepdim=True)


def test_reduction_fixes_only_a_reduced_channel_dim():
    facts = channel_facts(ChannelMean(), IMAGE)
    assert groups_of(facts, "a.weight", 0) == []
    assert [g.size for g in groups_of(facts, "b.weight", 0)] == [8]
    check_shrinks(ChannelMean())


class SoftmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.softmax(self.conv(x), dim=1))


def test_softmax_over_channels_fixes_them():
    facts = channel_facts(SoftmaxOverChannels(), IMAGE)
    assert groups_of(facts, "conv.weight", 0) == [] and facts.groups == []


# -- joins and cuts: offsets -------------------------------------------------------------------------------------
class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = conv_bn(3, 4), conv_bn(3, 6), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1))


def test_cat_puts_each_input_at_its_offset():
    facts = channel_facts(Concat(), IMAGE)
    consumed = components(facts, "out.weight", 1)
    assert torch.equal(consumed[:4], components(facts, "a.0.weight", 0))
    assert torch.equal(consumed[4:], components(facts, "b.0.weight", 0))
    joined, = groups_of(facts, "out.weight", 1)  # one consumer of both: one group, each channel its own unit
    assert joined.size == 10 and {("a.0.weight", 0), ("b.0.weight", 0)} <= set(joined.producers)
    result = check_shrinks(Concat())
    assert result.module.out.in_channels == 2 + 3


class SliceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x)[:, 1:6])


def test_slice_keeps_the_slices_labels():
    facts = channel_facts(SliceChannels(), IMAGE)
    assert torch.equal(components(facts, "conv.weight", 0)[1:6], components(facts, "out.weight", 1))
    check_shrinks(SliceChannels())


# -- reshapes: repeats and factors ------------------------------------------------------------------------------
class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features, self.fc = conv_bn(3, 4), nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 2), 1))


def test_flatten_then_linear_repeats_each_channel_over_space():
    facts = channel_facts(FlattenHead(), IMAGE)
    expected = components(facts, "features.0.weight", 0).repeat_interleave(4)
    assert torch.equal(components(facts, "fc.weight", 1), expected)
    result = check_shrinks(FlattenHead())
    assert result.module.fc.in_features == 2 * 4


class Heads(nn.Module):
    """Self-attention written out: view into heads, transpose, matmul, softmax, matmul, merge heads."""

    def __init__(self, dim: int = 16, heads: int = 4, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d)) + x


@pytest.mark.parametrize("fused", [False, True], ids=["matmul", "sdpa"])
def test_view_into_heads_factors_channels_into_heads_and_head_dims(fused):
    tokens = torch.randn(2, 5, 16)
    facts = channel_facts(Heads(fused=fused), tokens)
    kinds = sorted((g.kind, g.size) for g in facts.groups)
    assert kinds == [("heads/groups", 4), ("per-head dims", 4), ("per-head dims", 4)]
    heads = next(g for g in facts.groups if g.kind == "heads/groups")
    for member in [("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)]:
        assert member in heads.members
    qk_dims = [g for g in groups_of(facts, "q.weight", 0) if g.kind == "per-head dims"]
    assert len(qk_dims) == 1 and ("k.weight", 0) in qk_dims[0].members and ("v.weight", 0) not in qk_dims[0].members
    result = check_shrinks(Heads(fused=fused), tokens)
    assert result.module.q.out_features % 2 == 0 and result.module.q.out_features < 16


def test_view_into_heads_shrinks_by_whole_heads():
    model = randomize_constants(Heads().eval())
    tokens = torch.randn(2, 5, 16)
    dropped_head = torch.ones(16, dtype=torch.bool)
    dropped_head[4:8] = False  # head 1 of 4, in q, k and v
    masks = {name: dropped_head for name in ("q", "k", "v")}
    result = assert_shrinks_exactly(model, tokens, masks)
    assert result.module.q.out_features == result.module.v.out_features == 12
    assert result.module.o.in_features == 12


class ChannelsLastMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 8, 1), nn.Linear(8, 6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_permute_moves_labels_with_their_dim():
    facts = channel_facts(ChannelsLastMLP(), IMAGE)
    assert torch.equal(components(facts, "conv.weight", 0), components(facts, "fc.weight", 1))
    assert torch.equal(components(facts, "fc.weight", 0), components(facts, "out.weight", 1))
    check_shrinks(ChannelsLastMLP())


# -- convolutions: depthwise and grouped -------------------------------------------------------------------------
class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.dw, self.project = conv_bn(3, 8), conv_bn(8, 8, groups=8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(self.dw(self.expand(x)))


def test_depthwise_conv_ties_its_input_to_its_output():
    facts = channel_facts(Depthwise(), IMAGE)
    assert torch.equal(components(facts, "expand.0.weight", 0), components(facts, "dw.0.weight", 0))
    assert torch.equal(components(facts, "dw.0.weight", 0), components(facts, "project.weight", 1))
    result = check_shrinks(Depthwise())
    dw = result.module.get_submodule("dw.0")
    assert dw.groups == dw.in_channels == dw.out_channels == 4


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.grouped, self.out = conv_bn(3, 8), conv_bn(8, 12, groups=2), nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(self.grouped(self.stem(x)))


def test_grouped_conv_factors_channels_into_groups():
    facts = channel_facts(Grouped(), IMAGE)
    kinds = sorted((g.kind, g.size) for g in groups_of(facts, "stem.0.weight", 0))
    assert kinds == [("heads/groups", 2), ("per-head dims", 4)]  # 2 conv groups x 4 input channels each
    conv_groups = next(g for g in facts.groups if g.kind == "heads/groups")
    assert ("grouped.0.weight", 0) in conv_groups.members
    result = check_shrinks(Grouped())
    conv = result.module.get_submodule("grouped.0")
    assert conv.groups == 1 and conv.in_channels == 2


def test_whole_conv_groups_are_removed_together():
    model = randomize_constants(Grouped().eval())
    second_group = torch.ones(12, dtype=torch.bool)
    second_group[6:] = False
    stem_second_half = torch.ones(8, dtype=torch.bool)
    stem_second_half[4:] = False
    masks = {"grouped.0": second_group, "stem.0": stem_second_half}
    result = assert_shrinks_exactly(model, IMAGE, masks)
    conv = result.module.get_submodule("grouped.0")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (1, 4, 6)


# -- ops without a rule: barriers ---------------------------------------------------------------------------------
class Mystery(nn.Module):
    """A module the rule table has never heard of (kept whole as a leaf)."""

    def forward(self, x):
        return x.flip(1)


class WithUnknownOps(nn.Module):
    def __init__(self, leaf: bool):
        super().__init__()
        self.leaf = leaf
        self.a, self.mystery, self.b, self.out = conv_bn(3, 8), Mystery(), conv_bn(8, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.mystery(self.a(x)) if self.leaf else torch.flip(self.a(x), [1])
        return self.out(self.b(x))


@pytest.mark.parametrize("leaf", [True, False], ids=["module", "function"])
def test_an_op_without_a_rule_is_a_barrier_named_in_the_report(leaf):
    options = {"leaf_modules": [Mystery]} if leaf else {}
    model = randomize_constants(WithUnknownOps(leaf).eval())
    facts = channel_facts(model, IMAGE, **options)
    barrier, = facts.graph.barriers
    assert barrier.op == ("mystery" if leaf else "flip") and barrier.reason == "no rule for this op"
    assert groups_of(facts, "a.0.weight", 0) == []  # channels into the barrier are fixed
    assert [g.size for g in groups_of(facts, "b.0.weight", 0)] == [8]  # downstream of it is prunable
    result = assert_shrinks_exactly(model, IMAGE, random_unit_masks(facts), **options)
    rows = result.report.pass_record("DependencyGroups").rows
    assert any(row["group"] == "barrier" and row["kind"] == barrier.op for row in rows)
    assert result.module.get_submodule("b.0").out_channels == 4
