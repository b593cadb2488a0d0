"""Sparse kernels: layers whose weight is stored in one of torch's sparse formats, and timing them.

A rewritten layer keeps its weight compressed (the values and index arrays of a CSR, COO or BSR tensor, as plain
strided tensors) and multiplies through one custom op, ``torch.ops.fxsparse_kernels.sparse_linear``, which
builds the torch.sparse tensor from them and calls ``torch.addmm`` (sparse @ dense, torch's own kernels: MKL on
CPU, cuSPARSE on CUDA). Why a custom op rather than a sparse tensor attribute: torch.export cannot serialise sparse
tensors, nor build them inside a traced forward, but it does take a custom op with a fake (shape-only) kernel. So
a rewritten model exports, saves and loads as a ``.pt2`` program like any compiled model (loading needs the op
registered: ``import fxsparse``, which ``fxsparse.load`` does), shape inference and FLOP counting see through it,
and the compressed size is what the model really holds.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

LAYOUTS = ("csr", "coo", "bsr")

# -- the op ---------------------------------------------------------------------------------------------------------
_LIBRARY = torch.library.Library("fxsparse_kernels", "DEF")
_LIBRARY.define(
    "sparse_linear(Tensor input, Tensor values, Tensor indices, Tensor offsets, int[] size, str layout, "
    "Tensor? bias) -> Tensor")


def _sparse_weight(values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, size: list[int],
                   layout: str) -> torch.Tensor:
    if layout == "coo":
        return torch.sparse_coo_tensor(indices, values, size, is_coalesced=True, check_invariants=False)
    if layout == "csr":
        return torch.sparse_csr_tensor(offsets, indices, values, size, check_invariants=False)
    return torch.sparse_bsr_tensor(offsets, indices, values, size, check_invariants=False)


def _sparse_linear(input: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                   size: list[int], layout: str, bias: torch.Tensor | None) -> torch.Tensor:
    """``input @ weight.T + bias`` as ``(weight @ input.T).T``: torch multiplies sparse @ dense, not dense @ sparse."""
    weight = _sparse_weight(values, indices, offsets, size, layout)
    columns = input.reshape(-1, size[1]).t()
    out = torch.addmm(bias.unsqueeze(1), weight, columns) if bias is not None else torch.sparse.mm(weight, columns)
    return out.t().contiguous().reshape(input.shape[:-1] + (size[0],))


_LIBRARY.impl("sparse_linear", _sparse_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("fxsparse_kernels::sparse_linear", lib=_LIBRARY)
def _sparse_linear_shape(input, values, indices, offsets, size, layout, bias):
    return input.new_empty(input.shape[:-1] + (size[0],))


@register_flop_formula(torch.ops.fxsparse_kernels.sparse_linear)
def _sparse_linear_flops(input_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    """The multiply-adds the kernel does: every stored value (a BSR block's zeros included) once per row of input."""
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    stored = 1
    for size in values_shape:
        stored *= size
    return 2 * rows * stored


def _eager(x) -> bool:
    """Whether ``x`` is a plain tensor with data, outside any tracing: then the op's kernel may be called directly.
    A proxy (symbolic tracing), a fake or meta tensor (torch.export, shape inference) or torch.compile goes through
    the op, which records it in the graph or answers with its fake kernel."""
    return type(x) is torch.Tensor and x.device.type != "meta" and not torch.compiler.is_compiling()


# -- formats --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseFormat:
    """A torch sparse layout ("csr", "coo", "bsr") and, for BSR, its block shape."""

    layout: str
    block: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return f"bsr{self.block[0]}x{self.block[1]}" if self.block else self.layout

    def fits(self, shape: tuple[int, int]) -> bool:
        return self.block is None or (shape[0] % self.block[0] == 0 and shape[1] % self.block[1] == 0)

    def stored_fraction(self, weight: torch.Tensor) -> float:
        """The fraction of the weight this format stores: nonzeros, or for BSR every block holding one."""
        nonzero = weight.detach() != 0
        if self.block is None:
            return nonzero.float().mean().item()
        rows, cols = self.block
        blocks = nonzero.reshape(weight.shape[0] // rows, rows, weight.shape[1] // cols, cols).any(dim=(1, 3))
        return blocks.float().mean().item()

    def compress(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, indices, offsets) of ``weight`` in this format, as plain tensors (copies, not views)."""
        weight = weight.detach()
        if self.layout == "coo":
            sparse = weight.to_sparse().coalesce()
            return sparse.values().clone(), sparse.indices().clone(), torch.zeros(0, dtype=torch.long)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": the kernels used here are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            sparse = weight.to_sparse_csr() if self.layout == "csr" else weight.to_sparse_bsr(self.block)
        return sparse.values().clone(), sparse.col_indices().clone(), sparse.crow_indices().clone()


# -- the modules a rewrite inserts ----------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with ``weight`` stored in a sparse format, for inference.

    ``values`` (and ``bias``) are parameters without gradients, so a model's parameter count is what it stores;
    the index arrays are buffers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sparse_format: SparseFormat):
        super().__init__()
        values, indices, offsets = sparse_format.compress(weight)
        self.format = sparse_format.name
        self.layout = sparse_format.layout
        self.size = [int(weight.shape[0]), int(weight.shape[1])]
        self.values = nn.Parameter(values, requires_grad=False)
        self.register_buffer("indices", indices)
        self.register_buffer("offsets", offsets)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager(x):  # the op's own kernel, without the dispatcher's round trip into Python (~0.1-0.2 ms a call)
            return _sparse_linear(x, self.values, self.indices, self.offsets, self.size, self.layout, self.bias)
        return torch.ops.fxsparse_kernels.sparse_linear(x, self.values, self.indices, self.offsets, self.size,
                                                        self.layout, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return _sparse_weight(self.values, self.indices, self.offsets, self.size, self.layout).to_dense()

    def extra_repr(self) -> str:
        return (f"out_features={self.size[0]}, in_features={self.size[1]}, format={self.format}, "
                f"nnz={self.values.numel()}")


class SparseConv1x1(SparseLinear):
    """A 1x1 ``nn.Conv2d`` (no padding, no groups, any stride) as a sparse linear map over channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sparse_format: SparseFormat,
                 stride: tuple[int, int] = (1, 1)):
        super().__init__(weight.reshape(weight.shape[0], weight.shape[1]), bias, sparse_format)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        return super().forward(x.movedim(1, -1)).movedim(-1, 1).contiguous()

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, None, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"


def dense_call(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1)) -> Callable:
    """The layer as it is, as a function of its input: what a sparse kernel must beat."""
    if kind == "conv1x1":
        return lambda x: F.conv2d(x, weight, bias, stride)
    return lambda x: F.linear(x, weight, bias)


