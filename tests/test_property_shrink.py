"""Property: on any network built from the ops the rule table covers, removing random units shrinks exactly.

Networks are drawn from a small grammar over feature maps [B, C, H, W]: conv (grouped, depthwise, strided) with
BatchNorm and activations, residuals, concats of branches, splits and chunks (gated or re-joined), pooling,
channel shuffles (view/transpose/reshape), squeeze-excitation, and attention over the pixels (view into heads,
transpose, matmul + softmax or F.scaled_dot_product_attention, grouped-query included), ending in a flatten or a
mean and a linear layer. Random units are removed (masks built from the analysis) and the shrunk model must match
the masked one with the same output shape. Bugs it found live on as regression tests at the end of this file.

More examples: FXSPARSE_PROPERTY_EXAMPLES=500 python -m pytest tests/test_property_shrink.py
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_shrinks_exactly, channel_facts, random_unit_masks, randomize_constants

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("FXSPARSE_PROPERTY_EXAMPLES", "40"))
SIDE = 8
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "none": nn.Identity}
channels = st.integers(2, 12)


# -- blocks: each maps [B, C, H, W] to [B, C', H', W'] ----------------------------------------------------------------
def conv_block(draw, c: int, side: int, out: int | None = None, stride: int | None = None):
    """conv (maybe grouped or depthwise, strided, biased) + maybe BatchNorm + an activation."""
    out = draw(channels) if out is None else out
    grouping = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = 1
    if grouping == "depthwise" and out == c:
        groups = c
    elif grouping == "grouped":
        common = [g for g in (2, 3, 4) if c % g == 0 and out % g == 0]
        groups = draw(st.sampled_from(common)) if common else 1
    kernel = draw(st.sampled_from([1, 3]))
    stride = (draw(st.sampled_from([1, 2])) if side >= 4 else 1) if stride is None else stride
    norm = draw(st.booleans())
    layers = [nn.Conv2d(c, out, kernel, stride, kernel // 2, groups=groups, bias=not norm or draw(st.booleans()))]
    if norm:
        layers.append(nn.BatchNorm2d(out))
    layers.append(ACTIVATIONS[draw(st.sampled_from(list(ACTIVATIONS)))]())
    return nn.Sequential(*layers), out, (side + stride - 1) // stride if kernel == 3 or stride == 1 else side // 2


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def residual(draw, c: int, side: int):
    body = [conv_block(draw, c, side, out=c, stride=1)[0] for _ in range(draw(st.integers(1, 2)))]
    return Residual(nn.Sequential(*body)), c, side


class Concat(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def concat(draw, c: int, side: int):
    branches, total = [], 0
    for _ in range(draw(st.integers(2, 3))):
        kind = draw(st.sampled_from(["conv", "identity", "max_pool"]))
        if kind == "conv":
            branch, out, _ = conv_block(draw, c, side, stride=1)
        else:
            branch, out = (nn.Identity() if kind == "identity" else nn.MaxPool2d(3, 1, 1)), c
        branches.append(branch)
        total += out
    return Concat(branches), total, side


class SplitJoin(nn.Module):
    """Cut the channels (chunk or uneven split), process the pieces, join them (gate, add or cat)."""

    def __init__(self, sizes: list[int], branches: list[nn.Module], join: str):
        super().__init__()
        self.sizes, self.join = sizes, join
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        pieces = x.chunk(2, dim=1) if self.join == "gate" else torch.split(x, self.sizes, dim=1)
        a, b = (branch(piece) for branch, piece in zip(self.branches, pieces))
        if self.join == "gate":
            return a * torch.sigmoid(b)
        return a + b if self.join == "add" else torch.cat([a, b], dim=1)


def split_join(draw, c: int, side: int):
    join = draw(st.sampled_from(["gate", "add", "cat"] if c % 2 == 0 else ["add", "cat"]))
    first = c // 2 if join == "gate" else draw(st.integers(1, c - 1))
    sizes = [first, c - first]
    out = draw(channels)
    branches, outs = [], []
    for size in sizes:
        branch, branch_out, _ = conv_block(draw, size, side, out=out if join != "cat" else None, stride=1)
        branches.append(branch)
        outs.append(branch_out)
    return SplitJoin(sizes, branches, join), sum(outs) if join == "cat" else out, side


class Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, 3, 1, 1)
        if self.kind == "avg":
            return F.avg_pool2d(x, 3, 1, 1)  # zero padding counted: constants vary at the borders
        return F.adaptive_avg_pool2d(x, x.shape[-1] // 2)


def pool(draw, c: int, side: int):
    kind = draw(st.sampled_from(["max", "avg", "adaptive"] if side >= 4 else ["max", "avg"]))
    return Pool(kind), c, side // 2 if kind == "adaptive" else side


class Shuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def shuffle(draw, c: int, side: int):
    divisors = [g for g in (2, 3, 4) if c % g == 0 and c > g]
    return (Shuffle(draw(st.sampled_from(divisors))) if divisors else nn.Identity()), c, side


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.reduce, self.expand = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
        return x * scale[:, :, None, None]


def squeeze_excite(draw, c: int, side: int):
    return SqueezeExcite(c, draw(st.integers(1, 6))), c, side


class PixelAttention(nn.Module):
    """Attention over the H*W pixels as tokens; k/v may have fewer heads than q (grouped-query attention)."""

    def __init__(self, c: int, heads: int, kv_heads: int, head_dim: int, fused: bool, norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.fused = heads, kv_heads, head_dim, fused
        self.norm = nn.LayerNorm(c) if norm else nn.Identity()
        self.q = nn.Linear(c, heads * head_dim)
        self.k, self.v = nn.Linear(c, kv_heads * head_dim), nn.Linear(c, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, c)

    def split(self, t, heads: int):
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)

    def repeat_kv(self, t):
        b, kv, n, d = t.shape
        repeats = self.heads // self.kv_heads
        return t[:, :, None].expand(b, kv, repeats, n, d).reshape(b, kv * repeats, n, d)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm(tokens)
        q = self.split(self.q(normed), self.heads)
        k, v = self.split(self.k(normed), self.kv_heads), self.split(self.v(normed), self.kv_heads)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.kv_heads)
        else:
            k, v = self.repeat_kv(k), self.repeat_kv(v)
            out = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ v
        out = self.o(out.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim))
        return (tokens + out).transpose(1, 2).reshape(b, c, h, w)


def attention(draw, c: int, side: int):
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    module = PixelAttention(c, heads, kv_heads, draw(st.integers(2, 4)), draw(st.booleans()), draw(st.booleans()))
    return module, c, side


BLOCKS = {"conv": conv_block, "residual": residual, "concat": concat, "split": split_join, "pool": pool,
          "shuffle": shuffle, "se": squeeze_excite, "attention": attention}


class Head(nn.Module):
    def __init__(self, c: int, side: int, kind: str, classes: int):
        super().__init__()
        self.kind = kind
        features = {"flatten": c * side * side, "pool_flatten": c * min(side, 2) ** 2, "mean": c}[kind]
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        if self.kind == "flatten":
            return self.fc(x.reshape(x.shape[0], -1))
        if self.kind == "pool_flatten":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, min(x.shape[-1], 2)), 1))
        return self.fc(x.mean((2, 3)))


def build_network(draw) -> nn.Module:
    stem, c, side = conv_block(draw, 3, SIDE, stride=1)
    layers = [stem]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(list(BLOCKS)))
        if kind == "split" and c < 2:
            continue
        block, c, side = BLOCKS[kind](draw, c, side)
        layers.append(block)
    head = Head(c, side, draw(st.sampled_from(["flatten", "pool_flatten", "mean"])), draw(st.integers(2, 5)))
    return nn.Sequential(*layers, head)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_networks_shrink_exactly(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="weights seed"))
    model = randomize_constants(build_network(data.draw).eval(), seed=data.draw(st.integers(0, 99)))
    image = torch.randn(2, 3, SIDE, SIDE)
    facts = channel_facts(model, image)
    fraction = data.draw(st.sampled_from([0.25, 0.5, 0.75]), label="fraction removed")
    masks = random_unit_masks(facts, fraction, seed=data.draw(st.integers(0, 99), label="units seed"))
    assert_shrinks_exactly(model, image, masks)


# -- regressions: networks the property found bugs in ------------------------------------------------------------
def test_regression_sdpa_with_grouped_query_heads_folds_removed_head_dims():
    """Measuring what removed q/k head-dims add to the scores multiplied q by k with fewer heads (crashed)."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
    model = randomize_constants(nn.Sequential(stem, PixelAttention(2, 4, 2, 4, fused=True, norm=False),
                                              Head(2, SIDE, "flatten", 2)).eval())
    image = torch.randn(2, 3, SIDE, SIDE)
    assert_shrinks_exactly(model, image, random_unit_masks(channel_facts(model, image), 0.25))


class TwiceConcatenated(nn.Module):
    """Each stem channel reaches the grouped conv twice, once in each of its groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(4, 2, 1, groups=2), nn.ReLU())
        self.head = Head(2, SIDE, "flatten", 2)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.grouped(torch.cat([x, x], dim=1)))


def test_regression_channel_in_two_conv_groups_ties_the_groups():
    """A label factored twice within one factoring kept only its last factor pair, so removing one conv group
    removed stem channels the other group still read (the shrunk graph's shapes were inconsistent)."""
    model = randomize_constants(TwiceConcatenated().eval())
    image = torch.randn(2, 3, SIDE, SIDE)
    facts = channel_facts(model, image)
    conv_groups = [g for g in facts.groups if ("grouped.0.weight", 0) in g.members and g.kind == "heads/groups"]
    assert [g.size for g in conv_groups] == [1]  # both groups read every stem channel: they go together
    for seed in range(4):
        assert_shrinks_exactly(model, image, random_unit_masks(facts, 0.5, seed=seed))
