"""SparseKernels: sparse layers moved onto torch.sparse kernels only where (a timer says) faster, exactly.

Decisions depend on timing, so every test injects a timer: ``timer(layer, format, fn, limit) -> seconds``. The
timers still call ``fn`` once, so the kernels really run. One test uses the real timer, on a tiny layer, and only
checks the invariant that holds whatever the machine measures: a replaced layer was measured faster.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.errors import BadArgumentError
from fxsparse.inputs import inputs_like, normalize_example_inputs
from fxsparse.kernels import SparseConv1x1, SparseFormat, SparseLinear
from fxsparse.passes import SparseKernels

from conftest import main_output, tiny_hf_model

EXACT = 1e-5


def timer_preferring(winner: str, factor: float = 2.0):
    """A timer that calls the candidate once and says ``winner`` is ``factor`` times faster than dense; every
    other format is slower than dense."""

    def timer(layer, fmt, fn, limit):
        fn()
        if fmt == "dense":
            return 1.0
        return 1.0 / factor if fmt == winner else 3.0

    return timer


def zero_unstructured(model: nn.Module, sparsity: float, seed: int = 0, kinds=(nn.Linear, nn.Conv2d)) -> nn.Module:
    """Zero a random ``sparsity`` of every weight of the given layer kinds (1x1 convs only), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, kinds) and (not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1)):
                keep = torch.rand(module.weight.shape, generator=generator) >= sparsity
                module.weight.mul_(keep)
    return model


