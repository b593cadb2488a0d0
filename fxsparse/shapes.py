"""Shape inference: every node gets a ``meta['val']`` tensor with its shape and dtype, and no storage.

The fast path runs torch's own kernels on the ``meta`` device (the module's weights swapped for meta tensors for
the duration), which costs about a sixth of FakeTensor propagation on ResNet-50. Graphs that a meta kernel cannot
run (or that pin a device) fall back to torch's FakeTensorProp.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode

from .errors import FxsparseError
from .graph_utils import placeholder_values
from .meta import on_meta, to_meta


_META = torch.device("meta")
# Modules whose output is shaped like their input, and whose meta kernels are slow Python decompositions
# (BatchNorm's costs about as much as a convolution's on the CPU; ReLU6's clamp three times as much, 35 of them were
# most of MobileNetV2's meta run): their value is written directly.
_SHAPE_PRESERVING = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)
_ELEMENTWISE_MODULES = frozenset(getattr(torch.nn, name) for name in (
    "ReLU ReLU6 Hardtanh SiLU GELU Hardswish Hardsigmoid Sigmoid Tanh LeakyReLU ELU SELU CELU Mish Softsign "
    "Tanhshrink Identity Dropout Dropout1d Dropout2d Dropout3d AlphaDropout").split() if hasattr(torch.nn, name))


class _MetaPropagator(fx.Interpreter):
    """Runs the graph on meta tensors and keeps each node's value.

    Export graphs pin a device (``arange(..., device=cpu)``, tensor constants): those go to meta too. Many aten
    meta kernels are Python decompositions (addmm, layer_norm), and a transformer calls each with the same shapes
    once per layer: a functional, non-view aten op's result depends only on its arguments' shapes, strides and
    dtypes, so it is computed once per distinct signature and rebuilt from the memo after that.
    """

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode | None = None, keep_values: bool = True):
        super().__init__(gm)
        self.memo: dict[Any, Any] = {}
        self.counter, self.keep_values = counter, keep_values
        self.unseen_flops = 0  # what memoised calls would have added to the counter

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if self.keep_values:
            n.meta["val"] = result
        return result

    def get_attr(self, target, args, kwargs) -> Any:
        value = super().get_attr(target, args, kwargs)
        return to_meta(value) if isinstance(value, torch.Tensor) and not value.is_meta else value

    def call_module(self, target, args, kwargs) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_PRESERVING) and len(args) == 1 and not kwargs:
            return _per_channel_output(target, module, args[0])
        if type(module) in _ELEMENTWISE_MODULES and len(args) == 1 and not kwargs:  # not a subclass's own forward
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs) -> Any:
        if kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": _META}
        key = _signature(target, args, kwargs)
        if key is None:
            return super().call_function(target, args, kwargs)
        if key in self.memo:
            layouts, flops = self.memo[key]
            self.unseen_flops += flops
        else:
            before = self._flops()
            layouts = pytree.tree_map_only(torch.Tensor, _layout, super().call_function(target, args, kwargs))
            self.memo[key] = (layouts, self._flops() - before)
        return pytree.tree_map_only(_Layout, _rebuild, layouts)

    def _flops(self) -> int:
        return self.counter.get_total_flops() if self.counter is not None else 0


class _Layout(tuple):
    """(shape, stride, dtype) of a meta tensor in the memo."""


def _layout(t: torch.Tensor) -> _Layout:
    return _Layout((tuple(t.shape), t.stride(), t.dtype))


def _rebuild(layout: _Layout) -> torch.Tensor:
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device=_META)


def _signature(target, args, kwargs) -> Any:
    """A hashable key of an aten op call whose meta result depends only on it, or None (not memoised)."""
    if not isinstance(target, torch._ops.OpOverload) or target.is_view or target._schema.is_mutable:
        return None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = [target, str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not leaf.is_meta:
                return None
            key.append((tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.dtype))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                               torch.memory_format)):
            key.append((type(leaf), leaf))
        else:
            return None
    return tuple(key)


def _per_channel_output(target: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of a per-channel normalisation of ``x``; raises, as its kernel would, on a channel mismatch."""
    channels = x.shape[1] if x.dim() > 1 else x.shape[0]
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.dim() == 1 and tensor.shape[0] != channels:
            raise RuntimeError(f"{target}.{name} has {tensor.shape[0]} channels, its input {channels}")
    return torch.empty_like(x)


def run_on_meta(gm: fx.GraphModule, args: tuple, kwargs: dict, counter: FlopCounterMode | None = None,
                keep_values: bool = True) -> int:
    """Run ``gm`` on meta tensors (see _MetaPropagator), keeping each node's value unless ``keep_values`` is off.
    Returns the FLOPs of the memoised calls that an active ``counter`` did not see (0 without one)."""
    propagator = _MetaPropagator(gm, counter, keep_values)
    with on_meta(gm), torch.no_grad():
        propagator.run(*to_meta(placeholder_values(gm, args, kwargs)))
    return propagator.unseen_flops


@contextlib.contextmanager
def _fake_tensor_log_silenced():
    """FakeTensor logs a traceback for every op it fails to run, before raising; the failure is handled here (the
    caller names it in one line), so the log is silenced while it runs."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> str:
    """Annotate every node of ``gm`` with a storage-free value; returns the method used ("meta" or "fake")."""
    try:
        run_on_meta(gm, args, kwargs)
        return "meta"
    except Exception as meta_error:  # noqa: BLE001 - some ops have no meta kernel; FakeTensor handles more
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(i) if isinstance(i, torch.Tensor) else i
                       for i in placeholder_values(gm, args, kwargs)]
        try:
            with torch.no_grad(), _fake_tensor_log_silenced():
                FakeTensorProp(gm, mode).propagate(*fake_inputs)
        except Exception as fake_error:  # noqa: BLE001
            raise FxsparseError(
                f"shape inference failed: on meta tensors ({type(meta_error).__name__}: {str(meta_error)[:200]}), "
                f"with fake tensors ({type(fake_error).__name__}: {str(fake_error)[:200]})"
            ) from fake_error
        return "fake"
