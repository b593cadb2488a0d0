"""2:4 semi-structured kernels in SparseKernels, tested without a GPU.

torch runs 2:4 semi-structured matmuls on CUDA only, so these tests check what can be checked here: the rules that
decide where torch can run one (the device facts are parameters of ``semi_structured_unsupported``, so no torch
function is mocked), that on CPU the pass says why 2:4 was not tried and replaces nothing with it, that the module
holds what torch's own conversion makes (built with torch's CPU reference conversion, which the kernels' layout
is defined by) and that such a module saves as a torch.export program. The GPU path itself is exercised by
``benchmarks/semi_structured_gpu.py``.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import fxsparse
from fxsparse import kernels
from fxsparse.kernels import SemiStructuredConv1x1, SemiStructuredLinear, semi_structured_unsupported
from fxsparse.passes import SparseKernels, Sparsify
from fxsparse.serialize import load_module, save_module

AMPERE, TURING, HOPPER = (8, 0), (7, 5), (9, 0)


def two_four(rows: int, cols: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 nonzeros in every group of 4 along its input (column) dimension."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    keep = torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=-1).argsort(dim=-1) < 2
    return (weight * keep.reshape(rows, cols)).to(dtype)


def reason(weight, x=None, **facts) -> str:
    facts = {"device_type": "cuda", "capability": AMPERE, "cusparselt": True} | facts
    return semi_structured_unsupported(weight, weight.new_zeros(8, weight.shape[1]) if x is None else x, **facts)


def test_supported_cases_have_no_reason():
    assert reason(two_four(64, 64)) == ""
    assert reason(two_four(64, 128, torch.bfloat16), capability=HOPPER) == ""
    assert reason(two_four(64, 64), cusparselt=False) == ""  # CUTLASS, on sm8x
    sparser = two_four(32, 64) * (torch.arange(64) % 4 == 0)  # 1 nonzero in 4: still fits 2:4
    assert reason(sparser) == ""


def test_cpu_has_no_kernel():
    weight = two_four(64, 64)
    assert "no CPU kernel" in semi_structured_unsupported(weight, torch.zeros(8, 64, dtype=torch.float16))
    assert "no CPU kernel" in reason(weight, device_type="cpu")


def test_old_gpus_are_refused_naming_sm80():
    why = reason(two_four(64, 64), capability=TURING)
    assert "sm80" in why and "sm75" in why


def test_cutlass_only_torch_needs_sm8x():
    why = reason(two_four(64, 64), capability=HOPPER, cusparselt=False)
    assert "cuSPARSELt" in why and "sm8x" in why and "sm90" in why


def test_dtypes_follow_torchs_backends():
    # float32: in torch's CUTLASS table (its kernel multiplies in TF32: the pass's numeric check then decides), not
    # in cuSPARSELt's
    assert reason(two_four(64, 64, torch.float32), cusparselt=False) == ""
    why = reason(two_four(64, 64, torch.float32))
    assert "float32" in why and "cusparselt" in why and "float16/bfloat16" in why
    assert "float64" in reason(two_four(64, 64, torch.float64), cusparselt=False)
    why = reason(two_four(64, 64), x=torch.zeros(8, 64, dtype=torch.float32))
    assert "input dtype" in why


def test_shapes_must_be_multiples_of_the_backends_tile():
    # cuSPARSELt's float16 tile is 16x16, CUTLASS's 32x64 (torch.sparse.semi_structured)
    assert reason(two_four(48, 64)) == ""
    assert "48x64 is not a multiple of 32x64" in reason(two_four(48, 64), cusparselt=False)
    assert "40x64 is not a multiple of 16x16" in reason(two_four(40, 64))
    assert "64x24" in reason(two_four(64, 24))


def test_weights_that_are_not_2_4_are_refused():
    weight = two_four(64, 64)
    weight[3, 4:8] = 1.0  # one group of 4 with 4 nonzeros
    why = reason(weight)
    assert "not 2:4" in why and "1 of 1024 groups" in why
    assert "not 2:4" in reason(weight.t().contiguous() * 0 + 1)  # dense


def test_torch_without_the_api():
    assert "to_sparse_semi_structured" in reason(two_four(64, 64), has_api=False)


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype).eval()


def timer_preferring_2_4(layer, fmt, fn, limit):
    """Says 2:4 would be twice as fast as dense and every other format slower: only 2:4 could be chosen."""
    fn()
    return {"dense": 1.0, "semi_structured": 0.5}.get(fmt, 3.0)


def test_pass_on_cpu_says_why_2_4_was_not_tried(one_thread):
    model = mlp()
    x = torch.randn(4, 64)
    result = fxsparse.compile(model, x, passes=[Sparsify(pattern="2:4"), SparseKernels(timer=timer_preferring_2_4)])
    rows = result.report.pass_record("SparseKernels").rows
    assert [r["sparsity"] for r in rows] == [0.5, 0.5]
    for row in rows:
        assert "2:4: no CPU kernel" in row["tried"] and row["choice"] == "dense", row
    assert not any(isinstance(m, SemiStructuredLinear) for m in result.module.modules())
    assert result.plan.extra["sparse_kernels"] == []


def test_half_precision_on_cpu_is_left_dense_with_a_reason(one_thread):
    model = mlp(torch.float16)
    x = torch.randn(4, 64, dtype=torch.float16)
    result = fxsparse.compile(model, x, passes=[Sparsify(pattern="2:4"), SparseKernels(timer=timer_preferring_2_4)])
    rows = result.report.pass_record("SparseKernels").rows
    assert all(r["choice"] == "dense" and "2:4 semi-structured on CUDA" in r["why"] for r in rows), rows


# -- the module, built with torch's CPU reference conversion (its kernels need CUDA) ---------------------------------
@pytest.fixture
def cutlass_on_cpu(monkeypatch):
    """Compress with torch's reference CUTLASS conversion, which runs on CPU, instead of ``from_dense`` (CUDA)."""

    def compress(dense, cusparselt):
        packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
        with warnings.catch_warnings():  # "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"
            warnings.simplefilter("ignore")
            return SparseSemiStructuredTensorCUTLASS(dense.shape, packed=packed, meta=meta, packed_t=None,
                                                     meta_t=None, compressed_swizzled_bitmask=None)

    monkeypatch.setattr(kernels, "compress_semi_structured", compress)