def zero_magnitude(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the ``sparsity`` smallest-magnitude entries of ``weight``, in place."""
    k = int(weight.numel() * sparsity)
    threshold = weight.abs().flatten().kthvalue(k).values
    weight.mul_(weight.abs() > threshold)


def zero_blocks(weight: torch.Tensor, sparsity: float, block: int, seed: int = 0) -> None:
    """Zero ``sparsity`` of the ``block`` x ``block`` tiles of ``weight`` (rounded), chosen at random, in place."""
    rows, cols = weight.shape[0] // block, weight.shape[1] // block
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[order[: round(rows * cols * sparsity)]] = False
    keep = keep.reshape(rows, cols)
    weight.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def relative_error(reference: nn.Module, compiled: nn.Module, example) -> float:
    """Largest difference on a fresh input, relative to the reference's largest output magnitude."""
    args, kwargs = inputs_like(*normalize_example_inputs(example), torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = main_output(reference(*args, **kwargs)), main_output(compiled(*args, **kwargs))
    assert got.shape == expected.shape
    assert expected.abs().max() > 0, "the reference output is all zeros: this comparison could not fail"
    return ((got - expected).abs().max() / expected.abs().max()).item()


def rows_of(result) -> list[dict]:
    return result.report.pass_record("SparseKernels").rows


@pytest.mark.parametrize("fmt", ["csr", "coo", "bsr8x8"])
def test_mlp_rewritten_equals_masked_dense(fmt, one_thread):
    model = mlp()
    with torch.no_grad():
        zero_magnitude(model[0].weight, 0.9)
        zero_blocks(model[2].weight, 0.75, 8)
        zero_unstructured(model[4], 0.8)
    x = torch.randn(4, 32)
    result = fxsparse.compile(model, x, passes=[SparseKernels(timer=timer_preferring(fmt))])
    replaced = [m for m in result.module.modules() if isinstance(m, SparseLinear)]
    rows = rows_of(result)
    chosen = {r["layer"]: r["choice"] for r in rows}
    if fmt.startswith("bsr"):  # only the block-sparse layer has empty 8x8 blocks; the others are not timed in BSR
        assert chosen == {"0": "dense", "2": fmt, "4": "dense"}
    else:
        assert chosen == {"0": fmt, "2": fmt, "4": fmt}
    assert len(replaced) == sum(c != "dense" for c in chosen.values())
    assert relative_error(model, result.module, x) <= EXACT
    assert result.plan.extra["sparse_kernels"] == [
        {"layer": r["layer"], "format": fmt, "speedup": 2.0} for r in rows if r["choice"] != "dense"]


def test_after_sparsify_in_one_compile(one_thread):
    from fxsparse.passes import Sparsify

    model = mlp()
    x = torch.randn(4, 32)
    result = fxsparse.compile(model, x, passes=[Sparsify("unstructured", sparsity=0.9),
                                                SparseKernels(timer=timer_preferring("csr"))])
    rows = rows_of(result)
    assert [r["choice"] for r in rows] == ["csr"] * 3 and all(r["sparsity"] >= 0.89 for r in rows)
    masked = fxsparse.compile(model, x, passes=[Sparsify("unstructured", sparsity=0.9)]).module
    assert relative_error(masked, result.module, x) <= EXACT


def test_never_replaced_when_not_faster_enough(one_thread):
    model = zero_unstructured(mlp(), 0.9)
    x = torch.randn(4, 32)
    result = fxsparse.compile(model, x, passes=[SparseKernels(min_speedup=1e9, timer=timer_preferring("csr"))])
    assert not any(isinstance(m, SparseLinear) for m in result.module.modules())
    rows = rows_of(result)
    assert [r["choice"] for r in rows] == ["dense"] * 3
    assert all("under min_speedup" in r["why"] and r["speedup"] == 2.0 for r in rows)
    assert result.plan.extra["sparse_kernels"] == []


def test_slower_formats_are_never_chosen(one_thread):
    """Every sparse format slower than dense: nothing changes, even with min_speedup below 1."""

    def dense_wins(layer, fmt, fn, limit):
        fn()
        return 1.0 if fmt == "dense" else 1.5

    model = zero_unstructured(mlp(), 0.95)
    result = fxsparse.compile(model, torch.randn(2, 32), passes=[SparseKernels(min_speedup=1.2, timer=dense_wins)])
    assert {r["choice"] for r in rows_of(result)} == {"dense"}


def test_real_timer_replaces_only_what_it_measured_faster(one_thread):
    model = zero_unstructured(mlp(), 0.9)
    x = torch.randn(8, 32)
    result = fxsparse.compile(model, x, passes=[SparseKernels(formats=["csr"], max_seconds=0.05)])
    for row in rows_of(result):
        assert row["dense ms"] > 0 and "csr" in row["tried"]
        if row["choice"] != "dense":
            assert row["best ms"] * 1.05 <= row["dense ms"]
    assert relative_error(model, result.module, x) <= EXACT


def test_report_rows_say_what_was_tried_and_why(one_thread):
    model = mlp()
    with torch.no_grad():
        zero_blocks(model[2].weight, 0.75, 16)
        zero_unstructured(model[4], 0.1)  # under min_sparsity
    result = fxsparse.compile(model, torch.randn(3, 32), passes=[SparseKernels(timer=timer_preferring("bsr16x16"))])
    rows = {r["layer"]: r for r in rows_of(result)}
    dense_layer, block_layer, light_layer = rows["0"], rows["2"], rows["4"]
    assert dense_layer["sparsity"] == 0.0 and "below min_sparsity" in dense_layer["why"]
    assert light_layer["choice"] == "dense" and light_layer["dense ms"] is None
    assert block_layer["shape"] == "64x64" and block_layer["tokens"] == 3
    assert block_layer["sparsity"] == pytest.approx(0.75, abs=0.01)
    tried = block_layer["tried"]
    for expected in ("csr 3000 ms", "coo 3000 ms", "bsr16x16 500 ms", "bsr8x8 3000 ms", "2:4: no CPU kernel"):
        assert expected in tried, (expected, tried)
    assert block_layer["choice"] == "bsr16x16" and block_layer["speedup"] == 2.0
    assert "bsr16x16 is 2.00x dense" in block_layer["why"]
    assert "1 of 3 layers moved to sparse kernels (bsr16x16)" in result.report.pass_record("SparseKernels").summary
    text = str(result.report)
    assert "bsr16x16" in text and "min_sparsity" in text


def test_bsr_skips_block_sizes_that_do_not_divide_or_have_no_empty_block(one_thread):
    torch.manual_seed(0)
    model = zero_unstructured(nn.Sequential(nn.Linear(24, 40)), 0.9).eval()
    result = fxsparse.compile(model, torch.randn(2, 24),
                              passes=[SparseKernels(formats=["bsr"], block_sizes=[16], timer=timer_preferring("csr"))])
    row = rows_of(result)[0]
    assert row["tried"] == "bsr: no block size in [16] divides the weight"
    assert row["choice"] == "dense" and row["why"] == "no sparse format could be timed"


def test_tiny_bert_through_export(one_thread):
    model, inputs = tiny_hf_model("bert")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                zero_magnitude(p, 0.8)
    result = fxsparse.compile(model, inputs, passes=[SparseKernels(timer=timer_preferring("csr"))], frontend="export")
    assert result.report.frontend == "export"
    rows = rows_of(result)
    assert len(rows) == 13 and all(r["choice"] == "csr" for r in rows)  # 2 layers x 6 linears, and the pooler
    assert sum(isinstance(m, SparseLinear) for m in result.module.modules()) == 13
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.linear.default
                   for n in result.module.graph.nodes)
    assert relative_error(model, result.module, inputs) <= EXACT


def test_torchvision_resnet_1x1_convs(one_thread):
    torchvision = pytest.importorskip("torchvision")
    model = zero_unstructured(torchvision.models.resnet18(num_classes=10), 0.8, kinds=(nn.Conv2d,)).eval()
    x = torch.randn(1, 3, 32, 32)
    result = fxsparse.compile(model, x, passes=[SparseKernels(timer=timer_preferring("csr"))])
    convs = [m for m in result.module.modules() if isinstance(m, SparseConv1x1)]
    assert len(convs) == 3 and all(c.stride == (2, 2) for c in convs)  # the downsampling 1x1 convs
    assert relative_error(model, result.module, x) <= EXACT


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_small_cnn_1x1_convs_both_frontends(frontend, one_thread):
    torch.manual_seed(0)
    model = zero_unstructured(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1, stride=2),
        nn.Conv2d(32, 8, 3)).eval(), 0.8, kinds=(nn.Conv2d,))
    x = torch.randn(2, 3, 9, 9)
    result = fxsparse.compile(model, x, passes=[SparseKernels(timer=timer_preferring("csr"))], frontend=frontend)
    rows = rows_of(result)
    assert [(r["kind"], r["choice"], r["tokens"]) for r in rows] == [("conv1x1", "csr", 2 * 9 * 9),
                                                                     ("conv1x1", "csr", 2 * 5 * 5)]
    assert sum(isinstance(m, SparseConv1x1) for m in result.module.modules()) == 2
    assert relative_error(model, result.module, x) <= EXACT


