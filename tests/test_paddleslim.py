"""PaddleSlim's UnstructuredPruner and GMPUnstructuredPruner on PyTorch modules: PaddleSlim's rules, exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.sparse import GMPUnstructuredPruner, UnstructuredPruner

torch.set_num_threads(1)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


PRUNABLE = ["0.weight", "3.weight", "6.weight"]  # norms and biases are skipped


def paddle_threshold(values: list[np.ndarray], ratio: float) -> float:
    """PaddleSlim's update_threshold, in numpy: np.sort(np.abs(flat))[max(0, round(ratio * n) - 1)]."""
    flat = np.concatenate([v.flatten() for v in values])
    return np.sort(np.abs(flat))[max(0, round(ratio * flat.size) - 1)].item()


def test_ratio_mode_gives_paddleslims_masks_on_the_same_weights():
    model = cnn()
    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.55)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    pruner.step()
    threshold = paddle_threshold([weights[n] for n in PRUNABLE], 0.55)
    assert pruner.threshold == pytest.approx(threshold)
    assert sorted(pruner.masks) == PRUNABLE
    for name, param in model.named_parameters():
        expected = np.abs(weights[name]) >= threshold if name in PRUNABLE else weights[name] != 0
        assert np.array_equal(param.detach().numpy() != 0, expected), name
    total = sum(weights[n].size for n in PRUNABLE)
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in PRUNABLE) == round(0.55 * total) - 1


def test_local_sparsity_prunes_every_weight_by_its_own_threshold():
    model = cnn()
    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.5, local_sparsity=True)
    pruner.step()
    params = dict(model.named_parameters())
    for name in PRUNABLE:
        assert int((params[name] == 0).sum()) == round(0.5 * params[name].numel()) - 1, name


def test_threshold_mode_and_summarize_weights():
    model = cnn()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = UnstructuredPruner(model, mode="threshold", threshold=0.1)
    every = np.concatenate([p.detach().numpy().flatten() for n, p in model.named_parameters()
                            if not n.startswith("1.")])  # PaddleSlim skips norm layers, not biases, here
    assert pruner.summarize_weights(model, 0.3) == pytest.approx(
        np.sort(np.abs(every))[max(0, int(0.3 * every.size - 1))].item())
    pruner.step()
    for name, param in model.named_parameters():
        kept = weights[name].abs() >= 0.1 if name in PRUNABLE else weights[name] != 0
        assert torch.equal(param != 0, kept), name
    zeros = sum(int((weights[n].abs() < 0.1).sum()) if n in PRUNABLE else int((weights[n] == 0).sum())
                for n in weights)
    assert UnstructuredPruner.total_sparse(model) == pytest.approx(zeros / sum(p.numel() for p in model.parameters()))


def test_conv1x1_only_and_blocks():
    model = cnn()
    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.5, prune_params_type="conv1x1_only",
                                sparse_block=[2, 2])
    assert list(pruner.masks) == ["3.weight"]
    pruner.step()
    zero = (model[3].weight[:, :, 0, 0] == 0).float()
    blocks = zero.reshape(8, 2, 4, 2).sum(dim=(1, 3))
    assert bool(((blocks == 0) | (blocks == 4)).all()) and 0 < int(zero.sum()) < zero.numel()
    assert UnstructuredPruner.total_sparse_conv1x1(model) == pytest.approx(zero.mean().item())
    assert model[0].weight.count_nonzero() == model[0].weight.numel()
    with pytest.raises(fxsparse.BadArgumentError, match=r"0.weight has shape \[8, 3, 3, 3\]"):
        UnstructuredPruner(cnn(), mode="ratio", sparse_block=[2, 2])


