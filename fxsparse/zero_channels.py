"""Which removed channels a masked model provably holds at zero, read from its weights instead of running it.

Shrink must know what a removed channel still carries where it is consumed (fxsparse.residue): usually nothing,
since the producing weights and biases of a removed channel are masked, and the ops in between map zero to zero. When
that can be shown for every consumer, the model need not run to measure it. The proof is a forward data flow over
the graph, one fact per node: "every element of this node's value that has a removed channel label, in any
dimension, is exactly 0". It is established by

- a layer (convolution, linear, embedding) whose weight rows and bias entries of its removed output channels are 0;
- a channelwise op (elementwise, pooling, resizing, reduction, BatchNorm, PReLU) run on a probe: a small tensor per
  input holding 0 where that input is known to be 0 and NaN elsewhere, the channel dimensions at full size and the
  others cut to 2, so that per-channel parameters broadcast as in the model; the fact holds when the probe's output
  is 0 at every removed channel (a BatchNorm shift or a sigmoid makes it non-zero, and NaN spreads from anything
  unknown);
- a shape op (view, permute, cat, split, slicing, indexing), whose removed elements are copies of its inputs'
  removed elements: when those inputs hold the fact;
- attention, whose output heads and head-dims are averages of the values': when the values hold the fact;
- a node with no removed channel at all (vacuously).

Anything else (explicit matmuls, ops without a rule) does not hold it, and an op that writes into an input that
other nodes also read ends the proof (an aliasing write could change what they saw); then the channels are measured
by running the model, as before. A wrong "zero" here would drop a constant the model needs, so every rule above only
claims what it can check; the tests compare the proof with a measurement on real model families.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx

from .channels import PRODUCE, ChannelGraph
from .graph_utils import get_attr_value
from .rewrite import select
from .rules import rule_for
from .rules.base import RuleContext, _flat_labels
from .rules.attention import ScaledDotProductAttention
from .rules.elementwise import Elementwise, FirstInputOnly, Like, Reduction, Spatial
from .rules.layers import ChannelNorm, Conv, Embedding, Linear, PReLU, WeightArgs
from .rules.shape_ops import (
    AtenIndex, Cat, GetItem, IndexSelect, PatchMerging, Permute, Repeat, Reshape, ReshapeAs, SliceOp, Split, Stack,
    Unflatten,
)

_LAYERS = (Linear, Conv, Embedding)
_CHANNELWISE = (Elementwise, FirstInputOnly, Like, Spatial, Reduction, ChannelNorm, PReLU)
_SHAPE_OPS = (AtenIndex, Cat, GetItem, IndexSelect, PatchMerging, Permute, Repeat, Reshape, ReshapeAs, SliceOp, Split,
              Stack, Unflatten)
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul}


def removed_inputs_are_zero(gm: fx.GraphModule, graph: ChannelGraph, node_labels: dict[str, Any],
                            keep: torch.Tensor, consumers: list) -> bool:
    """Whether the removed input channels (``keep``: a bool per label) of every one of ``consumers`` are provably 0
    on every input of the masked model ``gm``. Stops at the first consumer it cannot show it for."""
    inputs: dict[str, list[int]] = {}
    for c in consumers:
        inputs.setdefault(c.node, []).append(c.input_index)
    return _ZeroProof(gm, graph, node_labels, keep).run(inputs)


class _ZeroProof:
    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, node_labels: dict[str, Any], keep: torch.Tensor):
        self.gm, self.graph, self.node_labels, self.keep = gm, graph, node_labels, keep
        self.zero: dict[fx.Node, bool] = {}
        self._masks: dict[tuple, torch.Tensor] = {}  # removed-element masks, by node and shape
        self._probed: dict[tuple, bool] = {}  # probe results of ops without tensors of their own, by signature
        self.canonical = {name: canonical for canonical, names in graph.aliases.items() for name in names}

    def run(self, consumer_inputs: dict[str, list[int]]) -> bool:
        """Establish the fact node by node, in order, until a consumer (its name: the indices of the inputs it
        reads removed channels from) reads one not shown to be 0, or a write into a shared input ends the proof."""
        for node in self.gm.graph.nodes:
            for index in consumer_inputs.pop(node.name, []):
                source = node.args[index] if index < len(node.args) else None
                if not (isinstance(source, fx.Node) and self.zero.get(source, False)):
                    return False
            if not consumer_inputs:
                return True
            if node.op == "output" or _writes_into_shared_input(node, self.gm):
                return False
            self.zero[node] = not self._has_removed(node) or self._holds(node)
        return not consumer_inputs

    # -- the rules -----------------------------------------------------------------------------------------------
    def _holds(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            value = get_attr_value(self.gm, node.target)
            return isinstance(value, torch.Tensor) and self._removed_part_is_zero(value, self._labels(node))
        rule = rule_for(node, self.gm)
        try:
            if isinstance(rule, _LAYERS):
                return self._layer_holds(node)
            if isinstance(rule, _SHAPE_OPS):
                inputs = [a for a in _node_inputs(node) if self._has_removed(a)]
                return bool(inputs) and all(self.zero.get(a, False) for a in inputs)
            if isinstance(rule, _CHANNELWISE):
                return self._probe_holds(node)
            if isinstance(rule, ScaledDotProductAttention):
                return self._attention_holds(node)
        except Exception:  # noqa: BLE001 - a form this proof cannot read proves nothing; the model is measured
            return False
        return False

    def _layer_holds(self, node: fx.Node) -> bool:
        """A layer's removed output channels are 0 when their weight rows and bias entries are (whatever the
        input), and its output has removed channels in that dim only."""
        weight_target, bias_target, computed_bias = self._layer_tensors(node)
        if weight_target is None or computed_bias:
            return False
        weight = get_attr_value(self.gm, weight_target)
        produced = [member for dim in range(weight.dim())
                    if (member := self.graph.members.get((self._canonical(weight_target), dim))) is not None
                    and PRODUCE in member.roles]
        if len(produced) != 1:
            return False
        member = produced[0]
        out_labels = self._labels(node)
        other_dims = [labels for labels in out_labels if labels is not None and labels is not member.labels]
        if any(not bool(self.keep[labels].all()) for labels in other_dims):
            return False
        removed = torch.nonzero(~self.keep[member.labels]).flatten()
        if _any_nonzero(weight, member.dim, removed):
            return False
        if bias_target is None:
            return True
        bias = get_attr_value(self.gm, bias_target)
        return bias.dim() == 1 and len(bias) == len(member.labels) and not _any_nonzero(bias, 0, removed)

    def _attention_holds(self, node: fx.Node) -> bool:
        """Attention averages the values over the keys: an output head or head-dim is 0 when that of the values is
        (the output has its removed channels in those two dims only)."""
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        labels = self._labels(node)
        if not isinstance(value, fx.Node) or labels is None or len(labels) < 3:
            return False
        other_dims = [dim_labels for dim, dim_labels in enumerate(labels)
                      if dim not in (len(labels) - 3, len(labels) - 1) and dim_labels is not None]
        if any(not bool(self.keep[dim_labels].all()) for dim_labels in other_dims):
            return False
        return self._has_removed(value) and self.zero.get(value, False)

    def _layer_tensors(self, node: fx.Node) -> tuple[str | None, str | None, bool]:
        """(weight, bias) targets of a layer node (None: not a parameter, or no bias), and whether its bias is
        computed in the graph."""
        rule = rule_for(node, self.gm)
        if isinstance(rule, Embedding):
            if node.op == "call_module":
                return f"{node.target}.weight", None, False
            weight = node.args[rule.weight_index] if rule.weight_index < len(node.args) else node.kwargs.get("weight")
            return (weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None), None, False
        layer = WeightArgs(RuleContext(node, self.gm, self.graph, {}))
        return layer.weight, layer.bias, layer.bias is None and layer.bias_node is not None

    def _probe_holds(self, node: fx.Node) -> bool:
        """Run the op on probes of its inputs (0 where known to be 0, NaN elsewhere); the fact holds when its output
        is 0 at every removed channel. An op that reads no tensor of its own (an activation, a pooling, an add of
        two activations) answers alike wherever it is used with the same arguments: probed once."""
        signature = self._signature(node)
        if signature is None:
            return self._probe_output_zero(node)
        if signature not in self._probed:
            self._probed[signature] = self._probe_output_zero(node)
        return self._probed[signature]

    def _signature(self, node: fx.Node) -> tuple | None:
        """What decides a probe of ``node`` when it reads no tensor of its own; None when it does."""
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                return None
            op: Any = (type(module), repr(module))
        else:
            op = (node.op, node.target)
        inputs = []
        for value in _node_inputs(node):
            if value.op == "get_attr":
                return None
            example = value.meta.get("val")
            inputs.append((self.zero.get(value, False), self._has_removed(value),
                           example.dim() if isinstance(example, torch.Tensor) else None))
        constants = fx.node.map_aggregate((node.args, node.kwargs), lambda v: "node" if isinstance(v, fx.Node) else v)
        return op, repr(constants), tuple(inputs)

    def _probe_output_zero(self, node: fx.Node) -> bool:
        def probe(value: Any) -> Any:
            if not isinstance(value, fx.Node):
                return value
            if value.op == "get_attr":  # a copy: an in-place op must not write into the model's tensor
                attribute = get_attr_value(self.gm, value.target)
                return attribute.clone() if isinstance(attribute, torch.Tensor) else attribute
            example = value.meta.get("val")
            if not isinstance(example, torch.Tensor) or not example.is_floating_point():
                raise TypeError("only floating tensors are probed")
            return self._probe(value, example)

        args = fx.node.map_aggregate(node.args, probe)
        kwargs = fx.node.map_aggregate(node.kwargs, probe)
        with torch.no_grad():
            if node.op == "call_module":
                out = self.gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        labels = self._labels(node)
        if not isinstance(out, torch.Tensor) or labels is None or len(labels) != out.dim():
            return False
        for dim, dim_labels in enumerate(labels):
            if dim_labels is not None and out.shape[dim] != len(dim_labels):
                return False
        return bool((out[self._removed_mask(labels, out.shape)] == 0).all())

    # -- helpers -------------------------------------------------------------------------------------------------
    def _probe(self, node: fx.Node, example: torch.Tensor) -> torch.Tensor:
        labels = self._labels(node)
        shape = [size if labels is not None and labels[dim] is not None else min(size, 2)
                 for dim, size in enumerate(example.shape)]
        probe = torch.full(shape, float("nan"), dtype=example.dtype)
        if self.zero.get(node, False) and labels is not None:
            probe[self._removed_mask(labels, shape)] = 0
        return probe

    def _removed_mask(self, labels: tuple, shape) -> torch.Tensor:
        """A bool tensor of ``shape``: True where an element has a removed label in some dim."""
        key = (id(labels), tuple(shape))
        if key not in self._masks:
            mask = torch.zeros([1] * len(shape), dtype=torch.bool)
            for dim, dim_labels in enumerate(labels):
                if dim_labels is not None:
                    view = [1] * len(shape)
                    view[dim] = len(dim_labels)
                    mask = mask | (~self.keep[dim_labels]).reshape(view)
            self._masks[key] = mask.expand(shape)
        return self._masks[key]

    def _removed_part_is_zero(self, tensor: torch.Tensor, labels: tuple | None) -> bool:
        if labels is None or len(labels) != tensor.dim():
            return False
        return not bool(tensor.detach()[self._removed_mask(labels, tensor.shape)].any())

    def _labels(self, node: fx.Node) -> tuple | None:
        labels = self.node_labels.get(node.name)
        return labels if isinstance(labels, tuple) and all(
            item is None or isinstance(item, torch.Tensor) for item in labels) else None

    def _has_removed(self, node: fx.Node) -> bool:
        return any(not bool(self.keep[labels].all()) for labels in _flat_labels(self.node_labels.get(node.name)))

    def _canonical(self, target: str) -> str:
        return self.canonical.get(target, target)


def _any_nonzero(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> bool:
    """Whether any of ``tensor``'s slices ``index`` along ``dim`` holds a non-zero (or NaN)."""
    if not len(index):
        return False
    smallest, largest = torch.aminmax(select(tensor.detach(), dim, index))
    return bool(smallest != 0) or bool(largest != 0)


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return inputs


def writes_into_shared_inputs(gm: fx.GraphModule) -> bool:
    """Whether some node of ``gm`` writes into an input that other nodes read too (see
    ``_writes_into_shared_input``)."""
    return any(_writes_into_shared_input(node, gm) for node in gm.graph.nodes)


def _writes_into_shared_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` writes into its first input while other nodes read that input too."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node) or len(target.users) < 2:
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace", False))
