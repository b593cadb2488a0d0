"""The Prune pass: criteria, scopes, options, and that every pruned model equals its masked reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.passes import Prune, Shrink

from conftest import tiny_hf_model


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and biases away from their init, so removed channels carry constants to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.normal_(1.0, 0.3, generator=generator)
                module.bias.normal_(0, 0.5, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    return randomize_norms(torchvision.models.resnet18(num_classes=10)), torch.randn(2, 3, 64, 64)


def shrink_record(result):
    return result.report.pass_record("Shrink")


def conv_widths(module: nn.Module) -> dict[str, int]:
    """Output width of every conv weight (border corrections made by folding are not layers of the model)."""
    return {n: p.shape[0] for n, p in module.named_parameters() if p.dim() == 4 and "border_correction" not in n}


CALIBRATION = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(2)]


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "lamp", "random", "taylor"])
def test_every_criterion_prunes_half_and_matches_the_masked_model(resnet, importance):
    model, x = resnet
    extra = {"calibration": CALIBRATION, "loss_fn": nn.functional.cross_entropy} if importance == "taylor" else {}
    result = fxsparse.compile(model, x, [Prune(ratio=0.5, importance=importance, **extra), Shrink()])
    record = shrink_record(result)
    assert record.verification["max_rel"] < 1e-4
    before, after = conv_widths(model), conv_widths(result.module)
    # every prunable conv (all but the stem's input side: outputs of every conv are prunable here) is halved
    assert all(after[n] == before[n] // 2 for n in after), {n: (before[n], after[n]) for n in after}
    assert result.report.after["macs"] < 0.35 * result.report.before["macs"]


def test_magnitude_keeps_the_largest_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[[1, 5, 6]] *= 1000.0  # three loud channels
        model[2].weight.fill_(0.01)
    result = fxsparse.compile(model, torch.randn(1, 3, 8, 8), [Prune(ratio=0.5, importance="l1"), Shrink()])
    kept = result.plan.kept["0.weight"][0]
    assert {1, 5, 6} <= set(kept) and len(kept) == 4


def test_callable_criterion_decides():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2)).eval()
    favourite = lambda tensor, dim: torch.arange(tensor.shape[dim], dtype=torch.float)  # noqa: E731 - later is better
    result = fxsparse.compile(model, torch.randn(3, 6), [Prune(ratio=0.3, importance=favourite), Shrink()])
    assert result.plan.kept["0.weight"][0] == list(range(3, 10))


def test_global_scope_prunes_unevenly_but_never_empties_a_group(resnet):
    model, x = resnet
    result = fxsparse.compile(model, x, [Prune(ratio=0.5, scope="global", importance="lamp", max_group_ratio=0.8),
                                         Shrink()])
    before, after = conv_widths(model), conv_widths(result.module)
    fractions = {n: after[n] / before[n] for n in after}
    assert len({round(f, 3) for f in fractions.values()}) > 2  # not a uniform ratio
    assert min(fractions.values()) >= 0.2 - 1e-9  # the cap: at most 80% of a group goes
    removed = sum(before.values()) - sum(after.values())
    assert abs(removed / sum(before.values()) - 0.5) < 0.1


def test_ratios_ignore_and_round_to(resnet):
    model, x = resnet
    passes = [Prune(ratio=0.3, ratios={"layer4": 0.75}, ignore=["layer1"], round_to=8), Shrink()]
    result = fxsparse.compile(model, x, passes)
    before, after = conv_widths(model), conv_widths(result.module)
    assert after["layer1.0.conv1.weight"] == before["layer1.0.conv1.weight"]  # ignored
    assert after["layer4.0.conv1.weight"] == 128  # 512 * (1 - 0.75)
    assert all(w % 8 == 0 for w in after.values())


def test_iterative_steps_reach_the_ratio_and_rescore(resnet):
    model, x = resnet
    result = fxsparse.compile(model, x, [Prune(ratio=0.5, steps=3), Shrink()])
    prune_steps = [r for r in result.report.records if r.name == "Prune"]
    assert len(prune_steps) == 3
    assert conv_widths(result.module)["layer2.0.conv1.weight"] == 64
    assert all(r.verification["max_rel"] < 1e-4 for r in result.report.records if r.name == "Shrink")


def test_prune_heads_switch_on_a_transformer():
    model, inputs = tiny_hf_model("bert")
    heads_kept = fxsparse.compile(model, inputs, [Prune(ratio=0.5, prune_heads=False), Shrink()])
    heads_cut = fxsparse.compile(model, inputs, [Prune(ratio=0.5, prune_heads=True), Shrink()])
    query = "encoder.layer.0.attention.self.query.weight"
    mlp = "encoder.layer.0.intermediate.dense.weight"
    assert heads_kept.module.get_parameter(query).shape[0] == 32
    assert heads_cut.module.get_parameter(query).shape[0] == 16  # two whole heads of 8
    assert heads_kept.module.get_parameter(mlp).shape[0] == 32


def test_keep_helper_uses_the_keep_ratio(resnet):
    model, x = resnet
    result = fxsparse.prune(model, x, keep=0.75)
    assert conv_widths(result.module)["layer3.0.conv1.weight"] == 192


@pytest.mark.parametrize("options, argument", [
    ({"ratio": 1.5}, "ratio"),
    ({"scope": "everywhere"}, "scope"),
    ({"importance": "loudness"}, "importance"),
    ({"importance": "taylor"}, "calibration"),
    ({"round_to": 0}, "round_to"),
    ({"steps": 0}, "steps"),
])
def test_bad_options_name_the_argument(options, argument):
    with pytest.raises(fxsparse.BadArgumentError, match=argument):
        Prune(**options)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_magnitude_scores_blockwise_equal_scores_of_the_whole_weight(dim, monkeypatch):
    """Magnitude scores a few rows at a time (no weight-sized temporary); the blocks must add up to the whole."""
    import fxsparse.importance as importance

    monkeypatch.setattr(importance, "_BLOCK_ELEMENTS", 100)  # blocks of 2 rows of 45 entries: 7 blocks and a rest
    weight = torch.randn(15, 5, 3, 3)
    for p, power in ((1, torch.abs), (2, torch.square)):
        got = importance.Magnitude(p).member_scores(weight, dim, None, set())
        assert torch.allclose(got, importance.per_index(power(weight), dim), rtol=1e-6)
