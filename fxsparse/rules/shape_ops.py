"""Rules for ops that move, cut, join or reshape channel dimensions without touching values."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.fx as fx

from .base import NodeLabels, RewriteContext, Rule, RuleContext, TensorLabels, opaque_like, resize_shape_arg
from .elementwise import broadcast


# -- reshape ------------------------------------------------------------------------------------------------------
def _merge(rc: RuleContext, a, size_a: int, b, size_b: int):
    """Labels of two adjacent dims flattened into one (a outer, b inner)."""
    if a is None and b is None:
        return None
    if b is None:
        return a.repeat_interleave(size_b)
    if a is None:
        return b.repeat(size_a)
    merged = rc.graph.new_labels(size_a * size_b, "merge", rc.node.name)
    rc.graph.factor(merged, a, b)
    return merged


def _split(rc: RuleContext, labels, sizes: Sequence[int]) -> list:
    """Labels of one dim viewed as several (``sizes``, outermost first)."""
    if labels is None:
        return [None] * len(sizes)
    if len(sizes) == 1:
        return [labels]
    inner_size = math.prod(sizes[1:])
    outer = rc.graph.new_labels(sizes[0], "outer", rc.node.name)
    inner = rc.graph.new_labels(inner_size, "inner", rc.node.name)
    rc.graph.factor(labels, outer, inner)
    return [outer] + _split(rc, inner, sizes[1:])


def reshape_labels(rc: RuleContext, in_labels: TensorLabels, in_shape: Sequence[int], out_shape: Sequence[int]):
    """Labels of any reshape, from the input and output shapes alone.

    Dims are matched into runs of equal product; within a run, inputs are merged outermost first and the result
    split into the outputs, so ``[B, C, H, W] -> [B, C*H*W]`` repeats each channel's label H*W times and
    ``[B, T, H*D] -> [B, T, H, D]`` factors the channels into heads and head-dims.
    """
    ins = [(d, s) for d, s in enumerate(in_shape) if s != 1]
    for d, s in enumerate(in_shape):
        if s == 1:
            rc.fix(in_labels[d])  # a single channel squeezed away or moved: keep it
    outs = [(d, s) for d, s in enumerate(out_shape) if s != 1]
    out: list = [None] * len(out_shape)
    i = j = 0
    while i < len(ins) and j < len(outs):
        run_in, run_out = [ins[i]], [outs[j]]
        p_in, p_out = ins[i][1], outs[j][1]
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                run_in.append(ins[i])
                p_in *= ins[i][1]
            else:
                j += 1
                run_out.append(outs[j])
                p_out *= outs[j][1]
        i += 1
        j += 1
        merged, size = in_labels[run_in[0][0]], run_in[0][1]
        for d, s in run_in[1:]:
            merged = _merge(rc, merged, size, in_labels[d], s)
            size *= s
        for (d, _), labels in zip(run_out, _split(rc, merged, [s for _, s in run_out])):
            out[d] = labels
    return tuple(out)


class Reshape(Rule):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze, by shapes. ``shape_from`` says what to rewrite:
    "varargs" (``x.view(a, b)`` or ``x.view((a, b))``), an argument index holding the size list, or None."""

    name = "reshape"

    def __init__(self, shape_from: Any = None, shape_name: str = "shape"):
        self.shape_from, self.shape_name = shape_from, shape_name

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        return reshape_labels(rc, rc.labels_of(src), rc.shape_of(src), rc.out_shape)

    def rewrite(self, wc: RewriteContext) -> None:
        if self.shape_from is None:
            return
        if self.shape_from == "varargs":
            args = wc.node.args
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                wc.node.args = (args[0], resize_shape_arg(wc, args[1]))
            elif len(args) > 1:
                wc.node.args = (args[0], *resize_shape_arg(wc, args[1:]))
            elif self.shape_name in wc.node.kwargs:
                wc.set_arg(1, self.shape_name, resize_shape_arg(wc, wc.node.kwargs[self.shape_name]))
            return
        shape = wc.arg(self.shape_from, self.shape_name)
        wc.set_arg(self.shape_from, self.shape_name, resize_shape_arg(wc, shape))


