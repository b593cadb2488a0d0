"""Rules for ops that act on each channel separately: elementwise math, activations, reductions, pooling."""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from fxsparse.channels import ALL, REMOVE, REPEAT

from .base import NodeLabels, Rule, RuleContext, TensorLabels, opaque, opaque_like

# A sum, mean or softmax over channels does not change when they are reordered, but does when some are removed or
# repeated; a cumulative op or an argmax depends on their order too.
ORDER_FREE = REMOVE | REPEAT


def broadcast(rc: RuleContext, inputs: Sequence[fx.Node], out_shape: Sequence[int]) -> TensorLabels:
    """Labels of an elementwise op's output; ties the inputs' channels that meet index by index.

    A labelled dimension that meets an opaque one of the same (non-broadcast) size is fixed: the opaque tensor
    cannot be sliced along with it.
    """
    ndim = len(out_shape)
    out: list = [None] * ndim
    for d in range(ndim):
        found = None
        meets_opaque = False
        for node in inputs:
            shape = rc.shape_of(node)
            k = d - (ndim - len(shape))
            if k < 0 or (shape[k] == 1 and out_shape[d] != 1):
                continue
            labels = rc.labels_of(node)[k]
            if labels is None:
                meets_opaque = True
            elif found is None:
                found = labels
            else:
                rc.tie(found, labels)
        if found is not None and meets_opaque:
            rc.fix(found)
        out[d] = found
    return tuple(out)


class Elementwise(Rule):
    """Same index in, same index out, for every tensor argument (broadcasting allowed)."""

    name = "elementwise"

    def labels(self, rc: RuleContext) -> NodeLabels:
        inputs = rc.tensor_args()
        shape = rc.shape_of(rc.node)
        if shape is None:
            return opaque_like(rc.node)
        return broadcast(rc, inputs, shape)


class FirstInputOnly(Rule):
    """Ops whose output follows the first tensor argument only (``type_as`` takes just a dtype from the other)."""

    name = "first input"

    def labels(self, rc: RuleContext) -> NodeLabels:
        return rc.labels_of(rc.arg(0, "input"))


def _dims(rc: RuleContext, dim, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return sorted(d % ndim for d in dim)


class MixesAlongDim(Rule):
    """Elementwise except along one dim, whose channels are mixed (softmax, cumsum): that dim is fixed for the
    operations ``blocks`` names (softmax's channels may be reordered, cumsum's may not)."""

    name = "mixes along dim"

    def __init__(self, dim_index: int = 1, dim_name: str = "dim", default=-1, blocks: int = ORDER_FREE):
        self.dim_index, self.dim_name, self.default, self.blocks = dim_index, dim_name, default, blocks

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels = rc.labels_of(src)
        ndim = len(labels)
        dim = rc.arg(self.dim_index, self.dim_name, self.default)
        if dim is None:
            dim = -1
        d = dim % ndim
        rc.fix(labels[d], self.blocks)
        return labels


class Reduction(Rule):
    """Reductions over some dims (mean, sum, amax, var...): a reduced channel dim is fixed, the others pass."""

    name = "reduction"

    def __init__(self, dim_index: int = 1, keepdim_index: int = 2, blocks: int = ORDER_FREE,
                 uniform_repeat: bool = False):
        self.dim_index, self.keepdim_index, self.blocks = dim_index, keepdim_index, blocks
        # a mean, max or min over channels is the same over each channel repeated k times: such a dim may be
        # repeated, all its channels alike (a uniform set, as a LayerNorm's; RMSNorm written out as pow-mean-rsqrt)
        self.uniform_repeat = uniform_repeat
        if uniform_repeat:
            self.blocks = blocks & ~REPEAT

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels = rc.labels_of(src)
        ndim = len(labels)
        dims = _dims(rc, rc.arg(self.dim_index, "dim"), ndim) if ndim else []
        keepdim = bool(rc.arg(self.keepdim_index, "keepdim", False))
        for d in dims:
            rc.fix(labels[d], self.blocks)
            if self.uniform_repeat and labels[d] is not None:
                rc.graph.uniform.append(labels[d])
        out = [None if d in dims else labels[d] for d in range(ndim)] if keepdim else [
            labels[d] for d in range(ndim) if d not in dims]
        value = rc.node.meta.get("val")
        if isinstance(value, (tuple, list)):  # max(dim) and friends: (values, indices)
            return tuple(tuple(out) for _ in value)
        if len(out) != len(rc.out_shape):  # a full reduction to a scalar
            return opaque(len(rc.out_shape))
        return tuple(out)


class Spatial(Rule):
    """Ops over the trailing ``k`` dims (pooling, padding, resizing): channel dims before them pass through.

    ``k`` is given, or read from a ``pad`` list (``len(pad) // 2`` dims).
    """

    name = "spatial"

    def __init__(self, k: int | None = None, pad_index: int | None = None):
        self.k, self.pad_index = k, pad_index

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels = rc.labels_of(src)
        ndim = len(labels)
        k = self.k if self.k is not None else len(rc.arg(self.pad_index, "pad")) // 2
        k = min(k, ndim)
        for d in range(ndim - k, ndim):
            rc.fix(labels[d])
        out = tuple(labels[: ndim - k]) + (None,) * k
        value = rc.node.meta.get("val")
        if isinstance(value, (tuple, list)):  # max_pool with indices
            return tuple(out for _ in value)
        return out


class Barrier(Rule):
    """Channels flowing in are fixed, the output is opaque: nothing is pruned through this op."""

    name = "barrier"

    def __init__(self, reason: str = "channels are mixed by this op"):
        self.reason = reason

    def labels(self, rc: RuleContext) -> NodeLabels:
        return rc.barrier(self.reason)


class NoTensor(Rule):
    """Ops that read a tensor's metadata (size, dtype) or assert it: no channel flows through them."""

    name = "metadata"

    def labels(self, rc: RuleContext) -> NodeLabels:
        return opaque_like(rc.node)


class Creation(Rule):
    """Ops that make a new tensor from sizes (zeros, arange): opaque; ``*_like`` follows its template."""

    name = "creation"

    def labels(self, rc: RuleContext) -> NodeLabels:
        return opaque_like(rc.node)


class Like(Rule):
    """``zeros_like(x)`` and friends: a tensor of x's shape, which shrinks with x."""

    name = "like"

    def labels(self, rc: RuleContext) -> NodeLabels:
        return rc.labels_of(rc.arg(0, "input"))
