"""SparseKernels: move sparse layers onto torch's sparse kernels, but only where that is measured to be faster.

For every Linear and 1x1 Conv2d whose weight holds zeros (however they got there), the layer is timed on this
machine at the example input's shape, dense against each sparse format that fits (CSR, COO, BSR at the block
sizes that divide the weight; on CUDA, 2:4 semi-structured where the GPU, dtype, shape and pattern fit torch's
rules), with the threads torch runs on. The layer is replaced by a :class:`fxsparse.kernels.SparseLinear` (or
``SparseConv1x1``, ``SemiStructuredLinear``, ``SemiStructuredConv1x1``) only where the fastest format is at least
``min_speedup`` times faster than dense; the rewritten layer's output is first checked against the dense one
(relative difference at most 1e-5 for float32/float64 weights, the compile's float16/bfloat16 tolerance for those),
and the pass manager then verifies the whole model. float16/bfloat16 layers are only timed in 2:4 on CUDA. The
report lists every layer: its sparsity, every format tried with its time (or why it was not), the choice and why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm import tqdm

from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError
from fxsparse.graph_utils import get_attr_value, tensor_value
from fxsparse.kernels import (LAYOUTS, SparseFormat, Timer, dense_call, median_seconds, semi_structured_module,
                              semi_structured_unsupported, sparse_module)
from fxsparse.copying import copy_sharing_tensors
from fxsparse.pass_manager import Pass
from fxsparse.verify import compare_outputs, tolerance_for

SEMI_STRUCTURED = "semi_structured"
FORMATS = LAYOUTS + (SEMI_STRUCTURED,)
HALF = (torch.float16, torch.bfloat16)
EXACT = 1e-5  # a rewritten layer's largest relative difference from the dense one
GIVE_UP = 2.0  # a candidate whose first (warm) call is this many times dense's median is not timed further
_ATEN_LINEAR = torch.ops.aten.linear.default
_ATEN_CONV2D = torch.ops.aten.conv2d.default

log = logging.getLogger("fxsparse")


@dataclass
class Layer:
    """A layer a sparse kernel could run: its name (module path), kind, weight, bias and input."""

    name: str
    kind: str  # "linear" or "conv1x1"
    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int] = (1, 1)
    why_not: str = ""  # why it is left alone before any timing ("" when it is timed)

    @property
    def matrix(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], self.weight.shape[1])


def _conv_is_1x1(weight: torch.Tensor, padding, dilation, groups) -> bool:
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and groups == 1
            and all(p == 0 for p in padding) and all(d == 1 for d in dilation))


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every Linear and 1x1 Conv2d call of ``gm``: ``call_module`` nodes of a symbolic graph, ``aten.linear`` and
    ``aten.conv2d`` nodes reading their weight by ``get_attr`` in an export graph. A module called more than once
    appears once (its first call sets the input shape); a weight that is also read elsewhere is marked shared."""
    readers: dict[int, int] = {}
    for _, tensor in gm.named_parameters(remove_duplicate=False):
        readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    layers, seen = [], set()
    for node in gm.graph.nodes:
        layer = _layer_of(gm, node)
        if layer is None or layer.name in seen:
            continue
        seen.add(layer.name)
        get_attr = layer.node.args[1] if node.op == "call_function" else None
        if readers.get(id(layer.weight), 0) > 1 or (get_attr is not None and len(get_attr.users) > 1):
            layer.why_not = "its weight is shared with another layer (tied): kept dense so it stays one tensor"
        layers.append(layer)
    return layers


def _layer_of(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.Linear:
            return Layer(node.target, "linear", node, module.weight, module.bias)
        if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str) \
                and _conv_is_1x1(module.weight, module.padding, module.dilation, module.groups):
            return Layer(node.target, "conv1x1", node, module.weight, module.bias, _pair(module.stride))
        return None
    if node.op != "call_function" or node.target not in (_ATEN_LINEAR, _ATEN_CONV2D):
        return None
    weight_node = node.args[1]
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        return None
    if bias_node is not None and not (isinstance(bias_node, fx.Node) and bias_node.op == "get_attr"):
        return None
    weight = get_attr_value(gm, weight_node.target)
    bias = get_attr_value(gm, bias_node.target) if bias_node is not None else None
    name = weight_node.target.removesuffix(".weight")
    if node.target is _ATEN_LINEAR:
        return Layer(name, "linear", node, weight, bias)
    stride, padding, dilation, groups = (list(node.args[3:]) + [1, 0, 1, 1][len(node.args[3:]):])[:4]
    if not _conv_is_1x1(weight, _pair(padding), _pair(dilation), groups):
        return None
    return Layer(name, "conv1x1", node, weight, bias, _pair(stride))


