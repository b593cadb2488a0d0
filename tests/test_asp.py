"""apex ASP's calls and meaning, on fxsparse's masks: buffers as apex names them, masks kept through training, no
singleton."""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.asp import ASP
from fxsparse.sparse import NM

from conftest import tiny_hf_model

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


LAYOUT = {nn.Conv2d: "conv", nn.Linear: "linear"}


def sparse_weights(model: nn.Module, pattern: NM = NM(2, 4)) -> dict[str, bool]:
    """{layer: is its weight ``pattern``} for every Linear and Conv2d."""
    return {name: pattern.holds(m.weight, LAYOUT[type(m)]) for name, m in model.named_modules()
            if type(m) in LAYOUT}


def train(model: nn.Module, optimizer, steps: int = 20) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(4, 16, 6, 6, generator=generator)
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=generator)).backward()
        optimizer.step()


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
                                            lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3)],
                         ids=["sgd", "adam"])
def test_prune_trained_model_is_2_4_and_stays_so_through_training(make_optimizer, capsys):
    model = small_cnn()
    optimizer = make_optimizer(model.parameters())
    train(model, optimizer, steps=3)
    ASP.prune_trained_model(model, optimizer)
    assert "[ASP] Enabled 50.00% sparsity for 0::weight" in capsys.readouterr().out
    # apex's whitelist for prune_trained_model is Linear and Conv2d; the last Linear has 10 rows: auto-skipped
    assert sparse_weights(model) == {"0": True, "2": True, "6": True, "8": False}
    assert "8.__weight_mma_mask" not in model.state_dict() and "6.__weight_mma_mask" in model.state_dict()
    assert ASP.is_sparsity_enabled()
    before = model[0].weight.detach().clone()
    train(model, optimizer)
    assert sparse_weights(model) == {"0": True, "2": True, "6": True, "8": False}
    assert not torch.equal(before, model[0].weight)


def test_recompute_restore_and_the_pruned_values_kept_as_apex_names_them():
    model = small_cnn()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    ASP.init_model_for_pruning(model, "m4n2_1d", verbosity=0, whitelist=[nn.Linear], allow_recompute_mask=True)
    assert {k for k in model.state_dict() if "mma" in k} == {"6.__weight_mma_mask", "6.__weight_mma_pruned_p"}
    assert not ASP.is_sparsity_enabled()
    ASP.init_optimizer_for_pruning(torch.optim.SGD(model.parameters(), lr=0.1))
    ASP.compute_sparse_masks()
    assert ASP.is_sparsity_enabled() and NM(2, 4).holds(model[6].weight, "linear")
    assert torch.equal(model[6].weight + model[6].get_buffer("__weight_mma_pruned_p"), dense["6.weight"])
    ASP.compute_sparse_masks()  # recomputing restores the dense weights first
    assert NM(2, 4).holds(model[6].weight, "linear")
    ASP.restore_pruned_weights()
    assert not ASP.is_sparsity_enabled() and torch.equal(model[6].weight, dense["6.weight"])


def test_recomputing_without_kept_values_is_a_clear_error():
    model = small_cnn()
    ASP.init_model_for_pruning(model, verbosity=0)
    ASP.compute_sparse_masks()
    with pytest.raises(fxsparse.FxsparseError, match="allow_recompute_mask=True"):
        ASP.compute_sparse_masks()


def test_the_2d_calculators_give_masks_that_are_2_4_both_ways():
    model = small_cnn()
    ASP.init_model_for_pruning(model, "m4n2_2d_best", verbosity=0, whitelist=[nn.Linear, nn.Conv2d])
    ASP.compute_sparse_masks()
    both_ways = NM(2, 4, transposable=True)
    assert sparse_weights(model, both_ways) == {"0": True, "2": True, "6": True, "8": False}


def test_an_apex_checkpoint_loads_with_its_masks_and_training_keeps_them():
    model = small_cnn()
    ASP.prune_trained_model(model, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoint = copy.deepcopy(model.state_dict())
    fresh = small_cnn(seed=1)
    ASP.init_model_for_pruning(fresh, "m4n2_1d", verbosity=0, whitelist=[nn.Linear, nn.Conv2d])
    fresh.load_state_dict(checkpoint, strict=True)
    assert ASP.is_sparsity_enabled()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    ASP.init_optimizer_for_pruning(optimizer)
    train(fresh, optimizer)
    assert sparse_weights(fresh)["0"] and sparse_weights(fresh)["6"]
    assert torch.equal(fresh[0].get_buffer("__weight_mma_mask"), model[0].get_buffer("__weight_mma_mask"))


def test_two_models_in_one_process_each_keep_their_own_masks():
    first, second = small_cnn(0), small_cnn(1)
    first_optimizer = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    ASP.prune_trained_model(first, first_optimizer)
    assert ASP.already_init_asp_model()
    session = ASP()  # an explicit session of its own, too
    session.init_model_for_pruning(second, "m4n2_1d", verbosity=0, whitelist=[nn.Linear])
    second_optimizer = torch.optim.Adam(second.parameters(), lr=1e-3)
    session.init_optimizer_for_pruning(second_optimizer)
    session.compute_sparse_masks()
    train(first, first_optimizer)
    train(second, second_optimizer)
    assert sparse_weights(first) == {"0": True, "2": True, "6": True, "8": False}
    assert sparse_weights(second) == {"0": False, "2": False, "6": True, "8": False}
    assert session.sparse_parameters == ["6.weight"]


def test_a_layer_that_cannot_take_the_pattern_is_named():
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(48, 16), nn.Linear(16, 12))
    with pytest.raises(fxsparse.FxsparseError, match=r"1::weight of size=\[16, 48\] with 16:32: 48 inputs"):
        ASP.init_model_for_pruning(model, "m32n16_1d", verbosity=0)
    assert not any("mma" in key for key in model.state_dict())  # refused before any buffer was added
    with pytest.raises(fxsparse.FxsparseError, match=r"2::weight.*allowed_layer_names"):
        ASP.init_model_for_pruning(model, verbosity=0, allowed_layer_names=["2"])
    with pytest.raises(fxsparse.BadArgumentError, match="no layer 'nope'"):
        ASP.init_model_for_pruning(model, verbosity=0, disallowed_layer_names=["nope"])
    with pytest.raises(fxsparse.BadArgumentError, match="mask_calculator"):
        ASP.init_model_for_pruning(model, "m4n2_3d", verbosity=0)


