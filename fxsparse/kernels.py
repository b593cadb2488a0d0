"""Sparse kernels: layers whose weight is stored in one of torch's sparse formats, and timing them.

A rewritten layer keeps its weight compressed (the values and index arrays of a CSR, COO or BSR tensor, as plain
strided tensors) and multiplies through one custom op, ``torch.ops.fxsparse_kernels.sparse_linear``, which
builds the torch.sparse tensor from them and calls ``torch.addmm`` (sparse @ dense, torch's own kernels: MKL on
CPU, cuSPARSE on CUDA). Why a custom op rather than a sparse tensor attribute: torch.export cannot serialise sparse
tensors, nor build them inside a traced forward, but it does take a custom op with a fake (shape-only) kernel. So
a rewritten model exports, saves and loads as a ``.pt2`` program like any compiled model (loading needs the op
registered: ``import fxsparse``, which ``fxsparse.load`` does), shape inference and FLOP counting see through it,
and the compressed size is what the model really holds.

On CUDA (sm80+), 2:4 semi-structured weights are held the way torch's documentation shows instead: a
``SparseSemiStructuredTensor`` parameter that ``F.linear`` dispatches to cuSPARSELt or CUTLASS
(:class:`SemiStructuredLinear`); :func:`semi_structured_unsupported` says where torch cannot run one. Such a
module is saved as a torch.export program only if torch.export takes the tensor subclass; otherwise ``save``
pickles it and logs why.
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


class _OverChannels:
    """A 1x1 ``nn.Conv2d`` (no padding, no groups, any stride) computed by the linear layer class it is mixed into,
    as a linear map over channels; the subclass sets ``stride``."""

    stride: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        return super().forward(x.movedim(1, -1)).movedim(-1, 1).contiguous()

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, None, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"


class SparseConv1x1(_OverChannels, SparseLinear):
    """A 1x1 ``nn.Conv2d`` as a sparse linear map over channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sparse_format: SparseFormat,
                 stride: tuple[int, int] = (1, 1)):
        super().__init__(weight.reshape(weight.shape[0], weight.shape[1]), bias, sparse_format)
        self.stride = tuple(stride)


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
    spread is under 10% of the median, or for at most ``max_seconds``; on CUDA both synchronise before reading the
    clock. (``layer`` and ``fmt`` are unused here; injected timers use them.)
    """
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # CUDA kernels run asynchronously
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    if limit is not None and first > limit:
        return first
    from torch.utils import benchmark  # imported here: it loads torch's C++ extension tools, which log on import

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(threshold=0.1, min_run_time=0.02, max_run_time=max_seconds).median


# -- 2:4 semi-structured (CUDA) -------------------------------------------------------------------------------------
SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with sparse tensor cores
_HALF = (torch.float16, torch.bfloat16)


def _semi_structured_class(cusparselt: bool):
    """torch's tensor subclass for the backend it would use: cuSPARSELt where torch was built with it, else
    CUTLASS (``to_sparse_semi_structured`` itself only picks CUTLASS when forced to)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if cusparselt else SparseSemiStructuredTensorCUTLASS


def _cusparselt_available() -> bool:
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available())