def test_module_holds_the_weight_it_was_given(cutlass_on_cpu):
    weight, bias = two_four(64, 64), torch.randn(64, dtype=torch.float16)
    linear = SemiStructuredLinear(weight, bias, cusparselt=False)
    assert isinstance(linear.weight, SparseSemiStructuredTensorCUTLASS) and not linear.weight.requires_grad
    assert torch.equal(linear.dense_weight(), weight) and torch.equal(linear.bias, bias)
    assert "backend=cutlass" in repr(linear)
    conv = SemiStructuredConv1x1(weight[:, :, None, None], None, stride=(2, 2), cusparselt=False)
    assert torch.equal(conv.dense_weight(), weight[:, :, None, None]) and conv.bias is None


def test_module_saves_as_an_export_program(tmp_path, cutlass_on_cpu):
    weight = two_four(64, 64)
    model = nn.Sequential(SemiStructuredLinear(weight, torch.randn(64, dtype=torch.float16), cusparselt=False))
    path = tmp_path / "semi.pt2"
    assert save_module(model, path, (torch.randn(2, 3, 64, dtype=torch.float16),), {}, {}) == "export"
    loaded, _ = load_module(path)
    stored = dict(loaded.named_parameters())["0.weight"]
    assert isinstance(stored, SparseSemiStructuredTensorCUTLASS)
    assert torch.equal(stored.packed, model[0].weight.packed) and torch.equal(stored.meta, model[0].weight.meta)


class ItemInForward(nn.Module):
    """torch.export cannot take data-dependent Python control flow without meta shapes: pickled instead."""

    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_pickling_instead_of_exporting_is_logged_with_the_reason(tmp_path):
    # a handler on fxsparse's own logger: the CLI (run in-process by other tests) stops it propagating to the root
    logger, records = logging.getLogger("fxsparse"), _Records()
    logger.addHandler(records)
    try:
        fmt = save_module(ItemInForward(), tmp_path / "m.pt2", (torch.ones(2),), {}, {})
    finally:
        logger.removeHandler(records)
    assert fmt == "pickle"
    assert any("is pickled, not a torch.export program (torch.export failed:" in r.getMessage()
               for r in records.records)


def test_a_kernel_that_still_refuses_leaves_the_layer_dense(cutlass_on_cpu, monkeypatch, one_thread):
    """Where the rules pass but torch's kernel raises anyway (here: the rules are told "supported" on CPU, and
    torch has no CPU kernel), the layer stays dense and the row names the error: no crash, nothing replaced."""
    import fxsparse.passes.sparse_kernels as pass_module

    monkeypatch.setattr(pass_module, "semi_structured_unsupported", lambda weight, x: "")
    model = mlp()
    x = torch.randn(4, 64)
    result = fxsparse.compile(model, x, passes=[Sparsify(pattern="2:4"), SparseKernels(timer=timer_preferring_2_4)])
    for row in result.report.pass_record("SparseKernels").rows:
        assert "2:4 failed (NotImplementedError: Could not run 'aten::_sparse_semi_structured_addmm'" in row["tried"]
        assert row["choice"] == "dense"
    assert not any(isinstance(m, SemiStructuredLinear) for m in result.module.modules())