def test_without_example_inputs_permutation_is_reported_once_as_not_applied(caplog):
    model = small_cnn()
    ASP.init_model_for_pruning(model, verbosity=0, allow_recompute_mask=True)
    with caplog.at_level(logging.WARNING, logger="fxsparse.asp"):
        ASP.compute_sparse_masks()
        ASP.compute_sparse_masks()
    notes = [r.message for r in caplog.records if "no example inputs" in r.message]
    assert len(notes) == 1 and "example_inputs" in notes[0]


def kept_magnitude(model: nn.Module) -> float:
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules() if type(m) in LAYOUT)


@pytest.mark.parametrize("inputs_from", ["argument", "forward"])
def test_permutation_is_exact_keeps_more_and_moves_the_optimizer_state(inputs_from):
    x = torch.randn(2, 16, 8, 8)
    dense = small_cnn()
    plain, permuted = copy.deepcopy(dense), copy.deepcopy(dense)
    ASP().prune_trained_model(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    optimizer = torch.optim.SGD(permuted.parameters(), lr=0.1, momentum=0.9)
    train(permuted, optimizer, steps=1)  # some momentum to carry along
    dense_now = copy.deepcopy(permuted)
    momentum = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in permuted.named_parameters()}
    asp = ASP()
    asp.init_model_for_pruning(permuted, verbosity=0, allow_recompute_mask=True,
                               example_inputs=x if inputs_from == "argument" else None)
    if inputs_from == "forward":
        permuted(x)
    asp.init_optimizer_for_pruning(optimizer)
    asp.compute_sparse_masks()
    assert sparse_weights(permuted) == {"0": True, "2": True, "6": True, "8": False}  # 8: 10 outputs, apex skips it
    # sparsity off again: the dense, permuted model computes exactly what it did before
    asp.restore_pruned_weights()
    with torch.no_grad():
        expected, got = dense_now(x), permuted(x)
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    moved = [n for n, p in permuted.named_parameters() if not torch.equal(p, dense_now.get_parameter(n))]
    assert moved, "nothing was permuted"
    for name in moved:  # each momentum entry moved with its weight (pruned entries' momentum is zeroed)
        param = permuted.get_parameter(name)
        buffer = optimizer.state[param]["momentum_buffer"]
        before = set(zip(dense_now.get_parameter(name).flatten().tolist(), momentum[name].flatten().tolist()))
        kept = buffer.flatten() != 0
        after = set(zip(param.flatten()[kept].tolist(), buffer.flatten()[kept].tolist()))
        assert kept.any() and after <= before
    asp.compute_sparse_masks()
    fresh = copy.deepcopy(dense_now)
    ASP().prune_trained_model(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert kept_magnitude(permuted) > kept_magnitude(fresh)


def test_hugging_face_conv1d_through_custom_layer_dict_is_2_4_along_its_inputs():
    model, inputs = tiny_hf_model("gpt2")
    conv1d = type(model.transformer.h[0].attn.c_attn)
    ASP.init_model_for_pruning(model, verbosity=0, whitelist=[], custom_layer_dict={conv1d: ["weight"]})
    ASP.compute_sparse_masks()
    layers = [m for m in model.modules() if type(m) is conv1d]
    assert layers and all(NM(2, 4).holds(m.weight, "in_out") for m in layers)
    assert not any(NM(2, 4).holds(m.weight, "linear") for m in layers)  # [in, out]: grouped along dim 0


def test_asp_digits_example_prunes_2_4_and_fine_tunes_back():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import asp_digits
    finally:
        sys.path.pop(0)
    rows = asp_digits.run(seed=0, epochs=3, finetune_epochs=1)
    assert [(variant, count, still) for _, variant, count, _, _, _, _, still in rows] == [
        ("2:4", 3, "yes"), ("2:4 perm", 3, "yes")]
    for seed, variant, count, kept, dense, pruned, tuned, still in rows:
        assert 0.5 < kept < 1.0 and dense > 0.9 and tuned > 0.9 and tuned >= pruned - 0.02
    assert rows[1][3] > rows[0][3]  # the permuted model keeps more magnitude