class ReshapeAs(Rule):
    """``x.view_as(y)`` / ``x.reshape_as(y)``: ``x``'s elements in ``y``'s shape. Every output dim is tied to
    ``y``'s, so that the two shrink alike and the op, which reads its size from ``y``, needs no rewrite."""

    name = "reshape_as"

    def labels(self, rc: RuleContext) -> NodeLabels:
        src, other = rc.arg(0, "input"), rc.arg(1, "other")
        out = reshape_labels(rc, rc.labels_of(src), rc.shape_of(src), rc.out_shape)
        return tuple(rc.tie(mine, theirs) for mine, theirs in zip(out, rc.labels_of(other)))


class Unflatten(Rule):
    """``unflatten(dim, sizes)``: the sizes of the new dims must follow the channels they hold."""

    name = "unflatten"

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        return reshape_labels(rc, rc.labels_of(src), rc.shape_of(src), rc.out_shape)

    def rewrite(self, wc: RewriteContext) -> None:
        dim, sizes = wc.arg(1, "dim"), wc.arg(2, "sizes")
        ndim = len(wc.new_shape(wc.node))
        dim = dim % (ndim - len(sizes) + 1)
        new = wc.new_shape(wc.node)
        wc.set_arg(2, "sizes", [int(new[dim + k]) for k in range(len(sizes))])


# -- permutations -------------------------------------------------------------------------------------------------
class Permute(Rule):
    """permute / transpose / t / movedim / swapaxes: the output's dims are the input's, reordered."""

    name = "permute"

    def __init__(self, kind: str):
        self.kind = kind

    def labels(self, rc: RuleContext) -> NodeLabels:
        labels = list(rc.labels_of(rc.arg(0, "input")))
        ndim = len(labels)
        order = list(range(ndim))
        if self.kind == "permute":
            dims = rc.node.args[1:] if len(rc.node.args) > 2 else rc.arg(1, "dims")
            if isinstance(dims, int):
                dims = [dims]
            order = [d % ndim for d in dims]
        elif self.kind == "transpose":
            a, b = rc.arg(1, "dim0") % ndim, rc.arg(2, "dim1") % ndim
            order[a], order[b] = order[b], order[a]
        elif self.kind == "t":
            order = order[::-1]
        elif self.kind == "movedim":
            src, dst = rc.arg(1, "source"), rc.arg(2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % ndim for s in src], [d % ndim for d in dst]
            rest = [d for d in range(ndim) if d not in src]
            order = [None] * ndim
            for s, d in zip(src, dst):
                order[d] = s
            fill = iter(rest)
            order = [o if o is not None else next(fill) for o in order]
        return tuple(labels[o] for o in order)


# -- joining and cutting ------------------------------------------------------------------------------------------
SEQUENCE_NODE = "joins the tensors of one node (e.g. torch.stack(x.chunk(2))): not pruned through"


class Cat(Rule):
    """cat / concat: labels concatenate along ``dim``; the other dims are tied across inputs."""

    name = "cat"

    def labels(self, rc: RuleContext) -> NodeLabels:
        if isinstance(rc.arg(0, "tensors"), fx.Node):
            return rc.barrier(SEQUENCE_NODE)
        tensors = [t for t in rc.arg(0, "tensors") if rc.shape_of(t) is not None and rc.shape_of(t) != (0,)]
        out_shape = rc.out_shape
        ndim = len(out_shape)
        dim = rc.arg(1, "dim", 0) % ndim
        out = list(broadcast_except(rc, tensors, out_shape, dim))
        parts = [rc.labels_of(t)[dim] for t in tensors]
        if all(p is None for p in parts):
            out[dim] = None
        else:
            filled = []
            for t, p in zip(tensors, parts):
                if p is None:  # a part that cannot be sliced: its channels are fixed
                    p = rc.graph.new_labels(rc.shape_of(t)[dim], "fixed", rc.node.name)
                    rc.fix(p)
                filled.append(p)
            out[dim] = torch.cat(filled)
        return tuple(out)


def broadcast_except(rc: RuleContext, tensors: Sequence[fx.Node], out_shape: Sequence[int], dim: int) -> TensorLabels:
    """Tie every dim but ``dim`` across ``tensors`` of equal rank."""
    out: list = [None] * len(out_shape)
    for d in range(len(out_shape)):
        if d == dim:
            continue
        found, meets_opaque = None, False
        for t in tensors:
            labels = rc.labels_of(t)[d]
            if labels is None:
                meets_opaque = meets_opaque or rc.shape_of(t)[d] != 1
            elif found is None:
                found = labels
            else:
                rc.tie(found, labels)
        if found is not None and meets_opaque:
            rc.fix(found)
        out[d] = found
    return tuple(out)


