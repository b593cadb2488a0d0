"""Shared tensors are one tensor: a layer called several times, layers sharing one weight, ALBERT's shared layers
and a tied embedding are decided, folded and rewritten once, and stay shared. Every case is compared with the
masked model numerically with verify=False too, so a wrong fold cannot hide behind the pass manager's check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.metrics import count_parameters
from fxsparse.passes import Prune, Shrink

torch.set_num_threads(1)
X = torch.randn(4, 8)


class CalledTwice(nn.Module):
    """``b`` runs twice in a chain: its second call's removed inputs carry relu(b.bias), its first relu(a.bias),
    two different constants for its one bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.a.bias.uniform_(0.5, 1.0)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(torch.relu(self.b(h)))))


class CalledOnTwoBranches(nn.Module):
    """``b`` runs on two branches whose removed channels carry equal constants (``a1`` and ``a2`` have equal
    biases): both calls contribute the same, so it is folded once."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(4, 4)
        with torch.no_grad():
            self.a1.bias.uniform_(0.5, 1.0)
            self.a2.bias.copy_(self.a1.bias)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a1(x))) * self.b(torch.relu(self.a2(x))))


class TwoLayersOneWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b1, self.b2, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b2.weight = self.b1.weight
        with torch.no_grad():
            self.a.bias.uniform_(0.5, 1.0)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b2(torch.relu(self.b1(h)))))


class TiedLanguageModel(nn.Module):
    """An embedding whose table is also the output head (GPT-style weight tying), with no LayerNorm in between,
    so the embedding width is prunable."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def _prune(model, inputs, verify, **kwargs):
    """(masked model, shrunk result): the masked model is the reference Shrink must equal."""
    kw = {"example_kwargs": inputs} if isinstance(inputs, dict) else {}
    args = () if isinstance(inputs, dict) else inputs
    masked = fxsparse.compile(model, args, passes=[Prune(ratio=0.5, **kwargs)], verify=False, **kw).module
    result = fxsparse.compile(model, args, passes=[Prune(ratio=0.5, **kwargs), Shrink()], verify=verify, **kw)
    return masked, result


def _notes(result):
    return [row["note"] for row in result.report.pass_record("Shrink").rows if "note" in row]


@pytest.mark.parametrize("verify", [True, False])
def test_a_layer_called_twice_with_different_constants_keeps_those_channels(verify):
    torch.manual_seed(0)
    model = CalledTwice().eval()
    masked, result = _prune(model, X, verify)
    torch.testing.assert_close(result.module(X), masked(X), rtol=1e-5, atol=1e-6)
    assert any("b, b_1: one layer's bias" in note for note in _notes(result))


@pytest.mark.parametrize("verify", [True, False])
def test_a_layer_called_twice_with_the_same_constant_folds_it_once(verify):
    torch.manual_seed(0)
    model = CalledOnTwoBranches().eval()
    masked, result = _prune(model, X, verify)
    torch.testing.assert_close(result.module(X), masked(X), rtol=1e-5, atol=1e-6)
    assert result.module.a1.out_features == result.module.a2.out_features == 8
    folded = [row for row in result.report.pass_record("Shrink").rows if row.get("folded") == "bias"]
    assert [row["node"] for row in folded if row["node"].startswith("b")] == ["b"]  # not b_1 too


@pytest.mark.parametrize("verify", [True, False])
def test_two_layers_sharing_one_weight_prune_together_and_stay_tied(verify):
    torch.manual_seed(0)
    model = TwoLayersOneWeight().eval()
    masked, result = _prune(model, X, verify)
    torch.testing.assert_close(result.module(X), masked(X), rtol=1e-5, atol=1e-6)
    assert result.module.b1.weight is result.module.b2.weight
    assert result.module.b1.weight.shape == (8, 8)
    assert count_parameters(result.module) < count_parameters(model)


def test_a_tied_embedding_stays_tied_in_place():
    torch.manual_seed(0)
    model = TiedLanguageModel().eval()
    ids = torch.randint(0, 50, (2, 6))
    masked, expected = _prune(model, (ids,), verify=False)
    fxsparse.compile(model, ids, passes=[Prune(ratio=0.5), Shrink()], inplace=True)
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (50, 8)
    assert model.embed.embedding_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(model(ids), masked(ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(ids), expected.module(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("verify", [True, False])
def test_albert_shared_layers_prune_heads_and_mlp_once(verify):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.AlbertModel(config).eval()
    with torch.no_grad():  # biases away from zero, so removed channels carry constants to fold
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 100, (2, 8), generator=generator)}
    masked, result = _prune(model, inputs, verify)
    torch.testing.assert_close(main(result.module(**inputs)), main(masked(**inputs)), rtol=1e-4, atol=1e-5)
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    shrunk = dict(result.module.named_parameters())
    assert shrunk[f"{layer}.ffn.weight"].shape[0] == 32  # the one shared MLP, half its width
    assert count_parameters(result.module) < count_parameters(model)


def main(output):
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]
