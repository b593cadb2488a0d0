"""Sparsify: N:M and unstructured masks on real model families, kept through training, recorded in the plan."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from torch import nn

import fxsparse
from fxsparse import passes
from fxsparse.sparse import NM, Eligibility, Unstructured, block_patterns, keep_masks, parse_pattern
from fxsparse.models import build
from fxsparse.sparse.patterns import to_matrix

from conftest import tiny_hf_model

torch.set_num_threads(1)
ANY_SIZE = Eligibility(min_rows=1, min_inputs=1)


def masked_weights_hold(module: nn.Module, plan: fxsparse.Plan, pattern: NM) -> list[str]:
    """Names of the plan's masked weights that are not ``pattern`` in ``module`` (empty: all hold)."""
    params = dict(module.named_parameters())
    return [name for name, entry in plan.masks.items() if not pattern.holds(params[name], entry["layout"])]


# --- patterns ---------------------------------------------------------------------------------------------------

def test_nm_keeps_the_largest_n_of_every_m_inputs():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    keep = NM(2, 4).keep_mask(scores, "linear")
    assert keep.tolist() == [[True, False, True, False, False, False, True, True]]


def test_conv_groups_run_along_input_channels_for_each_output_channel_and_kernel_position():
    weight = torch.randn(8, 16, 3, 3)
    keep = NM(2, 4).keep_mask(weight.abs(), "conv")
    groups = keep.permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)  # [out, kh, kw, C groups, 4]
    assert bool((groups.sum(-1) == 2).all())
    expected = weight.abs().permute(0, 2, 3, 1).reshape(-1, 4).topk(2, dim=1).indices.sort(dim=1).values
    got = groups.reshape(-1, 4).nonzero()[:, 1].reshape(-1, 2)
    assert torch.equal(got, expected)


def test_hf_conv1d_weight_stored_in_out_is_grouped_along_its_first_dimension():
    weight = torch.randn(32, 8)  # [in, out]
    keep = NM(2, 4).keep_mask(weight.abs(), "in_out")
    assert bool((keep.reshape(8, 4, 8).sum(1) == 2).all())


def test_the_90_valid_blocks_are_every_4x4_pattern_with_two_per_row_and_column():
    patterns = block_patterns(2, 4).reshape(-1, 4, 4)
    every = ((torch.arange(2 ** 16).unsqueeze(1) >> torch.arange(16)) & 1).float().reshape(-1, 4, 4)
    both_ways = ((every.sum(1) == 2) & (every.sum(2) == 2)).all(dim=1)
    valid = {tuple(b.flatten().tolist()) for b in every[both_ways]}
    assert len(patterns) == 90 and {tuple(p.flatten().tolist()) for p in patterns} == valid


@pytest.mark.parametrize("layout,shape", [("linear", (16, 32)), ("conv", (8, 16, 3, 3)), ("in_out", (32, 16))])
def test_transposable_masks_are_2_4_both_ways_and_the_best_block_each(layout, shape):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    keep = NM(2, 4, transposable=True).keep_mask(scores, layout)
    matrix, kept = to_matrix(scores, layout), to_matrix(keep, layout)
    assert NM(2, 4).holds(kept, "linear") and NM(2, 4).holds(kept.t().contiguous(), "linear")
    block, chosen = matrix[:4, :4].flatten(), kept[:4, :4].flatten().float()
    assert torch.isclose(block @ chosen, (block_patterns(2, 4) @ block).max())
    # the 1-D mask keeps more magnitude than the transposable one, which pays for its second constraint
    assert (scores * NM(2, 4).keep_mask(scores, layout)).sum() >= (scores * keep).sum()


def test_unstructured_local_and_global_remove_exactly_the_requested_count():
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 10, generator=generator), "b": 3 * torch.rand(50, generator=generator)}
    local = Unstructured(0.7, "local").keep_masks(scores)
    assert [int((~m).sum()) for m in local.values()] == [70, 35]
    overall = Unstructured(0.7, "global").keep_masks(scores)
    assert sum(int((~m).sum()) for m in overall.values()) == 105
    threshold = max(s[~m].max() for s, m in zip(scores.values(), overall.values()))
    assert all(bool((s[m] >= threshold).all()) for s, m in zip(scores.values(), overall.values()))
    assert int((~overall["b"]).sum()) < 35  # larger weights lose fewer entries under one threshold


@pytest.mark.parametrize("args,message", [(("3:2",), "0 < N < M"), (("unstructured",), "needs sparsity"),
                                          (("2:4", 0.5), "fixes the sparsity"), (("4",), "not '4'")])
def test_bad_patterns_are_one_line_errors(args, message):
    with pytest.raises(fxsparse.BadArgumentError, match=message):
        parse_pattern(*args)


def test_bad_pass_arguments_are_refused_before_any_work():
    with pytest.raises(fxsparse.BadArgumentError, match="criterion"):
        passes.Sparsify(criterion="nonsense")
    with pytest.raises(fxsparse.BadArgumentError, match="include"):
        passes.Sparsify(include=[3])
    with pytest.raises(fxsparse.BadArgumentError, match="feasible"):
        passes.Sparsify("4:8", transposable=True)