def test_tied_weights_stay_dense(one_thread):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = zero_unstructured(Tied(), 0.9).eval()
    result = fxsparse.compile(model, torch.randn(2, 16), passes=[SparseKernels(timer=timer_preferring("csr"))])
    assert all(r["choice"] == "dense" and "shared" in r["why"] for r in rows_of(result))


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_save_load_round_trip(tmp_path, frontend, one_thread):
    model = zero_unstructured(mlp(), 0.9)
    x = torch.randn(4, 32)
    result = fxsparse.compile(model, x, passes=[SparseKernels(timer=timer_preferring("csr"))], frontend=frontend)
    path = result.save(tmp_path / "sparse.pt2")
    loaded = fxsparse.load(path)
    assert relative_error(model, loaded, x) <= EXACT
    assert any(n.target is torch.ops.fxsparse_kernels.sparse_linear.default for n in loaded.graph.nodes)
    assert loaded.fxsparse_plan.extra["sparse_kernels"][0]["format"] == "csr"


def test_sparse_module_counts_what_it_stores():
    weight = torch.zeros(8, 16)
    weight[0, :4] = 1.0
    layer = SparseLinear(weight, torch.ones(8), SparseFormat("csr"))
    assert layer.values.numel() == 4 and not layer.values.requires_grad
    assert torch.equal(layer.dense_weight(), weight)
    assert fxsparse.metrics.count_parameters(layer) == 4 + 8


@pytest.mark.parametrize("options", [{"min_speedup": 0}, {"min_sparsity": 2}, {"formats": ["dia"]},
                                     {"formats": "csr"}, {"block_sizes": [0]}, {"ignore": "fc"}])
def test_bad_options(options):
    with pytest.raises(BadArgumentError, match="SparseKernels"):
        SparseKernels(**options)


def test_ignore_keeps_a_layer_dense(one_thread):
    model = zero_unstructured(mlp(), 0.9)
    result = fxsparse.compile(model, torch.randn(2, 32),
                              passes=[SparseKernels(ignore=["2"], timer=timer_preferring("csr"))])
    assert {r["layer"]: r["choice"] for r in rows_of(result)} == {"0": "csr", "2": "dense", "4": "csr"}


def test_plots(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    from fxsparse import plots

    model = zero_unstructured(mlp(), 0.9)
    result = fxsparse.compile(model, torch.randn(2, 32), passes=[SparseKernels(timer=timer_preferring("csr"))])
    for path in (result.report.plot_sparsity(tmp_path / "s.png"), result.report.plot_latency(tmp_path / "l.png"),
                 plots.plot_sparsity(model, tmp_path / "m.png"),
                 plots.plot_latency([{"series": "dense", "sparsity": 0.5, "ms": 1.0},
                                     {"series": "csr", "sparsity": 0.5, "ms": 0.5}], tmp_path / "b.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.layer_sparsity(model)[0][1] == pytest.approx(0.9, abs=0.05)
    with pytest.raises(BadArgumentError, match="nothing to plot"):
        plots.plot_latency([], tmp_path / "x.png")
