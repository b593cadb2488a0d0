"""Width growth: ExpandWidth keeps the function exactly on every family, the copies diverge when trained, a LayerNorm
grows only uniformly, a cut model grows back to exactly its widths, plans replay, the optimizer keeps working."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fxsparse
from conftest import main_output, randomize_constants, tiny_hf_model
from fxsparse.growth import sparse_model_width
from fxsparse.inputs import inputs_like, normalize_example_inputs
from fxsparse.passes import ExpandWidth

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_grows_exactly(model: nn.Module, example, **options) -> fxsparse.CompileResult:
    """Grow with ExpandWidth; outputs on fresh random inputs equal the original's (<= 1e-5 relative)."""
    model = randomize_constants(model.eval())
    result = fxsparse.compile(model, example, [ExpandWidth(**options)])
    args, kwargs = inputs_like(*normalize_example_inputs(example), torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = main_output(model(*args, **kwargs)), main_output(result.module(*args, **kwargs))
    assert expected.abs().max() > 0
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"growth changed the output: relative {error:.2e}"
    assert n_params(result.module) > n_params(model)
    return result


def grown_kinds(result) -> set[str]:
    return {row["kind"] for row in result.report.pass_record("ExpandWidth").rows if row["result"].startswith("grown")}


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "convnext", "vit"])
def test_torchvision_families_grow_exactly(name):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    model = {
        "resnet": lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                           num_classes=10),
        "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10),
        "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10),
        "vit": lambda: torchvision.models.vision_transformer.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32),
    }[name]()
    result = assert_grows_exactly(model, torch.randn(1, 3, 32, 32))
    if name == "mobilenet_v2":  # depthwise convolutions come back depthwise, not grouped
        for module in result.module.modules():
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                assert module.groups == module.in_channels == module.out_channels
    if name == "vit":  # the residual width through its LayerNorms, and whole heads
        assert grown_kinds(result) == {"channels", "heads/groups"}
        assert result.module.encoder.ln.normalized_shape == (32,)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hugging_face_families_grow_exactly(kind):
    model, inputs = tiny_hf_model(kind)
    result = assert_grows_exactly(model, inputs)
    rows = result.report.pass_record("ExpandWidth").rows
    assert {"channels", "heads/groups"} <= grown_kinds(result)
    widths = {row["units"] for row in rows if row["kind"] == "channels"}
    if kind == "llama":  # the residual (RMSNorm over it) grows too, 32 -> 64; key/value groups with their heads
        assert "32 -> 64" in widths
        shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
        assert shapes["model.embed_tokens.weight"] == (100, 64)
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)  # 8 heads of 8
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # 4 key/value groups of 8
    if kind == "gpt2":  # the tied embedding / LM head blocks the residual: only MLP channels and heads grow
        assert widths == {"128 -> 256"}
        assert tuple(result.module.state_dict()["transformer.wte.weight"].shape) == (100, 32)


def test_layer_norm_grows_only_uniformly_and_keeps_its_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    example = torch.randn(4, 6)
    result = assert_grows_exactly(model, example, factor=2, split="even")
    norm = result.module.get_submodule("1")
    assert norm.normalized_shape == (16,)
    with torch.no_grad():  # each normalised value appears twice, unchanged: same mean and variance
        before, after = model[1](model[0](example)), norm(result.module.get_submodule("0")(example))
    assert torch.allclose(after[:, ::2], before, atol=1e-6) and torch.allclose(after[:, 1::2], before, atol=1e-6)
    # 8 -> 12 cannot repeat every channel alike: the group is left alone, and the report says why
    kept = fxsparse.compile(model, example, [ExpandWidth(factor=1.5)], verify=False)
    row = kept.report.pass_record("ExpandWidth").rows[0]
    assert row["result"].startswith("kept: a LayerNorm") and n_params(kept.module) == n_params(model)


def test_non_uniform_counts_and_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    result = assert_grows_exactly(model, torch.randn(4, 6), factor=1.5)
    assert result.module.get_submodule("0").weight.shape == (15, 6)
    assert result.module.get_submodule("2").weight.shape == (10, 15)  # round(7 * 1.5): 10
    only_first = fxsparse.compile(model, torch.randn(4, 6), [ExpandWidth(include="0.")]).module
    assert only_first.get_submodule("2").weight.shape == (7, 20)
    excluded = fxsparse.compile(model, torch.randn(4, 6), [ExpandWidth(exclude=["2."])]).module
    assert excluded.get_submodule("2").weight.shape == (7, 10)
    for bad, match in [({"factor": 0.5}, "factor"), ({"split": "odd"}, "split"), ({"kinds": ["rows"]}, "kinds"),
                       ({"factor": None}, "like")]:
        with pytest.raises(fxsparse.BadArgumentError, match=match):
            ExpandWidth(**bad)