class Stack(Rule):
    name = "stack"

    def labels(self, rc: RuleContext) -> NodeLabels:
        if isinstance(rc.arg(0, "tensors"), fx.Node):
            return rc.barrier(SEQUENCE_NODE)
        tensors = list(rc.arg(0, "tensors"))
        out_shape = rc.out_shape
        dim = rc.arg(1, "dim", 0) % len(out_shape)
        in_shape = rc.shape_of(tensors[0])
        tied = broadcast_except(rc, tensors, in_shape, -1)
        per_dim = list(tied)
        # broadcast_except skipped the last input dim: tie it too
        last = broadcast(rc, tensors, in_shape)[-1] if in_shape else None
        if per_dim:
            per_dim[-1] = last
        return tuple(per_dim[:dim]) + (None,) + tuple(per_dim[dim:])


class Split(Rule):
    """split / split_with_sizes / chunk / tensor_split / unbind: each output takes its slice of the labels.

    When channels are removed from the split dim, the op is rewritten as a split with explicit new sizes.
    ``size_index`` is where the size argument sits; ``dim_index`` the dim's position; ``dim_default`` its default.
    """

    name = "split"

    def __init__(self, size_index: int = 1, dim_index: int = 2, dim_default: int = 0, unbind: bool = False,
                 replacement: Any = None):
        self.size_index, self.dim_index, self.dim_default = size_index, dim_index, dim_default
        self.unbind, self.replacement = unbind, replacement

    def _dim(self, get) -> int:
        return get(self.dim_index, "dim", self.dim_default)

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels = rc.labels_of(src)
        ndim = len(labels)
        dim = self._dim(rc.arg) % ndim
        pieces = [v for v in rc.node.meta["val"]]
        if self.unbind:
            rc.fix(labels[dim])
            return tuple(tuple(labels[:dim]) + tuple(labels[dim + 1:]) for _ in pieces)
        out, start = [], 0
        for piece in pieces:
            size = int(piece.shape[dim])
            part = list(labels)
            part[dim] = labels[dim][start: start + size] if labels[dim] is not None else None
            out.append(tuple(part))
            start += size
        return tuple(out)

    def rewrite(self, wc: RewriteContext) -> None:
        if self.unbind:
            return
        pieces = wc.labels(wc.node)
        ndim = len(pieces[0])
        dim = self._dim(wc.arg) % ndim
        if all(p[dim] is None for p in pieces):
            return
        sizes = [int(wc.counts(p[dim]).sum()) if p[dim] is not None else None for p in pieces]
        old = [int(v.shape[dim]) for v in wc.node.meta["val"]]
        sizes = [s if s is not None else o for s, o in zip(sizes, old)]
        if sizes == old:
            return
        source = wc.node.args[0]
        if self.replacement is not None:
            wc.node.target = self.replacement
            wc.node.args, wc.node.kwargs = (source, sizes, dim), {}
        elif wc.node.op == "call_method":
            wc.node.target = "split"
            wc.node.args, wc.node.kwargs = (source, sizes), {"dim": dim}
        else:
            wc.node.target = torch.split
            wc.node.args, wc.node.kwargs = (source, sizes), {"dim": dim}


