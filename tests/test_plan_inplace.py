"""Plans (JSON, re-applied to fresh models) and in-place application to the user's own module tree."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.passes import Prune, Shrink

from conftest import main_output, tiny_hf_model
from test_prune import randomize_norms

torchvision = pytest.importorskip("torchvision")
X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def pruned_resnet():
    model = randomize_norms(torchvision.models.resnet18(num_classes=10))
    return model, fxsparse.prune(model, X, keep=0.5)


def test_plan_is_json_with_versions_settings_and_kept_indices(pruned_resnet, tmp_path):
    _, result = pruned_resnet
    path = result.plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["torch_version"] == torch.__version__ and data["fxsparse_version"] == fxsparse.__version__
    assert data["passes"][0]["name"] == "Prune" and data["passes"][0]["settings"]["ratio"] == 0.5
    assert len(data["kept"]["layer1.0.conv1.weight"]["0"]) == 32
    assert data["inputs"]["args"][0]["shape"] == [2, 3, 64, 64]
    assert fxsparse.Plan.load(path).to_dict() == result.plan.to_dict()


def test_apply_plan_rebuilds_the_architecture_and_a_checkpoint_loads(pruned_resnet, tmp_path):
    _, result = pruned_resnet
    result.plan.save(tmp_path / "plan.json")
    fresh = torchvision.models.resnet18(num_classes=10)
    assert fxsparse.Plan.load(tmp_path / "plan.json").apply_to(fresh) is fresh
    assert isinstance(fresh.layer1[0].conv1, nn.Conv2d) and fresh.layer1[0].conv1.out_channels == 32
    fresh.load_state_dict(result.module.state_dict())  # strict: same names, same shapes
    fresh.eval()
    torch.testing.assert_close(fresh(X), result.module(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other, needle", [
    (lambda: torchvision.models.resnet34(num_classes=10), "layer1.2.conv1.weight"),
    (lambda: torchvision.models.resnet18(num_classes=7), "fc.weight"),
])
def test_a_plan_that_does_not_fit_names_the_first_mismatch(pruned_resnet, other, needle):
    _, result = pruned_resnet
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxsparse.PlanMismatchError, match=needle):
        fxsparse.apply_plan(model, result.plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_shrinks_the_users_modules_and_training_still_works():
    model = randomize_norms(torchvision.models.resnet18(num_classes=10))
    conv = model.layer2[0].conv1
    result = fxsparse.compile(model, X, [Prune(ratio=0.5), Shrink()], inplace=True)
    # same objects, same classes (a conv given a border correction becomes its BorderCorrectedConv2d subclass)
    assert model.layer2[0].conv1 is conv and isinstance(conv, nn.Conv2d)
    assert conv.out_channels == 64 and conv.weight.shape[0] == 64 and model.layer2[0].bn1.num_features == 64
    model.eval()
    torch.testing.assert_close(model(X), result.module(X), rtol=1e-4, atol=1e-5)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(X), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_inplace_failure_restores_the_model(monkeypatch):
    model = randomize_norms(torchvision.models.resnet18(num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import fxsparse.inplace as inplace

    def broken(model, source):
        raise RuntimeError("injected failure while resizing")

    monkeypatch.setattr(inplace, "_resize_attributes", broken)
    with pytest.raises(RuntimeError, match="injected"):
        fxsparse.compile(model, X, [Prune(ratio=0.5), Shrink()], inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer1[0].conv1.out_channels == 64


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_inplace_language_models_still_generate_and_save(kind, tmp_path):
    model, inputs = tiny_hf_model(kind)
    result = fxsparse.prune(model, inputs, keep=0.5, inplace=True)
    torch.testing.assert_close(main_output(model(**inputs)), main_output(result.module(**inputs)),
                               rtol=1e-4, atol=1e-5)
    prompt = inputs["input_ids"][:1, :4]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    assert generated.shape == (1, 8)
    model.save_pretrained(tmp_path / kind)
    assert (tmp_path / kind / "config.json").exists()


def test_inplace_llama_round_trips_through_from_pretrained(tmp_path):
    model, inputs = tiny_hf_model("llama")
    fxsparse.prune(model, inputs, keep=0.5, inplace=True)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 32
    model.save_pretrained(tmp_path / "llama")
    reloaded = type(model).from_pretrained(tmp_path / "llama").eval()
    torch.testing.assert_close(main_output(reloaded(**inputs)), main_output(model(**inputs)))


def test_apply_plan_on_a_fresh_transformer(tmp_path):
    model, inputs = tiny_hf_model("bert")
    result = fxsparse.prune(model, inputs, keep=0.5)
    fresh, _ = tiny_hf_model("bert")
    fxsparse.apply_plan(fresh, result.plan)
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == 2
    fresh.load_state_dict(result.module.state_dict())
    torch.testing.assert_close(main_output(fresh(**inputs)), main_output(result.module(**inputs)),
                               rtol=1e-4, atol=1e-5)