def test_lemon_split_breaks_symmetry_and_the_grown_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for split, diverge in (("lemon", True), ("even", False)):
        grown = fxsparse.compile(model, x, [ExpandWidth(split=split)]).module.train()
        optimizer = torch.optim.SGD(grown.parameters(), lr=0.1)
        losses = []
        for _ in range(5):
            loss = nn.functional.mse_loss(grown(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        rows = grown.get_submodule("0").weight  # unit k's copies are rows 2k and 2k + 1
        gap = (rows[0::2] - rows[1::2]).abs().max().item()
        assert (gap > 1e-4) == diverge, f"{split}: copies differ by {gap:.2e}"
        assert losses[-1] < losses[0]


def test_cut_model_grows_back_to_exactly_the_original_widths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    example = torch.randn(4, 6)
    cut = fxsparse.prune(model, example, keep=0.25).module  # 10 -> 2 or 3, 7 -> 1 or 2: not divisors
    assert n_params(cut) < n_params(model)
    grown = fxsparse.compile(cut, example, [ExpandWidth(factor=None, like=model)]).module
    assert {k: v.shape for k, v in grown.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_plan_replays_on_a_fresh_instance():
    transformers = pytest.importorskip("transformers")
    model, inputs = tiny_hf_model("llama")
    result = fxsparse.compile(model, inputs, [ExpandWidth()])
    assert result.plan.scales  # consumers' splits are recorded with the gathers
    fresh = transformers.LlamaForCausalLM(copy.deepcopy(model.config)).eval()
    fxsparse.apply_plan(fresh, fxsparse.Plan.from_dict(result.plan.to_dict()))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in result.module.state_dict().items()}
    assert fresh.config.hidden_size == 64 and fresh.config.num_key_value_heads == 4
    fresh.load_state_dict(result.module.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, result.module(**inputs).logits, atol=1e-5)


def test_plan_replay_keeps_depthwise_convolutions():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    result = fxsparse.compile(model, example, [ExpandWidth()])
    fresh = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)
    fxsparse.apply_plan(fresh, result.plan)
    fresh.load_state_dict(result.module.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(example), result.module(example), atol=1e-5)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_in_place_growth_keeps_the_loss_and_the_optimizer(optimizer_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
    options = {"lr": 0.05, "momentum": 0.9} if optimizer_class is torch.optim.SGD else {"lr": 0.01}
    optimizer = optimizer_class(model.parameters(), **options)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    old_first = model[0].weight
    old_state = {k: v.clone() for k, v in optimizer.state[model[3].weight].items()}
    with torch.no_grad():
        before = nn.functional.mse_loss(model(x), y).item()
    fxsparse.expand_width(model, x, optimizer=optimizer, split="even")
    with torch.no_grad():
        after = nn.functional.mse_loss(model(x), y).item()
    assert after == pytest.approx(before, rel=1e-5)
    assert model[0].weight.shape == (16, 6) and model[2].normalized_shape == (16,)
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in model.parameters()} and id(old_first) not in params
    state = optimizer.state[model[3].weight]  # a consumer: columns of each copy scaled by the share (1/2)
    key = "momentum_buffer" if optimizer_class is torch.optim.SGD else "exp_avg"
    assert torch.allclose(state[key][:, ::2], old_state[key] / 2)
    if optimizer_class is torch.optim.AdamW:
        assert torch.allclose(state["exp_avg_sq"][:, 1::2], old_state["exp_avg_sq"] / 4)
        assert float(state["step"]) == 3.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(options["lr"] / 8)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_width_growth_trainer_ends_at_the_original_size_with_the_same_loss_at_each_growth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    original = n_params(model)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    loss = lambda: nn.functional.mse_loss(model(x), y).item()  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparse_model_width(model, optimizer, 2, [1, 1, -1], example_inputs=x)
    assert n_params(model) < original
    trainer, losses = optimizer.fxsparse_growth, []
    trainer.before_growth.append(lambda t: losses.append(loss()))
    trainer.after_growth.append(lambda t: losses.append(loss()))
    for _ in range(6):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()  # a growth happens in the optimizer's step post hook
    assert n_params(model) == original and len(losses) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[2] == pytest.approx(losses[3], rel=1e-5)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_msmodelslim_documentation_example_runs_unchanged_with_width_growth():
    # the example of msModelSlim's "sparse training acceleration" page (CPU, torch's SGD), with sparse_model_width:
    # no example inputs, so the cut happens at the first forward
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1, 1, bias=False),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10, bias=False),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_per_epoch, epochs_each_stage = 10, [2, 3, 1]
    original_model_params = n_params(model)
    same = sparse_model_width(model, optimizer, steps_per_epoch=steps_per_epoch, epochs_each_stage=epochs_each_stage)
    sizes = []
    for _ in range(steps_per_epoch * sum(epochs_each_stage)):
        optimizer.zero_grad()
        output = model(torch.ones([1, 3, 32, 32]))
        loss = torch.mean(output)
        loss.backward()
        optimizer.step()
        sizes.append(n_params(model))
    assert same is model and sizes[0] < sizes[19] < sizes[49] == original_model_params
    assert sizes[18] == sizes[0] and sizes[48] == sizes[19]  # grown after 20 and 50 optimizer steps
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_hugging_face_model_grows_in_place():
    model, inputs = tiny_hf_model("gpt2")
    with torch.no_grad():
        before = model(**inputs).logits
    fxsparse.expand_width(model, inputs)
    attention = model.transformer.h[0].attn
    assert attention.c_attn.nf == 3 * 64 and attention.num_heads == 8 and attention.split_size == 64
    assert model.transformer.h[0].mlp.c_fc.nf == 256 and model.config.n_inner == 256
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-5)


def _ddp_width_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
        original = n_params(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))  # different data on each rank
        sparse_model_width(model, optimizer, 1, [1, 1, -1], example_inputs=x)
        wrapped = [nn.parallel.DistributedDataParallel(model)]
        # the recipe: after a growth, wrap the model again (DDP holds the parameters it was built with)
        optimizer.fxsparse_growth.after_growth.append(
            lambda t: wrapped.__setitem__(0, nn.parallel.DistributedDataParallel(model)))
        for _ in range(4):
            optimizer.zero_grad()
            wrapped[0](x).square().mean().backward()
            optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        results[rank] = (n_params(model) == original, float((gathered[0] - gathered[1]).abs().max()))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_identical_weights_after_width_growth():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_width_worker, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1] == (True, 0.0)