def semi_structured_unsupported(weight: torch.Tensor, x: torch.Tensor, *, device_type: str | None = None,
                                capability: tuple[int, int] | None = None, cusparselt: bool | None = None,
                                has_api: bool | None = None) -> str:
    """Why torch cannot run ``F.linear(x, weight)`` with ``weight`` (2-D, or a 1x1 conv's 4-D) as a 2:4
    semi-structured sparse tensor here; "" when it can.

    The rules are torch's own (``torch/sparse/semi_structured.py`` and its CUDA kernels): CUDA only; compute
    capability sm80 or newer, and exactly sm8x for the CUTLASS kernels (used when torch lacks cuSPARSELt);
    float16/bfloat16 (and float32 on CUTLASS, which multiplies in TF32: the numeric check against dense decides);
    the input in the weight's dtype; both weight dimensions positive multiples of the backend's smallest tile for
    that dtype; at most 2 nonzeros in every group of 4 consecutive input features. The device facts are parameters,
    read from torch when not given (``device_type`` from the weight, ``capability`` from ``torch.cuda``,
    ``cusparselt`` from ``torch.backends.cusparselt``), so the rules can be checked without a GPU.
    """
    if has_api is None:
        has_api = hasattr(torch.sparse, "to_sparse_semi_structured")
    if not has_api:
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    device_type = device_type or weight.device.type
    if device_type != "cuda":
        return f"no {device_type.upper()} kernel in torch (2:4 semi-structured runs on CUDA only)"
    if capability is None:
        capability = torch.cuda.get_device_capability(weight.device)
    sm = f"sm{capability[0]}{capability[1]}"
    if tuple(capability) < SEMI_STRUCTURED_MIN_CAPABILITY:
        return f"compute capability {sm}: torch's 2:4 kernels need sm80 (Ampere) or newer"
    if cusparselt is None:
        cusparselt = _cusparselt_available()
    if not cusparselt and capability[0] != 8:
        return f"torch here has no cuSPARSELt, and its CUTLASS 2:4 kernels run on sm8x only, not {sm}"
    backend = _semi_structured_class(cusparselt)
    floats = [d for d in backend._DTYPE_SHAPE_CONSTRAINTS if d in _HALF + (torch.float32,)]
    if weight.dtype not in floats:
        names = "/".join(str(d).removeprefix("torch.") for d in floats)
        return f"dtype {str(weight.dtype).removeprefix('torch.')} not supported by the {backend.BACKEND} backend " \
               f"(it takes {names})"
    if x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the weight's {weight.dtype}: the kernel takes one dtype"
    rows, cols = weight.shape[0], weight.shape[1]
    tile = backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    if rows % tile.sparse_min_rows or cols % tile.sparse_min_cols:
        return f"weight {rows}x{cols} is not a multiple of {tile.sparse_min_rows}x{tile.sparse_min_cols}, the " \
               f"{backend.BACKEND} backend's smallest {str(weight.dtype).removeprefix('torch.')} tile"
    groups = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=-1)
    over = int((groups > 2).sum())
    if over:
        return f"weight is not 2:4 along its input dimension ({over} of {groups.numel()} groups of 4 hold more " \
               f"than 2 nonzeros)"
    return ""


def compress_semi_structured(dense: torch.Tensor, cusparselt: bool) -> torch.Tensor:
    """``dense`` (2-D, contiguous, CUDA) as torch's 2:4 tensor subclass for the chosen backend."""
    with warnings.catch_warnings():  # "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"
        warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor")
        if cusparselt:
            return torch.sparse.to_sparse_semi_structured(dense)
        return _semi_structured_class(False).from_dense(dense)


class SemiStructuredLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with ``weight`` a 2:4 semi-structured sparse tensor (CUDA, sm80+), as torch's
    documentation shows: the weight is a ``SparseSemiStructuredTensor`` parameter and ``F.linear`` dispatches to
    cuSPARSELt or CUTLASS. Build it only where :func:`semi_structured_unsupported` returns "".
    """

    format = "semi_structured"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cusparselt: bool | None = None):
        super().__init__()
        cusparselt = _cusparselt_available() if cusparselt is None else cusparselt
        dense = weight.detach().reshape(weight.shape[0], weight.shape[1]).contiguous()
        sparse = compress_semi_structured(dense, cusparselt)
        self.backend = sparse.BACKEND
        self.size = [int(dense.shape[0]), int(dense.shape[1])]
        self.weight = nn.Parameter(sparse, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels multiply 2-D matrices (torch's linear for this tensor views the input as one), so the input is
        # reshaped here, which also copies an input that is not contiguous. Inputs whose row count is not a multiple
        # of the kernel's tile are padded by torch.
        rows = x.reshape(-1, self.size[1])
        return F.linear(rows, self.weight, self.bias).reshape(x.shape[:-1] + (self.size[0],))

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def extra_repr(self) -> str:
        return f"out_features={self.size[0]}, in_features={self.size[1]}, format=2:4, backend={self.backend}"


class SemiStructuredConv1x1(_OverChannels, SemiStructuredLinear):
    """A 1x1 ``nn.Conv2d`` as a 2:4 semi-structured linear map over channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int] = (1, 1),
                 cusparselt: bool | None = None):
        super().__init__(weight, bias, cusparselt)
        self.stride = tuple(stride)


def semi_structured_module(kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                           stride=(1, 1)) -> SemiStructuredLinear:
    if kind == "conv1x1":
        return SemiStructuredConv1x1(weight, bias, stride)
    return SemiStructuredLinear(weight, bias)
