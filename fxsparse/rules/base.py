"""What a rule is, and the context it works in.

A rule answers, for one op, two questions every structural pass asks:

- ``labels(rc)``: given the labels of the op's inputs (``rc.labels_of(arg)``), what are the labels of its output,
  and which channels does it tie, fix or factor? (see fxsparse.channels)
- ``rewrite(wc)``: after channels are re-indexed (removed, reordered, repeated), which of the op's arguments or module
  attributes must change so that it computes the same thing on the new tensors? Most ops are shape-agnostic and
  change nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxsparse.channels import ALL, ChannelGraph, Labels

TensorLabels = tuple  # one Labels per dimension of a tensor
NodeLabels = Any  # TensorLabels for a tensor, a tuple of NodeLabels for a tuple output, None for non-tensors


def opaque(ndim: int) -> TensorLabels:
    return (None,) * ndim


class Rule:
    """The rule of an op with no channel semantics beyond what ``labels`` says; subclasses override."""

    name = "rule"

    def labels(self, rc: "RuleContext") -> NodeLabels:
        raise NotImplementedError

    def rewrite(self, wc: "RewriteContext") -> None:
        """Shape-agnostic by default: nothing to change."""


@dataclass
class RuleContext:
    node: fx.Node
    gm: fx.GraphModule
    graph: ChannelGraph
    env: dict[fx.Node, NodeLabels]

    # -- reading the node -------------------------------------------------------------------------------------
    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The argument at position ``index`` or keyword ``name`` (torch functions accept both)."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    @property
    def module(self) -> torch.nn.Module:
        return self.gm.get_submodule(self.node.target)

    def shape_of(self, value: Any) -> Optional[tuple[int, ...]]:
        if isinstance(value, fx.Node):
            meta = value.meta.get("val")
            if isinstance(meta, torch.Tensor):
                return tuple(int(s) for s in meta.shape)
        return None

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = self.shape_of(self.node)
        assert shape is not None, f"{self.node.name} has no tensor value"
        return shape

    def labels_of(self, value: Any) -> Optional[TensorLabels]:
        """Labels of a tensor argument; None for non-tensors. Plain tensors held by the module are sliceable."""
        if isinstance(value, fx.Node):
            labels = self.env.get(value)
            if labels is None and self.shape_of(value) is not None:
                return opaque(len(self.shape_of(value)))
            return labels
        return None

    def tensor_args(self) -> list[fx.Node]:
        """Every tensor-valued node among the args (flattened lists included), in order."""
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n) if self.shape_of(n) else None)
        return found

    # -- writing facts ----------------------------------------------------------------------------------------
    def param(self, target: str, dim: int, role: str | None = None) -> torch.Tensor:
        """Canonical labels of a parameter/buffer dimension, recording the role it plays here."""
        tensor = _get_tensor(self.gm, target)
        target = self.graph.canonical_target(target, tensor)
        labels = self.graph.param_labels(target, dim, tuple(tensor.shape))
        if role:
            self.graph.set_role(target, dim, role)
        return labels

    def weight_labels(self, value: Any, dim: int, role: str) -> Labels:
        """Labels of dim ``dim`` of a weight argument: canonical when it is a parameter read by ``get_attr``."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            return self.param(value.target, dim, role)
        labels = self.labels_of(value)
        if labels is None:
            return None
        if role == "produce" and labels[dim] is not None:
            self.graph.unverifiable_producers.append(labels[dim])
        return labels[dim]

    def tie(self, a: Labels, b: Labels) -> Labels:
        """Tie two label arrays; an opaque side fixes the other. Returns the surviving labels."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            self.graph.fix(a if a is not None else b)
            return a if a is not None else b
        self.graph.tie(a, b)
        return a

    def fix(self, labels: Labels, blocks: int = ALL) -> None:
        """These channels cannot be re-indexed in the ways ``blocks`` names (default: in no way)."""
        self.graph.fix(labels, blocks)

    def factor(self, base: Labels, n_outer: int, n_inner: int) -> tuple[Labels, Labels]:
        """View ``base`` as an (n_outer, n_inner) grid, e.g. channels as (groups, channels per group).

        A trivial side (size 1) gets a fixed label instead of a factor, so it can never empty the grid.
        """
        if base is None:
            return None, None
        if n_outer == 1 or n_inner == 1:
            single = self.graph.new_labels(1, "fixed", self.node.name)
            self.graph.fix(single)
            return (base, single) if n_inner == 1 else (single, base)
        outer = self.graph.new_labels(n_outer, "outer", self.node.name)
        inner = self.graph.new_labels(n_inner, "inner", self.node.name)
        self.graph.factor(base, outer, inner)
        return outer, inner

    def fix_all(self, node_labels: NodeLabels) -> None:
        for labels in _flat_labels(node_labels):
            self.graph.fix(labels)

    def barrier(self, reason: str) -> NodeLabels:
        """Fix every channel flowing in, also inside a node that holds several tensors (a chunk's outputs passed
        whole); the output is opaque. Used for ops without a rule."""
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: self.fix_all(self.labels_of(n)))
        self.graph.barrier(self.node.name, op_name(self.node), reason)
        return opaque_like(self.node)


def _flat_labels(node_labels: NodeLabels):
    if node_labels is None:
        return
    if isinstance(node_labels, tuple) and node_labels and isinstance(node_labels[0], tuple):
        for item in node_labels:
            yield from _flat_labels(item)
        return
    if isinstance(node_labels, (tuple, list)):
        for item in node_labels:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (tuple, list)):
                yield from _flat_labels(item)


def opaque_like(node: fx.Node) -> NodeLabels:
    value = node.meta.get("val")
    return _opaque_value(value)


def _opaque_value(value: Any) -> NodeLabels:
    if isinstance(value, torch.Tensor):
        return opaque(value.dim())
    if isinstance(value, (tuple, list)):
        return tuple(_opaque_value(v) for v in value)
    return None


def _get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner = gm
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, last)


def op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return getattr(target, "__name__", None) or str(target)


@dataclass
class RewriteContext:
    """What a rule sees when channels are re-indexed (removed, reordered or repeated, see fxsparse.index_map): the node
    in the new graph, the new size of any tensor, and ``counts(labels)``: how many new indices each old index of a
    label array becomes, from which every new size and offset follows (``counts(lab)[:start].sum()``)."""

    node: fx.Node
    gm: fx.GraphModule
    new_shape: Callable[[fx.Node], Optional[tuple[int, ...]]]
    old_shape: Callable[[fx.Node], Optional[tuple[int, ...]]]
    counts: Callable[[Labels], torch.Tensor]  # new indices per old index of a label array
    labels: Callable[[fx.Node], NodeLabels]

    def set_arg(self, index: int, name: str, value: Any) -> None:
        if index < len(self.node.args):
            args = list(self.node.args)
            args[index] = value
            self.node.args = tuple(args)
        else:
            kwargs = dict(self.node.kwargs)
            kwargs[name] = value
            self.node.kwargs = kwargs

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    @property
    def module(self) -> torch.nn.Module:
        return self.gm.get_submodule(self.node.target)


def resize_shape_arg(wc: RewriteContext, shape_arg: Sequence[Any]) -> list[Any]:
    """A view/reshape/expand size list for the smaller tensor: labelled dims get their new size, others stay."""
    labels = wc.labels(wc.node)
    new = wc.new_shape(wc.node)
    out = list(shape_arg)
    if labels is None or new is None or len(out) != len(new):
        return out
    for d, lab in enumerate(labels):
        if lab is not None:
            out[d] = int(new[d])
    return out
