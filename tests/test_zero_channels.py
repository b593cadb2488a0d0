"""The proof that removed channels reach their consumers as 0 (fxsparse.zero_channels), which lets Shrink skip the
measuring run of the masked model when verification is off: it must never claim a zero that a measurement
contradicts, on real families, with and without constants in the removed channels."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxsparse
import fxsparse.passes.shrink as shrink_module
from fxsparse import residue
from fxsparse.passes import Prune, Shrink
from fxsparse.zero_channels import removed_inputs_are_zero

from conftest import randomize_constants, tiny_hf_model


def _measured_zero(gm, consumer, keep, seen) -> bool:
    x = seen[consumer.node][0][consumer.input_index]
    removed = torch.nonzero(~keep[consumer.labels]).flatten()
    return not bool(x.index_select(consumer.dim, removed).any())


@pytest.fixture
def checked_shrink(monkeypatch):
    """Run Shrink with every consumer's proof checked against a measurement; collects (proven, measured) pairs."""
    answers: list[tuple[bool, bool]] = []
    settle = residue.settle_residues

    def checked(gm, analysis, consumers, removed, args, kwargs, node_labels, **options):
        keep = analysis.keep_labels(removed)
        active = [c for c in consumers if not bool(keep[c.labels].all())]
        capture = residue._Capture(gm, {c.node for c in active})
        with torch.no_grad():
            capture.run(*residue.placeholder_values(gm, args, kwargs))
        for c in active:
            proven = removed_inputs_are_zero(gm, analysis.graph, node_labels, keep, [c])
            answers.append((proven, _measured_zero(gm, c, keep, capture.seen)))
        return settle(gm, analysis, consumers, removed, args, kwargs, node_labels, **options)

    monkeypatch.setattr(shrink_module, "settle_residues", checked)
    return answers


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny", "swin_t"])
@pytest.mark.parametrize("constants", [False, True], ids=["fresh", "trained-like"])
def test_the_proof_never_claims_a_zero_the_model_does_not_hold(checked_shrink, name, constants):
    model = _torchvision(name)
    if constants:
        randomize_constants(model)
    x = torch.randn(1, 3, 64, 64) if name != "swin_t" else torch.randn(1, 3, 224, 224)
    fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink, "no consumer read a removed channel: the test checked nothing"
    assert not [pair for pair in checked_shrink if pair == (True, False)]
    if not constants and name in ("resnet18", "densenet121", "swin_t"):
        assert all(proven for proven, _ in checked_shrink)  # zero shifts and biases: every consumer proven


@pytest.mark.parametrize("kind", ["gpt2", "llama", "vit"])
def test_the_proof_is_sound_on_hugging_face_models_through_export(checked_shrink, kind):
    model, inputs = tiny_hf_model(kind)
    randomize_constants(model)
    fxsparse.compile(model, example_kwargs=inputs, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink
    assert not [pair for pair in checked_shrink if pair == (True, False)]


def _count_runs(monkeypatch) -> list[int]:
    runs = [0]
    run = residue._Capture.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(residue._Capture, "run", counted)
    return runs


def test_without_verification_a_proven_model_is_not_run_and_is_still_exact(monkeypatch):
    model = _torchvision("resnet18")
    x = torch.randn(2, 3, 64, 64)
    runs = _count_runs(monkeypatch)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert runs[0] == 0
    masked = fxsparse.compile(model, x, passes=[Prune(0.5)]).module
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), masked(x), rtol=1e-4, atol=1e-5)


def test_removed_channels_carrying_a_batchnorm_shift_are_measured_and_folded(monkeypatch):
    model = randomize_constants(_torchvision("resnet18"))
    x = torch.randn(2, 3, 64, 64)
    runs = _count_runs(monkeypatch)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert runs[0] >= 1
    assert any(row.get("folded") for row in result.report.pass_record("Shrink").rows)
    masked = fxsparse.compile(model, x, passes=[Prune(0.5)]).module
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), masked(x), rtol=1e-4, atol=1e-4)


class _Gated(nn.Module):
    """conv -> (relu, sigmoid gate) -> conv: a removed channel is 0 after the relu, 0.5 after the sigmoid."""

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
def test_the_probe_tells_an_op_that_keeps_zero_from_one_that_does_not(checked_shrink, gate):
    model = _Gated(gate).eval()
    x = torch.randn(1, 3, 8, 8)
    result = fxsparse.compile(model, x, passes=[Prune(0.5), Shrink()], verify=False)
    assert checked_shrink == [(not gate, not gate)]
    masked = fxsparse.compile(model, x, passes=[Prune(0.5)]).module
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), masked(x), rtol=1e-4, atol=1e-5)


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
    assert checked_shrink == [(True, True), (False, False)]
    masked = fxsparse.compile(model, x, passes=[Prune(0.5)]).module
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), masked(x), rtol=1e-4, atol=1e-5)