# --- the pass on real families ----------------------------------------------------------------------------------

def test_every_eligible_torchvision_resnet_weight_is_exactly_2_4_and_loads_into_a_dense_model_strictly():
    model = torchvision.models.resnet18(num_classes=16).eval()
    result = fxsparse.compile(model, torch.randn(1, 3, 32, 32), [passes.Sparsify("2:4")])
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(result.plan.masks) == {f"{n}.weight" for n in convs} - {"conv1.weight"}  # 3 input channels
    assert masked_weights_hold(result.module, result.plan, NM(2, 4)) == []
    rows = result.report.pass_record("Sparsify").rows
    assert any(r.get("weight") == "conv1.weight" and "not sparsified" in r.get("note", "") for r in rows)
    assert all(r["sparsity"] == "0.500" for r in rows if r["weight"] in result.plan.masks)
    fresh = torchvision.models.resnet18(num_classes=16)
    fresh.load_state_dict(result.module.state_dict(), strict=True)
    assert masked_weights_hold(fresh, result.plan, NM(2, 4)) == []


def test_convolutions_through_the_export_frontend_are_2_4_along_input_channels():
    model, x = build("resnet")
    result = fxsparse.compile(model, x, [passes.Sparsify("2:4", transposable=True, eligible=ANY_SIZE)],
                              frontend="export")
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(result.plan.masks) == convs - {"stem.0.weight", "fc.weight"}, set(result.plan.masks) ^ convs
    rows = {r["weight"]: r.get("note", "") for r in result.report.pass_record("Sparsify").rows}
    assert "10 rows are not a multiple of 4" in rows["fc.weight"] and "3 inputs" in rows["stem.0.weight"]
    assert {e["layout"] for e in result.plan.masks.values()} == {"conv"}
    assert masked_weights_hold(result.module, result.plan, NM(2, 4, transposable=True)) == []


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_hugging_face_models_are_2_4_in_every_linear_like_weight(kind):
    model, inputs = tiny_hf_model(kind)
    result = fxsparse.compile(model, inputs, [passes.Sparsify("2:4", transposable=kind == "llama")])
    layers = {n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    masked = {name.rsplit(".", 1)[0] for name in result.plan.masks}
    tied = {"lm_head"} & layers if model.config.tie_word_embeddings else set()
    assert masked == layers - tied, masked ^ layers
    if tied:  # the tied weight is also the token embedding: not sparsified, and the report says why
        rows = result.report.pass_record("Sparsify").rows
        assert any("lm_head.weight" in r["weight"] and "embedding" in r.get("note", "") for r in rows), rows
    pattern = NM(2, 4, transposable=kind == "llama")
    assert masked_weights_hold(result.module, result.plan, pattern) == []
    if kind == "gpt2":
        assert {e["layout"] for e in result.plan.masks.values()} == {"in_out"}  # Conv1D, stored [in, out]


def test_sparsify_after_channel_permutation_is_2_4_on_the_permuted_weights():
    model, x = build("resnet")
    result = fxsparse.compile(model.eval(), x, [passes.ChannelPermutation("2:4"), passes.Sparsify("2:4")])
    assert result.plan.masks and masked_weights_hold(result.module, result.plan, NM(2, 4)) == []


def test_include_exclude_and_a_custom_eligibility_rule():
    model, x = build("resnet")
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    only = fxsparse.compile(model, x, [passes.Sparsify("2:4", include=["layers.4"], exclude=["layers.4.conv2"],
                                                       eligible=ANY_SIZE)])
    assert set(only.plan.masks) == {n for n in layers if n.startswith("layers.4.") and n != "layers.4.conv2.weight"}
    by_type = fxsparse.compile(model, x, [passes.Sparsify("unstructured", sparsity=0.5, include=[nn.Linear])])
    assert set(by_type.plan.masks) == {n for n, m in layers.items() if isinstance(m, nn.Linear)}
    big = fxsparse.compile(model, x, [passes.Sparsify("2:4", eligible=Eligibility(min_inputs=64))])
    assert set(big.plan.masks) == {n for n, m in layers.items() if m.weight.shape[1] >= 64}


class TiedLayers(nn.Module):
    """Two layers that share one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_shared_weight_is_masked_once_and_stays_shared_also_in_place():
    result = fxsparse.compile(TiedLayers(), torch.randn(2, 32), [passes.Sparsify("2:4")])
    assert list(result.plan.masks) == ["a.weight"]
    assert result.module.a.weight is result.module.b.weight and NM(2, 4).holds(result.module.b.weight, "linear")
    model = TiedLayers()
    fxsparse.compile(model, torch.randn(2, 32), ["Sparsify"], inplace=True)
    assert model.a.weight is model.b.weight and NM(2, 4).holds(model.a.weight, "linear")
    assert float((model.a.weight == 0).float().mean()) == 0.5


def test_global_unstructured_sparsity_over_a_model():
    model, x = build("resnet")
    result = fxsparse.compile(model, x, [passes.Sparsify("unstructured", sparsity=0.8, scope="global")])
    params = dict(result.module.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in result.plan.masks)
    total = sum(params[n].numel() for n in result.plan.masks)
    assert zeros == round(0.8 * total)
    assert "stem.0.weight" in result.plan.masks  # no minimum size for unstructured sparsity
    assert not any("bn" in n or n.endswith("bias") for n in result.plan.masks)  # norms and biases are skipped


# --- kept through training ----------------------------------------------------------------------------------------

def _train(module, optimizer, inputs, steps=20):
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
        logits = out["logits"] if isinstance(out, dict) else out
        logits.float().pow(2).mean().backward()
        optimizer.step()


@pytest.fixture(scope="module")
def sparse_gpt2():
    model, inputs = tiny_hf_model("gpt2")
    return fxsparse.compile(model, inputs, [passes.Sparsify("2:4")]), inputs


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_survive_20_steps_of_sgd_and_adam_with_momentum_and_weight_decay(optimizer, sparse_gpt2):
    result, inputs = sparse_gpt2
    module = copy.deepcopy(result.module)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
            "adam": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)}[optimizer]
    opt = make(module.parameters())
    _train(module, opt, inputs, steps=3)  # dense steps first: the optimizer state is dense when masks arrive
    with torch.no_grad():
        for name, mask in result.plan.sparsity_masks().items():
            dict(module.named_parameters())[name].add_(0.01)  # the pruned entries drifted off zero
    keeper = keep_masks(module, result.plan, opt)
    _train(module, opt, inputs)
    assert masked_weights_hold(module, result.plan, NM(2, 4)) == []
    for name, mask in result.plan.sparsity_masks().items():
        weight = dict(module.named_parameters())[name]
        assert bool((weight[~mask] == 0).all()) and not torch.equal(weight, before[name])
    keeper.remove()
    _train(module, opt, inputs, steps=2)
    assert masked_weights_hold(module, result.plan, NM(2, 4)) != []  # removed: training fills them in again


def test_plan_records_masks_compactly_and_reapplies_them_to_a_fresh_model():
    model, inputs = tiny_hf_model("llama")
    result = fxsparse.compile(model, inputs, [passes.Sparsify("2:4")])
    with tempfile.TemporaryDirectory() as folder:
        path = result.plan.save(os.path.join(folder, "plan.json"))
        plan = fxsparse.Plan.load(path)
        bits = sum(len(entry["bits"]) for entry in plan.masks.values())
        assert bits < sum(p.numel() for n, p in model.named_parameters() if n in plan.masks) / 5  # 8 per byte
    fresh, _ = tiny_hf_model("llama")
    fxsparse.apply_plan(fresh, plan)
    for name, param in fresh.named_parameters():
        assert torch.equal(param, dict(result.module.named_parameters())[name]), name
    with pytest.raises(fxsparse.PlanMismatchError, match="the model has none|not a parameter"):
        fxsparse.apply_plan(torchvision.models.resnet18(), plan)


def test_masks_made_before_a_shrink_are_cut_with_it_and_kept_in_training():
    model, x = build("resnet")
    model.eval()
    result = fxsparse.compile(model, x, [passes.Sparsify("2:4", eligible=ANY_SIZE), passes.Prune(ratio=0.5),
                                         passes.Shrink()])
    masks = result.plan.sparsity_masks()
    params = dict(result.module.named_parameters())
    assert result.plan.kept and all(masks[n].shape == params[n].shape for n in masks)
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in masks)
    fresh, _ = build("resnet")
    fresh.load_state_dict(model.state_dict())
    fxsparse.apply_plan(fresh, result.plan)  # masks first, then the shrink: the order the compile ran them in
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters())
    opt = torch.optim.SGD(result.module.parameters(), lr=0.1, momentum=0.9)
    keep_masks(result.module, result.plan, opt)
    _train(result.module, opt, x, steps=2)
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in masks)


def test_sparsify_after_a_structural_prune_replays_both():
    model, x = build("resnet")
    model.eval()
    result = fxsparse.compile(model, x, [passes.Prune(ratio=0.5), passes.Shrink(),
                                         passes.Sparsify("2:4", eligible=ANY_SIZE)])
    assert result.plan.masks and result.plan.kept
    fresh, _ = build("resnet")
    fresh.eval()
    fresh.load_state_dict(model.state_dict())
    fxsparse.apply_plan(fresh, result.plan)
    assert masked_weights_hold(fresh, result.plan, NM(2, 4)) == []
    with torch.no_grad():
        assert torch.allclose(fresh(x), result.module(x), rtol=1e-4, atol=1e-5)


# --- DistributedDataParallel ------------------------------------------------------------------------------------

def test_masks_survive_ddp_training_on_two_processes():
    from ddp_workers import train_sparse_under_ddp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(train_sparse_under_ddp, args=(2, 29500 + os.getpid() % 1000, queue), nprocs=2, join=True)
    results = sorted((queue.get() for _ in range(2)), key=lambda r: r[0])
    (_, holds0, weights0), (_, holds1, weights1) = results
    assert holds0 and holds1
    assert weights0 == weights1  # the ranks stayed in sync