class GetItem(Rule):
    """``operator.getitem``: an element of a tuple output, or tensor indexing with slices, ints, None, ``...``
    and one tensor index."""

    name = "getitem"

    def labels(self, rc: RuleContext) -> NodeLabels:
        src, index = rc.node.args
        value = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            container = rc.env.get(src)
            if container is None or not isinstance(index, int):
                return opaque_like(rc.node)
            return container[index]
        labels = rc.labels_of(src)
        items = index if isinstance(index, tuple) else (index,)
        plan = _index_plan(items, len(labels))
        if plan is None:
            return rc.barrier("indexing with more than one tensor index")
        if any(kind == "slice" and labels[d] is not None and not _static_bounds(item) for kind, d, item in plan):
            return rc.barrier(TRACED_BOUNDS)
        out: list = []
        for kind, d, item in plan:
            lab = labels[d] if d is not None else None
            if kind == "new":
                out.append(None)
            elif kind == "keep":
                out.append(lab)
            elif kind == "slice":
                if lab is not None and item.step not in (None, 1):
                    rc.fix(lab)
                out.append(lab[item] if lab is not None else None)
            elif kind == "int":
                if lab is not None:
                    rc.fix(lab[item: item + 1] if item >= 0 else lab[item:][:1])
            elif kind == "tensor":
                rc.fix(lab)
                shape = rc.shape_of(item) if isinstance(item, fx.Node) else tuple(torch.as_tensor(item).shape)
                out.extend([None] * len(shape))
        if len(out) != len(rc.out_shape):
            return rc.barrier("indexing this rule cannot follow")
        return tuple(out)

    def rewrite(self, wc: RewriteContext) -> None:
        src, index = wc.node.args
        value = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return
        labels = wc.labels(src)
        items = index if isinstance(index, tuple) else (index,)
        plan = _index_plan(items, len(labels))
        new_items = list(items)
        changed = False
        for position, (kind, d, item) in zip(_item_positions(items, len(labels)), plan):
            lab = labels[d] if d is not None else None
            if lab is None:
                continue
            counts = wc.counts(lab)
            if kind == "slice" and item.step in (None, 1) and _static_bounds(item):
                start, stop, _ = item.indices(len(lab))
                new_items[position] = slice(int(counts[:start].sum()), int(counts[:stop].sum()), None)
                changed = True
            elif kind == "int":
                i = item % len(lab)
                new_items[position] = int(counts[:i].sum())
                changed = True
        if changed:
            wc.node.args = (src, tuple(new_items) if isinstance(index, tuple) else new_items[0])


TRACED_BOUNDS = "slice bounds computed in the graph (x[:, :H] with H = y.shape[1]): not pruned through"


def _static_bounds(item: slice) -> bool:
    """Whether a slice's bounds are numbers. A bound that is a node (a size read from another tensor while
    tracing, as in ``x[:, :H]``) may change when channels go, and cannot be re-indexed."""
    return all(b is None or isinstance(b, int) for b in (item.start, item.stop, item.step))


def _index_plan(items: Sequence[Any], ndim: int):
    """(kind, input dim, item) for each output-producing index item; None when the indexing is too complex."""
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    plan, d = [], 0
    tensors = sum(1 for it in items if isinstance(it, fx.Node) or isinstance(it, (torch.Tensor, list)))
    if tensors > 1:
        return None
    for it in items:
        if it is None:
            plan.append(("new", None, it))
        elif it is Ellipsis:
            for _ in range(ndim - n_real):
                plan.append(("keep", d, it))
                d += 1
        elif isinstance(it, slice):
            plan.append(("slice", d, it))
            d += 1
        elif isinstance(it, int):
            plan.append(("int", d, it))
            d += 1
        else:
            plan.append(("tensor", d, it))
            d += 1
    while d < ndim:
        plan.append(("keep", d, None))
        d += 1
    return plan


def _item_positions(items: Sequence[Any], ndim: int) -> list[int]:
    """For each plan entry, the position of the index item it came from (trailing implicit dims get -1)."""
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    positions = []
    for p, it in enumerate(items):
        if it is Ellipsis:
            positions += [-1] * (ndim - n_real)
        else:
            positions.append(p)
    return positions + [-1] * 64


class SliceOp(Rule):
    """aten.slice(x, dim, start, end, step), narrow(x, dim, start, length), select(x, dim, index)."""

    name = "slice"

    def __init__(self, kind: str):
        self.kind = kind

    def labels(self, rc: RuleContext) -> NodeLabels:
        labels = list(rc.labels_of(rc.arg(0, "input")))
        ndim = len(labels)
        dim = rc.arg(1, "dim", 0) % ndim
        lab = labels[dim]
        if not self._static(rc.arg):  # a bound traced from a size: fine on a dim without channels
            if lab is not None:
                return rc.barrier(TRACED_BOUNDS)
            return tuple(labels[:dim] + labels[dim + 1:]) if self.kind == "select" else tuple(labels)
        size = rc.shape_of(rc.arg(0, "input"))[dim]
        if self.kind == "select":
            index = rc.arg(2, "index") % size
            if lab is not None:
                rc.fix(lab[index: index + 1])
            return tuple(labels[:dim] + labels[dim + 1:])
        start, stop, step = self._bounds(rc.arg, size)
        if lab is not None:
            if step != 1:
                rc.fix(lab)
            labels[dim] = lab[start:stop:step]
        return tuple(labels)

    @staticmethod
    def _static(get) -> bool:
        """Whether dim, start, end, step, length or index are all numbers (not sizes traced from a tensor)."""
        return all(value is None or isinstance(value, int) for value in (get(i, name) for i, name in
                   ((1, "dim"), (2, "start"), (3, "end"), (4, "step"), (2, "index"), (3, "length"))))

    def _bounds(self, get, size: int) -> tuple[int, int, int]:
        if self.kind == "narrow":
            start = get(2, "start") % size
            return start, start + get(3, "length"), 1
        start, end, step = get(2, "start", 0), get(3, "end", None), get(4, "step", 1)
        return slice(start, end, step).indices(size)

    def rewrite(self, wc: RewriteContext) -> None:
        labels = wc.labels(wc.node.args[0])
        ndim = len(labels)
        dim = wc.arg(1, "dim", 0) % ndim
        lab = labels[dim]
        if lab is None or not self._static(wc.arg):
            return
        counts = wc.counts(lab)
        if self.kind == "select":
            index = wc.arg(2, "index") % len(lab)
            wc.set_arg(2, "index", int(counts[:index].sum()))
            return
        start, stop, step = self._bounds(wc.arg, len(lab))
        if step != 1:
            return
        new_start, new_stop = int(counts[:start].sum()), int(counts[:stop].sum())
        if self.kind == "narrow":
            wc.set_arg(2, "start", new_start)
            wc.set_arg(3, "length", new_stop - new_start)
        else:
            wc.set_arg(2, "start", new_start)
            wc.set_arg(3, "end", new_stop)