class SparseKernels(Pass):
    """Rewrite sparse Linear / 1x1 Conv2d layers onto torch.sparse kernels where measured faster.

    ``min_speedup``: replace a layer only if its fastest sparse format is at least this many times faster than
    dense. ``min_sparsity``: layers with a smaller fraction of zeros are not timed. ``formats``: among "csr",
    "coo", "bsr" (one candidate per size in ``block_sizes`` that divides the weight) and "semi_structured" (2:4 on
    CUDA sm80+, float16/bfloat16; where torch cannot run it, e.g. on CPU, the report says why). ``ignore``: layer
    names (module paths, or prefixes of them) left alone. ``max_seconds``: the longest one format is timed on one
    layer. ``timer``: a function ``(layer, format, fn, limit) -> seconds`` to measure with instead of
    :func:`fxsparse.kernels.median_seconds` (tests inject one, so that decisions do not depend on a busy machine).
    """

    name = "SparseKernels"
    requires = ("shapes",)
    rewrites = True

    def __init__(self, min_speedup: float = 1.05, min_sparsity: float = 0.3, formats: Sequence[str] = FORMATS,
                 block_sizes: Sequence[int] = (8, 16, 32), ignore: Sequence[str] = (), max_seconds: float = 1.0,
                 timer: Timer | None = None):
        if not isinstance(min_speedup, (int, float)) or min_speedup <= 0:
            raise BadArgumentError(f"SparseKernels: min_speedup must be a positive number, got {min_speedup!r}")
        if not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0:
            raise BadArgumentError(f"SparseKernels: min_sparsity must be a fraction in [0, 1], got {min_sparsity!r}")
        unknown = [f for f in formats if f not in FORMATS] if not isinstance(formats, str) else [formats]
        if unknown or not formats:
            raise BadArgumentError(f"SparseKernels: formats must be a non-empty list of {list(FORMATS)}, "
                                   f"got {formats!r}")
        if not block_sizes or not all(isinstance(b, int) and b > 0 for b in block_sizes):
            raise BadArgumentError(f"SparseKernels: block_sizes must be positive integers, got {block_sizes!r}")
        if isinstance(ignore, str):
            raise BadArgumentError(f"SparseKernels: ignore must be a list of layer names, not the string {ignore!r}")
        self.min_speedup, self.min_sparsity = float(min_speedup), float(min_sparsity)
        self.formats, self.block_sizes, self.ignore = tuple(formats), tuple(block_sizes), tuple(ignore)
        self.max_seconds = max_seconds
        self.timer = timer

    def settings(self) -> dict[str, Any]:
        return {"min_speedup": self.min_speedup, "min_sparsity": self.min_sparsity, "formats": list(self.formats),
                "block_sizes": list(self.block_sizes), "ignore": list(self.ignore), "max_seconds": self.max_seconds,
                "threads": torch.get_num_threads(), "timer": "injected" if self.timer else "median_seconds"}

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        module = copy_sharing_tensors(ctx.module)
        rows, chosen = [], []
        for layer in tqdm(find_layers(module), desc="SparseKernels", unit="layer", disable=None, leave=False):
            row, replacement = self._decide(layer)
            log.info("SparseKernels: %s: %s (%s)", layer.name, row["choice"], row["why"])
            rows.append(row)
            if replacement is not None:
                _replace(module, layer, replacement)
                chosen.append({"layer": layer.name, "format": row["choice"], "speedup": row["speedup"]})
        module.graph.lint()
        module.recompile()
        ctx.module = module
        ctx.plan.extra["sparse_kernels"] = chosen
        formats = sorted({c["format"] for c in chosen})
        self._summary = (f"{len(chosen)} of {len(rows)} layers moved to sparse kernels"
                         + (f" ({', '.join(formats)})" if formats else "")
                         + f"; timed with {torch.get_num_threads()} threads")
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")

    # -- one layer --------------------------------------------------------------------------------------------------
    def _decide(self, layer: Layer) -> tuple[dict[str, Any], nn.Module | None]:
        weight = layer.matrix.detach()
        sparsity = 1.0 - (weight != 0).float().mean().item()
        x_value = tensor_value(layer.node.args[0]) if isinstance(layer.node.args[0], fx.Node) else None
        row = {"layer": layer.name, "kind": layer.kind, "shape": "x".join(map(str, weight.shape)),
               "tokens": _tokens(layer, x_value), "sparsity": round(sparsity, 4), "dense ms": None, "best ms": None,
               "tried": "", "choice": "dense", "speedup": None, "why": ""}
        why_not = layer.why_not or self._why_not(layer, sparsity, x_value)
        if why_not:
            row["why"] = why_not
            return row, None
        x = torch.randn(tuple(x_value.shape), generator=torch.Generator().manual_seed(0)).to(weight)
        with torch.no_grad():
            dense = dense_call(layer.kind, layer.weight.detach(), _detached(layer.bias), layer.stride)
            expected = dense(x)
            dense_seconds = self._time(layer.name, "dense", lambda: dense(x), None)
            tried, timings, modules = self._candidates(layer, x, expected, dense_seconds)
        row["dense ms"] = round(dense_seconds * 1e3, 4)
        row["tried"] = "; ".join(tried)
        if not timings:
            row["why"] = "no sparse format could be timed"
            return row, None
        best = min(timings, key=timings.get)
        speedup = dense_seconds / timings[best]
        row["best ms"], row["speedup"] = round(timings[best] * 1e3, 4), round(speedup, 3)
        if speedup < self.min_speedup:
            row["why"] = f"fastest, {best}, is {speedup:.2f}x dense: under min_speedup {self.min_speedup:g}"
            return row, None
        row["choice"] = best
        row["why"] = f"{best} is {speedup:.2f}x dense (>= min_speedup {self.min_speedup:g})"
        return row, modules[best]

    def _why_not(self, layer: Layer, sparsity: float, x_value: torch.Tensor | None) -> str:
        if any(layer.name == p or layer.name.startswith(p + ".") for p in self.ignore):
            return "ignored (ignore=...)"
        dtype = layer.weight.dtype
        half_on_cuda = dtype in HALF and layer.weight.is_cuda and SEMI_STRUCTURED in self.formats
        if dtype not in (torch.float32, torch.float64) and not half_on_cuda:
            return (f"weight dtype {dtype}: torch's sparse kernels here take float32/float64 "
                    f"(float16/bfloat16 only as 2:4 semi-structured on CUDA)")
        if x_value is None:
            return "its input's shape is unknown"
        if sparsity < self.min_sparsity:
            return f"sparsity {sparsity:.1%} below min_sparsity {self.min_sparsity:.0%}: not timed"
        return ""

    def _time(self, layer: str, fmt: str, fn, limit: float | None) -> float:
        if self.timer is not None:
            return float(self.timer(layer, fmt, fn, limit))
        return median_seconds(layer, fmt, fn, limit, self.max_seconds)

    def _candidates(self, layer: Layer, x: torch.Tensor, expected: torch.Tensor, dense_seconds: float):
        """Time every format that fits; returns the "tried" notes, seconds by format and the modules built."""
        weight = layer.matrix.detach()
        tried, timings, modules = [], {}, {}
        for fmt in self.formats:
            if fmt == SEMI_STRUCTURED:
                self._semi_structured(layer, x, expected, tried, timings, modules, dense_seconds)
                continue
            if weight.dtype in HALF:  # CSR/COO/BSR are not checked at half precision here: not tried
                tried.append(f"{fmt}: not tried for {weight.dtype} (float32/float64 only)")
                continue
            blocks = [(b, b) for b in self.block_sizes] if fmt == "bsr" else [None]
            fitting = [SparseFormat(fmt, block) for block in blocks if SparseFormat(fmt, block).fits(weight.shape)]
            if not fitting:
                tried.append(f"bsr: no block size in {list(self.block_sizes)} divides the weight")
            for candidate in fitting:
                stored = candidate.stored_fraction(weight)
                if candidate.block and 1.0 - stored < self.min_sparsity:
                    tried.append(f"{candidate.name} not timed ({1 - stored:.0%} of blocks empty)")
                    continue
                module = sparse_module(layer.kind, weight, _detached(layer.bias), candidate, layer.stride)
                error = compare_outputs(expected, module(x))["max_rel"]
                if error > EXACT:
                    tried.append(f"{candidate.name} rejected (differs from dense by {error:.1e} relative)")
                    continue
                seconds = self._time(layer.name, candidate.name, lambda: module(x), dense_seconds * GIVE_UP)
                timings[candidate.name], modules[candidate.name] = seconds, module
                tried.append(f"{candidate.name} {seconds * 1e3:.4g} ms")
        return tried, timings, modules

    def _semi_structured(self, layer: Layer, x: torch.Tensor, expected: torch.Tensor, tried: list[str],
                         timings: dict[str, float], modules: dict[str, nn.Module], dense_seconds: float) -> None:
        """2:4 semi-structured, where torch can run it: built, checked against dense, timed (appends to the three
        collections it is given)."""
        reason = semi_structured_unsupported(layer.matrix, x)
        if reason:
            tried.append(f"2:4: {reason}")
            return
        try:  # the rules above are torch's documented ones; a kernel that still refuses leaves the layer dense
            module = semi_structured_module(layer.kind, layer.weight.detach(), _detached(layer.bias), layer.stride)
            error = compare_outputs(expected, module(x))["max_rel"]
        except (RuntimeError, NotImplementedError, ValueError) as failure:
            tried.append(f"2:4 failed ({type(failure).__name__}: {str(failure).splitlines()[0][:120]})")
            return
        tolerance = _tolerance(layer.weight.dtype, expected)
        if error > tolerance:
            tried.append(f"2:4 rejected (differs from dense by {error:.1e} relative, over {tolerance:.1e})")
            return
        seconds = self._time(layer.name, SEMI_STRUCTURED, lambda: module(x), dense_seconds * GIVE_UP)
        timings[SEMI_STRUCTURED], modules[SEMI_STRUCTURED] = seconds, module
        tried.append(f"2:4 ({module.backend}) {seconds * 1e3:.4g} ms")


