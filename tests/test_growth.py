"""The growth trainer: msModelSlim's schedule on the user's own model and optimizer, function-preserving growths,
optimizer state and schedulers carried, checkpoints resumed, DDP."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxsparse
from fxsparse.growth import sparse_model_depth, sparse_model_width
from fxsparse.metrics import count_parameters

from conftest import tiny_hf_model


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(depth))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def loss_of(model, data):
    x, y = data
    return nn.functional.cross_entropy(model(x), y)


def train(model, optimizer, steps, scheduler=None, accumulate=1, seed=0):
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            loss_of(model, batch(seed + step * accumulate + micro)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_msmodelslim_documentation_example_runs_and_ends_at_the_original_size(one_thread):
    # the example of msModelSlim's "sparse training acceleration" page, on CPU with torch's SGD (no NPU, no apex)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1, 1, bias=False),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.Sequential(nn.Conv2d(32, 64, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 32, 1, 1, bias=False)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10, bias=False),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_per_epoch, epochs_each_stage = 10, [2, 3, 1]
    original_model_params = count_parameters(model)
    same = sparse_model_depth(model, optimizer, steps_per_epoch=steps_per_epoch, epochs_each_stage=epochs_each_stage)
    assert same is model and len(model) == 5  # 1 of the 4 blocks at stage 1
    sizes = []
    for _ in range(steps_per_epoch * sum(epochs_each_stage)):
        optimizer.zero_grad()
        output = model(torch.ones([1, 3, 32, 32]))
        loss = torch.mean(output)
        loss.backward()
        optimizer.step()
        sizes.append(len(model))
    assert sizes[19] == 6 and sizes[49] == 8  # grown after 20 and 50 optimizer steps
    assert count_parameters(model) == original_model_params
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_growth_preserves_the_loss_and_carries_adam_state_and_the_scheduler():
    torch.manual_seed(0)
    model = ResidualNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    sparse_model_depth(model, optimizer, steps_per_epoch=2, epochs_each_stage=[2, 2, -1])
    trainer = optimizer.fxsparse_growth
    assert len(model.blocks) == 1
    probe, losses = batch(99), []
    trainer.before_growth.append(lambda t: losses.append(loss_of(model, probe).item()))
    trainer.after_growth.append(lambda t: losses.append(loss_of(model, probe).item()))
    survivor = model.blocks[0].fc1.weight
    train(model, optimizer, 3, scheduler)
    moments = optimizer.state[survivor]["exp_avg"].clone()
    train(model, optimizer, 1, scheduler)  # step 4: the growth to 2 blocks
    assert len(model.blocks) == 2 and len(losses) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    assert model.blocks[0].fc1.weight is survivor and not torch.equal(optimizer.state[survivor]["exp_avg"], moments)
    copy_fc1, copy_fc2 = model.blocks[1].fc1.weight, model.blocks[1].fc2.weight
    assert torch.equal(optimizer.state[copy_fc1]["exp_avg"], optimizer.state[survivor]["exp_avg"])
    assert optimizer.state[copy_fc2]["exp_avg"].abs().max() == 0 and copy_fc2.abs().max() == 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0]) == 1e-2 * 0.5
    train(model, optimizer, 5, scheduler)
    assert len(model.blocks) == 4 and len(losses) == 4
    assert losses[2] == pytest.approx(losses[3], rel=1e-6, abs=1e-7)
    assert copy_fc2.abs().max() > 0  # the zeroed projection trains


def test_stages_count_optimizer_steps_not_forwards():
    model = ResidualNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse_model_depth(model, optimizer, steps_per_epoch=2, epochs_each_stage=[1, 1, 1])
    train(model, optimizer, 1, accumulate=4)
    assert len(model.blocks) == 1
    train(model, optimizer, 1, accumulate=4)
    assert len(model.blocks) == 2


def test_a_checkpoint_taken_mid_schedule_resumes():
    torch.manual_seed(0)
    start = ResidualNet()
    model, fresh = copy.deepcopy(start), copy.deepcopy(start)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparse_model_depth(model, optimizer, steps_per_epoch=2, epochs_each_stage=[1, 2, -1])
    train(model, optimizer, 3)
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "growth": optimizer.fxsparse_growth.state_dict()}
    assert checkpoint["growth"] == {"steps": 3, "stage": 1}
    train(model, optimizer, 4, seed=100)

    resumed_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    sparse_model_depth(fresh, resumed_optimizer, steps_per_epoch=2, epochs_each_stage=[1, 2, -1])
    resumed_optimizer.fxsparse_growth.load_state_dict(checkpoint["growth"])
    fresh.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(fresh, resumed_optimizer, 4, seed=100)
    assert len(fresh.blocks) == len(model.blocks) == 4
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_hugging_face_config_and_layer_indices_follow_the_growth(one_thread):
    model, inputs = tiny_hf_model("llama")
    model.config.num_hidden_layers = 4
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(model.config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sparse_model_depth(model, optimizer, 1, [1, 1, -1], example_inputs=inputs)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    before = model(**inputs).logits.detach()
    optimizer.fxsparse_growth.grow_to(1)
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    assert torch.allclose(model(**inputs).logits, before, atol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    ((0, [1, 1, 1]), "steps_per_epoch"),
    ((10, [1, 1]), "epochs_each_stage"),
    ((10, [1, -1, 1]), r"epochs_each_stage\[1\]"),
    ((10, [1, 2, 0]), r"epochs_each_stage\[2\]"),
])
def test_bad_arguments_are_one_line_errors_and_leave_the_model_alone(arguments, message):
    model = ResidualNet()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(fxsparse.BadArgumentError, match=message):
        sparse_model_depth(model, torch.optim.SGD(model.parameters(), lr=0.1), *arguments)
    assert len(model.blocks) == 4 and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(fxsparse.BadArgumentError, match="DistributedDataParallel|optimizer"):
        sparse_model_depth(model, "sgd", 10, [1, 1, 1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = ResidualNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparse_model_depth(model, optimizer, steps_per_epoch=2, epochs_each_stage=[1, 1, -1])
        wrapped = [nn.parallel.DistributedDataParallel(model)]
        # the recipe: after a growth, wrap the model again (DDP holds the parameters it was built with)
        optimizer.fxsparse_growth.after_growth.append(
            lambda t: wrapped.__setitem__(0, nn.parallel.DistributedDataParallel(model)))
        for step in range(4):
            optimizer.zero_grad()
            loss_of(wrapped[0], batch(rank * 100 + step)).backward()  # different data on each rank
            optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        results[rank] = (len(model.blocks), float((gathered[0] - gathered[1]).abs().max()))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_identical_weights_after_growth():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] == (4, 0.0)


def test_remap_optimizer_gathers_and_scales_the_state_of_a_derived_parameter():
    from fxsparse.growth import Derivation, remap_optimizer

    old, kept = nn.Parameter(torch.arange(6.0).reshape(3, 2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([{"params": [old], "lr": 0.1}, {"params": [kept], "lr": 0.2}])
    (old.sum() * 2 + kept.sum()).backward()
    optimizer.step()
    moments, squares = optimizer.state[old]["exp_avg"].clone(), optimizer.state[old]["exp_avg_sq"].clone()
    index = torch.tensor([0, 2, 2])
    new = nn.Parameter(old.detach()[index] * 0.5)
    remap_optimizer(optimizer, {new: Derivation(old, old, 0.5, ((0, index),))}, [new, kept])
    assert optimizer.param_groups[0]["params"] == [new] and optimizer.param_groups[1]["params"] == [kept]
    assert old not in optimizer.state and kept in optimizer.state
    assert torch.equal(optimizer.state[new]["exp_avg"], moments[index] * 0.5)
    assert torch.equal(optimizer.state[new]["exp_avg_sq"], squares[index] * 0.25)
    optimizer.step()  # the optimizer works on with the new parameter


def test_growth_benchmark_runs_quickly_and_prints_its_table():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "growth_training.py"
    completed = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line.split() for line in completed.stdout.splitlines() if line.startswith(("dense ", "depth "))]
    assert [row[0] for row in rows] == ["dense", "depth"], completed.stdout
    assert "blocks 2" in completed.stdout and "blocks 4" in completed.stdout  # grown from 1 to 2 to 4 blocks