def test_bad_arguments_are_one_line_errors():
    for kwargs, message in (({"mode": "both"}, "mode"), ({"mode": "threshold", "local_sparsity": True}, "local"),
                            ({"mode": "ratio", "prune_params_type": "all"}, "prune_params_type"),
                            ({"mode": "ratio", "sparse_block": [0, 1]}, "sparse_block")):
        with pytest.raises(fxsparse.BadArgumentError, match=message):
            UnstructuredPruner(cnn(), **kwargs)
    with pytest.raises(fxsparse.BadArgumentError, match="more than 10 x pruning_steps"):
        GMPUnstructuredPruner(cnn(), 0.75, configs=dict(GMP_CONFIGS, pruning_iterations=100))


GMP_CONFIGS = {"stable_iterations": 22, "pruning_iterations": 110, "tunning_iterations": 22,
               "resume_iteration": 0, "pruning_steps": 10, "initial_ratio": 0.15}
# r_i = 0.15 + 0.6 * ((i/10 - 1)^3 + 1), worked out by hand: PaddleSlim's schedule from 0.15 to 0.75 in 10 steps
SCHEDULE = [0.15, 0.3126, 0.4428, 0.5442, 0.6204, 0.675, 0.7116, 0.7338, 0.7452, 0.7494]


def test_gmp_follows_paddleslims_cubic_schedule_from_0_15_to_0_75_in_10_steps():
    model = cnn()
    pruner = GMPUnstructuredPruner(model, ratio=0.75, configs=GMP_CONFIGS)
    ratios, sparsity = [], []
    for _ in range(22 + 110 + 22 + 11):
        pruner.step()
        ratios.append(pruner.ratio)
        sparsity.append(sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in PRUNABLE))
    period = 11
    assert ratios[:22] == [0.0] * 22  # two stable periods
    for step, expected in enumerate(SCHEDULE):
        held = ratios[22 + step * period: 22 + (step + 1) * period]
        assert held == pytest.approx([expected] * period, abs=1e-12), step
    assert ratios[132:] == [0.75] * 33  # tuning, then the target for good
    total = sum(p.numel() for n, p in model.named_parameters() if n in PRUNABLE)
    assert sparsity[22] == round(0.15 * total) - 1 and sparsity[-1] == round(0.75 * total) - 1


def test_gmp_resumes_where_it_left_off():
    model, resumed_model = cnn(), cnn()
    pruner = GMPUnstructuredPruner(model, ratio=0.75, configs=GMP_CONFIGS)
    for _ in range(60):
        pruner.step()
    resumed = GMPUnstructuredPruner(resumed_model, ratio=0.75, configs=dict(GMP_CONFIGS, resume_iteration=60))
    assert resumed.ratio == pruner.ratio == pytest.approx(SCHEDULE[3])
    resumed.step()
    pruner.step()
    assert all(torch.equal(resumed.masks[n], pruner.masks[n]) for n in PRUNABLE)


def test_masks_hold_at_every_forward_while_training_and_the_model_loads_into_a_dense_one_strictly():
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GMPUnstructuredPruner(model, ratio=0.75, configs=dict(GMP_CONFIGS, stable_iterations=0))
    generator = torch.Generator().manual_seed(0)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(
        all(bool((dict(module.named_parameters())[n][~pruner.masks[n]] == 0).all()) for n in PRUNABLE)))
    for _ in range(30):
        x, y = torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    pruner.update_params()
    assert all(seen) and pruner.ratio == pytest.approx(SCHEDULE[2])
    fresh = cnn(seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert UnstructuredPruner.total_sparse(fresh) == UnstructuredPruner.total_sparse(model) > 0.3


def test_gmp_digits_example_reaches_75_percent_and_stays_accurate():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import gmp_digits
    finally:
        sys.path.pop(0)
    rows = gmp_digits.run(seed=0, epochs=2, pruning_epochs=3, tuning_epochs=1, pruning_steps=5, initial_ratio=0.15)
    (dense, _, _), (sparse, pruned, overall) = rows["dense"], rows["GMP 75%"]
    assert pruned == pytest.approx(0.75, abs=0.002) and 0.7 < overall < pruned  # norms and biases stay dense
    assert dense > 0.9 and sparse > 0.85, rows
