"""MaskPropagation: the mask forms users have, forward and backward inference by the rules, coupled-group
conflicts, and bad masks named in one line with the model left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import MaskError
from fxsparse.passes import MaskPropagation, Shrink
from fxsparse.testing import randomize_constants

from conftest import assert_shrinks_exactly


class ResidualNet(nn.Module):
    """stem -> [a -> b] + residual -> head: the residual group is {stem, b out; a in; head in}, the inner group is
    {a out; b in}."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bn_a = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        z = self.bn_b(self.b(F.relu(self.bn_a(self.a(y)))))
        return self.head(F.relu(y + z).mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return randomize_constants(ResidualNet().eval())


X = torch.randn(2, 3, 16, 16)


def out_mask(weight: torch.Tensor, removed) -> torch.Tensor:
    """A full-shape mask zeroing the output channels ``removed`` of ``weight``."""
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[list(removed)] = False
    return mask


def rows_of(result, name: str) -> list[dict]:
    return next(p["rows"] for p in result.report.to_dict()["passes"] if p["name"] == name)


def test_every_mask_form_gives_the_same_shrunk_model(net):
    full = out_mask(net.a.weight, range(6))
    forms = {
        "parameter": {"a.weight": full},
        "module": {"a": full},
        "one-dim": {"a": full[:, 0, 0, 0]},
        "nni": {"a": {"weight": full, "bias": None}},
    }
    shapes = {}
    for form, masks in forms.items():
        result = assert_shrinks_exactly(net, X, masks)
        shapes[form] = {n: tuple(t.shape) for n, t in result.module.state_dict().items()}
    assert shapes["parameter"]["a.weight"] == (10, 8, 1, 1)
    assert shapes["parameter"]["b.weight"] == (8, 10, 3, 3)  # forward: b's input columns go with a's rows
    assert all(s == shapes["parameter"] for s in shapes.values())


def test_a_channel_nothing_reads_is_removed_backward(net):
    mask = torch.ones_like(net.b.weight, dtype=torch.bool)
    mask[:, :4] = False  # b no longer reads inner channels 0..3, while a still produces them
    result = assert_shrinks_exactly(net, X, {"b.weight": mask})
    assert result.module.a.out_channels == 12 and result.module.bn_a.num_features == 12
    assert result.module.b.in_channels == 12


def test_a_residual_channel_goes_only_when_every_producer_zeroes_it(net):
    result = assert_shrinks_exactly(net, X, {"stem": out_mask(net.stem.weight, [0, 1]),
                                             "b": out_mask(net.b.weight, [0, 1])})
    module = result.module
    assert (module.stem.out_channels, module.a.in_channels, module.b.out_channels, module.head.in_features) == (
        6, 6, 6, 6)
    assert not [row for row in rows_of(result, "MaskPropagation") if row.get("resolution")]


def test_a_conflict_in_a_coupled_group_keeps_the_channel_and_is_reported(net):
    result = assert_shrinks_exactly(net, X, {"stem": out_mask(net.stem.weight, [0, 1])})  # b still writes 0 and 1
    assert result.module.stem.out_channels == 8 and result.module.head.in_features == 8
    conflicts = [row for row in rows_of(result, "MaskPropagation") if row.get("resolution")]
    assert [row["index"] for row in conflicts] == [0, 1]  # the masked channels, by their index in the group
    assert all(row["resolution"] == "kept" and "b.weight[0] still produces it" in row["why"] for row in conflicts)


@pytest.mark.parametrize("masks, words", [
    ({"stem.wieght": torch.ones(8, 3, 3, 3)}, ["'stem.wieght'", "stem.weight"]),
    ({"no_such_layer": torch.ones(8)}, ["'no_such_layer'", "neither a parameter nor a module"]),
    ({"a.weight": torch.ones(16, 4, 1, 1)}, ["'a.weight'", "(16, 4, 1, 1)", "(16, 8, 1, 1)"]),
    ({"a": torch.ones(15)}, ["'a.weight'", "(15,)", "16 output channels"]),
], ids=["typo", "unknown", "wrong-shape", "wrong-length"])
def test_a_bad_mask_is_one_line_naming_it_and_the_model_is_untouched(net, masks, words):
    before = {n: t.clone() for n, t in net.state_dict().items()}
    with pytest.raises(MaskError) as caught:
        fxsparse.compile(net, X, passes=[MaskPropagation(masks), Shrink()])
    text = str(caught.value)
    assert "\n" not in text and all(word in text for word in words), text
    assert all(torch.equal(before[n], t) for n, t in net.state_dict().items())
