"""Border corrections made in place live inside the convolution they correct: the model saves, copies, trains and
compiles again like any other."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.modules import BorderCorrectedConv2d, PaddedConstantCorrection
from fxsparse.passes import Prune, Shrink

X = torch.randn(2, 3, 12, 12)


def padded_net() -> nn.Sequential:
    """Removed channels of the first conv carry relu(bias), a constant the padded second conv sees cut at its
    borders: a border correction is needed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].bias.uniform_(0.5, 1.0)
    return net.eval()


@pytest.fixture()
def pruned():
    model = padded_net()
    with torch.no_grad():
        expected = fxsparse.compile(model, X, passes=[Prune(ratio=0.5), Shrink()], verify=False).module(X)
    conv = model[2]
    result = fxsparse.compile(model, X, passes=[Prune(ratio=0.5), Shrink()], inplace=True)
    return model, result, expected, conv


def test_the_correction_is_inside_the_conv_and_the_sequential_keeps_its_layers(pruned):
    model, result, expected, conv = pruned
    assert "correction" in [r["kind"] for r in result.plan.folds]
    assert len(model) == 7 and isinstance(model[2], BorderCorrectedConv2d) and isinstance(model[2], nn.Conv2d)
    assert model[2] is conv  # the same object: an optimizer or hook holding it still holds the layer
    assert isinstance(model[2].border_correction, PaddedConstantCorrection)
    assert model[0].out_channels == 4 and model[2].in_channels == 4
    assert set(model.state_dict()) == set(result.module.state_dict())  # checkpoints move between the two
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 3, 9, 7)  # another resolution: the correction follows it
        torch.testing.assert_close(model(x), result.module(x), rtol=1e-5, atol=1e-5)


def test_the_corrected_model_saves_copies_and_trains(pruned):
    model, _, _, _ = pruned
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[2].border_correction.weight.zero_()  # the copy's correction is its own
        assert not torch.allclose(twin(X), model(X))
        torch.testing.assert_close(loaded(X), model(X))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(X).square().mean()
    loss.backward()
    optimizer.step()
    assert model[2].weight.grad is not None and model(X).square().mean() < loss


def test_a_corrected_model_compiles_again_in_place_and_out(pruned):
    model, _, _, _ = pruned
    again = fxsparse.compile(model, X, passes=[Prune(ratio=0.5), Shrink()])  # verified by the pass manager
    with torch.no_grad():
        reference = model(X)
    fxsparse.compile(model, X, passes=[Prune(ratio=0.5), Shrink()], inplace=True)
    assert model[0].out_channels == 2 and len(model) == 7
    with torch.no_grad():
        torch.testing.assert_close(model(X), again.module(X), rtol=1e-5, atol=1e-5)
        assert model(X).shape == reference.shape


def test_apply_plan_rebuilds_the_corrected_architecture_and_the_checkpoint_loads(pruned):
    model, result, _, _ = pruned
    fresh = padded_net()
    fxsparse.apply_plan(fresh, result.plan)
    assert isinstance(fresh[2], BorderCorrectedConv2d)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X))


def test_a_failed_in_place_compile_puts_the_conv_class_back(monkeypatch):
    import fxsparse.inplace as inplace

    model = padded_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(model, source):
        raise RuntimeError("injected failure after the corrections were added")

    monkeypatch.setattr(inplace, "_resize_attributes", broken)
    with pytest.raises(RuntimeError, match="injected"):
        fxsparse.compile(model, X, passes=[Prune(ratio=0.5), Shrink()], inplace=True)
    assert type(model[2]) is nn.Conv2d and not list(model[2].children())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
