"""The proof of what removed channels carry to their consumers (fxsparse.constant_channels), which lets Shrink skip
the measuring run of the masked model when verification is off: it must never claim a value that a measurement
contradicts, on real families, with zero and with non-zero constants (trained-like BatchNorm shifts and biases)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxsparse
import fxsparse.passes.shrink as shrink_module
from fxsparse import residue
from fxsparse.constant_channels import removed_input_constants
from fxsparse.passes import Prune, Shrink

from conftest import randomize_constants, tiny_hf_model


@pytest.fixture(autouse=True)
def always_prove(monkeypatch):
    """Shrink proves whenever verification is off, whatever the model's size (see test_the_proof_runs_where_...)."""
    monkeypatch.setattr(residue, "PROOF_MIN_MACS_PER_NODE", 0)


def _measured(consumer, keep, seen) -> tuple[torch.Tensor, bool]:
    """The measured value per removed input channel (at the first position), and whether it is the same at every
    position."""
    x = seen[consumer.node][0][consumer.input_index]
    removed = torch.nonzero(~keep[consumer.labels]).flatten()
    values = x.index_select(consumer.dim, removed).movedim(consumer.dim, 0).reshape(len(removed), -1)
    return values[:, 0], bool((values == values[:, :1]).all())


@pytest.fixture
def checked_shrink(monkeypatch):
    """Run Shrink with every consumer's proof checked against a measurement; collects (proven, agrees) pairs."""
    answers: list[tuple[bool, bool]] = []
    settle = residue.settle_residues

    def checked(gm, analysis, consumers, removed, args, kwargs, node_labels, **options):
        keep = analysis.keep_labels(removed)
        active = [c for c in consumers if not bool(keep[c.labels].all())]
        capture = residue._Capture(gm, {c.node for c in active})
        with torch.no_grad():
            capture.run(*residue.placeholder_values(gm, args, kwargs))
        for c in active:
            proven = removed_input_constants(gm, analysis.graph, node_labels, keep, [c])
            if proven is None:
                answers.append((False, True))
                continue
            values, uniform = _measured(c, keep, capture.seen)
            agrees = uniform and torch.allclose(proven[0], values, rtol=1e-5, atol=1e-6)
            answers.append((True, agrees))
        return settle(gm, analysis, consumers, removed, args, kwargs, node_labels, **options)

    monkeypatch.setattr(shrink_module, "settle_residues", checked)
    return answers


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def _masked_model(model, x):
    return fxsparse.compile(model, x, passes=[Prune(0.5)]).module


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny", "swin_t"])
@pytest.mark.parametrize("constants", [False, True], ids=["fresh", "trained-like"])
def test_the_proof_never_claims_a_value_the_model_does_not_carry(checked_shrink, name, constants):
    model = _torchvision(name)
    if constants:
        randomize_constants(model)
    x = torch.randn(1, 3, 64, 64) if name != "swin_t" else torch.randn(1, 3, 224, 224)
    fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink, "no consumer read a removed channel: the test checked nothing"
    assert all(agrees for _, agrees in checked_shrink)
    if name in ("resnet18", "densenet121", "mobilenet_v3_small"):
        assert all(proven for proven, _ in checked_shrink)  # BatchNorm shifts, ReLUs, sigmoid gates: all known


@pytest.mark.parametrize("kind", ["gpt2", "llama", "vit"])
def test_the_proof_is_sound_on_hugging_face_models_through_export(checked_shrink, kind):
    model, inputs = tiny_hf_model(kind)
    randomize_constants(model)
    fxsparse.compile(model, example_kwargs=inputs, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink
    assert all(agrees for _, agrees in checked_shrink)


def _count_runs(monkeypatch) -> list[int]:
    runs = [0]
    run = residue._Capture.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(residue._Capture, "run", counted)
    return runs


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("constants", [False, True], ids=["fresh", "trained-like"])
def test_without_verification_a_proven_model_is_not_run_and_is_exact(monkeypatch, name, constants):
    model = _torchvision(name)
    if constants:
        randomize_constants(model)
    x = torch.randn(2, 3, 64, 64)
    runs = _count_runs(monkeypatch)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert runs[0] == 0
    folded = [row for row in result.report.pass_record("Shrink").rows if row.get("folded")]
    assert bool(folded) == constants  # trained-like shifts are folded, from the proof's constants
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), _masked_model(model, x)(x), rtol=1e-4, atol=1e-4)


class _Gated(nn.Module):
    """conv -> (relu, sigmoid gate) -> conv: a removed channel is 0 after the relu, 0.5 after the sigmoid, which
    the padded second conv turns into a border-dependent contribution."""

    def __init__(self, gate: bool):
        super().__init__()
        self.gate = gate
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.a.bias.zero_()

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.sigmoid(y) if self.gate else torch.relu(y))


@pytest.mark.parametrize("gate", [False, True], ids=["relu", "sigmoid"])
def test_a_constant_through_a_padded_conv_is_folded_exactly_without_a_run(monkeypatch, checked_shrink, gate):
    model = _Gated(gate).eval()
    x = torch.randn(1, 3, 8, 8)
    runs = _count_runs(monkeypatch)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink == [(True, True)]
    assert runs[0] == 1  # the fixture's own measurement only
    assert any(row.get("folded") for row in result.report.pass_record("Shrink").rows) == gate
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), _masked_model(model, x)(x), rtol=1e-4, atol=1e-5)


class _WritesIntoSharedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        y.add_(1.0)  # b read y before the write, c after: a proof reading the graph as pure would be wrong
        return z + self.c(y)


def test_a_write_into_an_input_other_nodes_read_ends_the_proof(checked_shrink):
    """b reads zeros (shown: the write comes after it); c reads the written tensor (the proof stops at the write).
    The measurement sees what each layer read, not what the tensor holds after the write."""
    model = _WritesIntoSharedInput().eval()
    x = torch.randn(1, 3, 4, 4)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink == [(True, True), (False, True)]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), _masked_model(model, x)(x), rtol=1e-4, atol=1e-5)


def test_the_proof_runs_where_it_costs_less_than_a_run_of_the_model(monkeypatch):
    """By default the proof is tried where a forward costs enough MACs per graph node; a light model is run."""
    monkeypatch.undo()
    assert residue.proving_pays(4_100_000_000, 530) and not residue.proving_pays(300_000_000, 400)
    assert not residue.proving_pays(None, 10)
    runs = _count_runs(monkeypatch)
    fxsparse.compile(_Gated(gate=True).eval(), torch.randn(1, 3, 8, 8), passes=[Prune(0.5), Shrink()], verify=False)
    assert runs[0] == 1
