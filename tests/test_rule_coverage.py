"""Every op family the rule table names, inside a small network of its own, shrinks exactly under random structured
masks, and something really goes (a rule that made every group a barrier would pass an exactness check alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsparse.metrics import count_parameters
from fxsparse.testing import channel_facts, random_unit_masks, randomize_constants

from conftest import assert_shrinks_exactly


class Conv1dNet(nn.Module):
    """Conv1d, BatchNorm1d, a grouped Conv1d, adaptive average pooling, flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.b = nn.Conv1d(8, 6, 3, padding=1, groups=2)
        self.pool, self.head = nn.AdaptiveAvgPool1d(1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.pool(self.b(F.relu(self.bn(self.a(x))))).flatten(1))


class Conv3dNet(nn.Module):
    """Conv3d, InstanceNorm3d (affine), GELU, max pooling, adaptive max pooling."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Conv3d(2, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True)
        self.b, self.head = nn.Conv3d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool3d(F.gelu(self.norm(self.a(x))), 2)
        return self.head(F.adaptive_max_pool3d(self.b(x), 1).flatten(1))


class TransposedNet(nn.Module):
    """PReLU per channel, ConvTranspose2d (plain and grouped), GroupNorm, LeakyReLU, upsampling. ``a`` has no bias:
    a constant carried into a strided transposed convolution comes out periodic, which no bias can hold, so with
    one its removed channels would rightly be kept."""

    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.norm = nn.GroupNorm(4, 12)
        self.grouped = nn.ConvTranspose2d(12, 6, 3, padding=1, groups=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.norm(self.up(self.act(self.a(x))))
        x = F.interpolate(F.leaky_relu(self.grouped(x)), scale_factor=2.0)
        return self.out(x)


class TiedLanguageModel(nn.Module):
    """Embedding, an MLP residual block, RMSNorm, and an output head tied to the embedding."""

    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(F.silu(self.up(x)))
        return self.head(self.norm(x))


class StackAndBatchedMatmul(nn.Module):
    """stack/unbind, chunk, bmm attention by hand, softmax over keys, a class token and a position embedding."""

    def __init__(self, dim: int = 12, tokens: int = 5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.embed = nn.Linear(6, dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * 8), nn.Linear(8, dim)
        self.pair, self.head = nn.Linear(dim, 16), nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        x = x + self.proj(torch.bmm(attention, v))
        left, right = self.pair(x).chunk(2, dim=-1)
        left, right = torch.stack([left, right]).unbind(0)
        return self.head((left * torch.sigmoid(right))[:, 0])


CASES = {
    "conv1d": (Conv1dNet, lambda: torch.randn(2, 4, 16)),
    "conv3d": (Conv3dNet, lambda: torch.randn(2, 2, 6, 6, 6)),
    "transposed": (TransposedNet, lambda: torch.randn(2, 3, 8, 8)),
    "tied-embedding": (TiedLanguageModel, lambda: torch.randint(0, 40, (2, 7))),
    "stack-bmm-tokens": (StackAndBatchedMatmul, lambda: torch.randn(2, 5, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_op_family_shrinks_exactly_and_really_shrinks(name):
    build, make_input = CASES[name]
    torch.manual_seed(0)
    model, example = randomize_constants(build().eval()), make_input()
    facts = channel_facts(model, example)
    assert facts.groups, f"{name}: no prunable group at all"
    result = assert_shrinks_exactly(model, example, random_unit_masks(facts))
    assert count_parameters(result.module) < count_parameters(model)


class JoinOfOneNode(nn.Module):
    """torch.stack and torch.cat given a chunk's outputs as one node: no rule reads inside it, so a barrier."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        stacked = torch.stack(self.a(x).chunk(2, dim=-1), dim=1).flatten(1)
        return self.out(stacked + torch.cat(self.b(x).chunk(2, dim=-1), dim=-1))


def test_a_join_of_one_node_holding_several_tensors_is_a_barrier_not_a_crash():
    torch.manual_seed(0)
    model, example = randomize_constants(JoinOfOneNode().eval()), torch.randn(4, 6)
    result = assert_shrinks_exactly(model, example, {"a.weight": torch.ones(8, 6).index_fill_(0, torch.tensor([1]), 0)})
    barriers = [row for row in result.report.pass_record("DependencyGroups").rows if "not pruned through" in str(row)]
    assert len(barriers) == 2, result.report
    assert count_parameters(result.module) == count_parameters(model)