def _tolerance(dtype: torch.dtype, expected: torch.Tensor) -> float:
    """How far a rewritten layer may differ from dense: EXACT at float32/float64, and at float16/bfloat16 what the
    compile's verification allows for outputs of that dtype (a few machine epsilons: both round differently)."""
    return EXACT if dtype in (torch.float32, torch.float64) else tolerance_for(expected, "auto")


def _tokens(layer: Layer, x_value: torch.Tensor | None) -> int | None:
    """Rows the layer multiplies: the input's elements per input feature (a conv's: per channel, after stride)."""
    if x_value is None:
        return None
    if layer.kind == "conv1x1":
        n, _, h, w = x_value.shape
        return int(n * -(-h // layer.stride[0]) * -(-w // layer.stride[1]))
    return int(x_value.numel() // x_value.shape[-1])


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach() if tensor is not None else None


def _replace(gm: fx.GraphModule, layer: Layer, replacement: nn.Module) -> None:
    """Put ``replacement`` in the graph in place of the layer's dense weight."""
    if layer.node.op == "call_module":  # symbolic graph: the module at the layer's own path
        parent, _, child = layer.node.target.rpartition(".")
        setattr(gm.get_submodule(parent), child, replacement)
        return
    path = _free_path(gm, f"{layer.name}_sparse")
    gm.add_submodule(path, replacement)
    node = layer.node
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (node.args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    attrs = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
    gm.graph.erase_node(node)
    for attr in attrs:  # the dense weight and bias, now read by nobody
        if not attr.users:
            owner, _, name = attr.target.rpartition(".")
            gm.graph.erase_node(attr)
            delattr(gm.get_submodule(owner), name)


def _free_path(gm: fx.GraphModule, wanted: str) -> str:
    path, n = wanted, 1
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        n += 1
        path = f"{wanted}_{n}"