class IndexSelect(Rule):
    """index_select(x, dim, index): gathered along ``dim``, which is fixed; other dims pass."""

    name = "index_select"

    def labels(self, rc: RuleContext) -> NodeLabels:
        labels = list(rc.labels_of(rc.arg(0, "input")))
        dim = rc.arg(1, "dim") % len(labels)
        rc.fix(labels[dim])
        labels[dim] = None
        return tuple(labels)


class AtenIndex(Rule):
    """aten.index.Tensor(x, [None, idx, ...]): one tensor index; indexed dims are fixed."""

    name = "index"

    def labels(self, rc: RuleContext) -> NodeLabels:
        labels = list(rc.labels_of(rc.arg(0, "input")))
        indices = list(rc.arg(1, "indices"))
        used = [k for k, i in enumerate(indices) if i is not None]
        if len(used) != 1:
            return rc.barrier("indexing with more than one tensor index")
        k = used[0]
        rc.fix(labels[k])
        index_ndim = len(rc.shape_of(indices[k]))
        out = labels[:k] + [None] * index_ndim + labels[k + 1:]
        if len(out) != len(rc.out_shape):
            return rc.barrier("indexing this rule cannot follow")
        return tuple(out)


class Expand(Reshape):
    """expand / expand_as / broadcast_to: dims grown from 1 are opaque; the size list follows removed channels."""

    name = "expand"

    def __init__(self, shape_from: Any = "varargs", shape_name: str = "size"):
        super().__init__(shape_from, shape_name)

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels, in_shape = rc.labels_of(src), rc.shape_of(src)
        out_shape = rc.out_shape
        offset = len(out_shape) - len(in_shape)
        out = []
        for d, size in enumerate(out_shape):
            k = d - offset
            out.append(None if k < 0 or (in_shape[k] == 1 and size != 1) else labels[k])
        return tuple(out)


class Repeat(Rule):
    """repeat(x, *sizes): a channel dim repeated r times carries its labels r times over."""

    name = "repeat"

    def labels(self, rc: RuleContext) -> NodeLabels:
        src = rc.arg(0, "input")
        labels = rc.labels_of(src)
        sizes = rc.node.args[1:] if len(rc.node.args) > 2 else rc.arg(1, "repeats")
        if isinstance(sizes, int):
            sizes = [sizes]
        sizes = list(sizes)
        offset = len(sizes) - len(labels)
        out = [None] * offset
        for k, lab in enumerate(labels):
            r = sizes[k + offset]
            out.append(lab.repeat(r) if lab is not None and r != 1 else lab)
        return tuple(out)


class PatchMerging(Rule):
    """torchvision's ``_patch_merging_pad``: [..., H, W, C] -> [..., H/2, W/2, 4C], four strided copies of C."""

    name = "patch merging"

    def labels(self, rc: RuleContext) -> NodeLabels:
        labels = rc.labels_of(rc.arg(0, "x"))
        channels = labels[-1].repeat(4) if labels[-1] is not None else None
        return tuple(labels[:-3]) + (None, None, channels)