def sparse_module(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, sparse_format: SparseFormat,
                  stride=(1, 1)) -> SparseLinear:
    if kind == "conv1x1":
        return SparseConv1x1(weight, bias, sparse_format, stride)
    return SparseLinear(weight, bias, sparse_format)


# -- timing ---------------------------------------------------------------------------------------------------------
Timer = Callable[[str, str, Callable[[], object], "float | None"], float]


def median_seconds(layer: str, fmt: str, fn: Callable[[], object], limit: float | None = None,
                   max_seconds: float = 1.0) -> float:
    """The median time of one call of ``fn`` on this machine, with the threads torch runs on now.

    One call first, timed on its own: if it takes longer than ``limit`` (a candidate already far slower than the
    layer it would replace), that time is returned, so a hopeless format costs one call. Otherwise torch's
    ``Timer.adaptive_autorange`` (which warms up while it sizes its blocks) repeats blocks of calls until their
    spread is under 10% of the median, or for at most ``max_seconds``. (``layer`` and ``fmt`` are unused here;
    injected timers use them.)
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if limit is not None and first > limit:
        return first
    from torch.utils import benchmark  # imported here: it loads torch's C++ extension tools, which log on import

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(threshold=0.1, min_run_time=0.02, max_run_time=max_seconds).median
