"""What removed channels provably carry in a masked model, read from its weights instead of running it.

Shrink must know what a removed channel still carries where it is consumed (fxsparse.residue): nothing, when the
producing weights, biases and shifts of a removed channel are zero, or a constant, a bias or a BatchNorm shift that
no longer depends on the input. When that constant can be shown for every consumer, the model need not run to
measure it. The proof is a forward data flow over the graph. Its fact for a node is a *probe*: a small tensor shaped
like the node's value, its channel dimensions at full size and the others cut to at most 4, that holds the exact
value of every element with a removed channel label (in any dimension) and NaN elsewhere, where those values are the
same at every position of the dimensions cut (so a few positions stand for all; 4, so that a 3x3 pooling of stride 2
still has an output, and more than 1, so that a reduction whose value depends on the size shows it). It is
established by

- a layer (convolution, linear, embedding) whose weight rows of its removed output channels are 0: its bias there;
- a channelwise op (elementwise, BatchNorm, PReLU, pooling, resizing, a reduction) run on its inputs' probes (NaN
  for an input without one; the model's own tensor for a parameter it reads): its output at the removed channels,
  when none is NaN (NaN spreads from anything unknown). A non-zero value is kept only through ops that map a value
  the same at every position to one the same at every position (pointwise ops, max and adaptive pooling, resizing,
  mean): a padded average pooling or a sum over positions would make it depend on the position or the size;
- a shape op (view, permute, cat, split, slicing, indexing), whose removed elements are copies of its inputs': all 0
  when those inputs' are, else run on the probes when the cut sizes allow it;
- attention, whose output heads and head-dims average the values': 0 when the values' are;
- a node with no removed channel at all (vacuously).

Anything else (explicit matmuls, ops without a rule) leaves the node unknown, and an op that writes into an input
that other nodes also read ends the proof (an aliasing write could change what they saw); then the channels are
measured by running the model, as before. A wrong value here would fold a wrong constant, so every rule above claims
only what it checks; the tests compare the proof with a measurement on real model families.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .channels import PRODUCE, ChannelGraph
from .graph_utils import get_attr_value
from .rewrite import select
from .rules import canonical_name, rule_for
from .rules.attention import ScaledDotProductAttention
from .rules.base import RuleContext, _flat_labels
from .rules.elementwise import Elementwise, FirstInputOnly, Like, Reduction, Spatial
from .rules.layers import ChannelNorm, Conv, Embedding, Linear, PReLU, WeightArgs
from .rules.shape_ops import (
    AtenIndex, Cat, GetItem, IndexSelect, PatchMerging, Permute, Repeat, Reshape, ReshapeAs, SliceOp, Split, Stack,
    Unflatten,
)

_LAYERS = (Linear, Conv, Embedding)
_CHANNELWISE = (Elementwise, FirstInputOnly, Like, Spatial, Reduction, ChannelNorm, PReLU)
_POINTWISE = (Elementwise, FirstInputOnly, Like, ChannelNorm, PReLU)
_SHAPE_OPS = (AtenIndex, Cat, GetItem, IndexSelect, PatchMerging, Permute, Repeat, Reshape, ReshapeAs, SliceOp, Split,
              Stack, Unflatten)
# Spatial ops and reductions that map a value the same at every position to one the same at every position.
_KEEPS_UNIFORM_NAMES = {
    *(f"{kind}_pool{k}d" for kind in ("max", "adaptive_avg", "adaptive_max") for k in (1, 2, 3)),
    *(f"max_pool{k}d_with_indices" for k in (1, 2, 3)), "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
    "interpolate", "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_bilinear2d_aa",
    "_upsample_nearest_exact2d", "mean", "nanmean", "amax", "amin",
}
_KEEPS_UNIFORM_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                          nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                          nn.Upsample)
_CUT = 4  # the size a probe keeps of a dimension without channel labels
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul}


class _Zero:
    """A probe 0 at every removed channel, made into a tensor only where an op must run on it: in a model whose
    removed channels carry nothing, most nodes never need one."""


ZERO = _Zero()


def removed_input_constants(gm: fx.GraphModule, graph: ChannelGraph, node_labels: dict[str, Any],
                            keep: torch.Tensor, consumers: list) -> list[torch.Tensor] | None:
    """Per consumer (fxsparse.rules.layers.Consumer), the value each of its removed input channels (``keep``: a
    bool per label) provably carries on every input of the masked model ``gm``, the same at every position; or
    None when that cannot be shown for one of them (the proof stops there)."""
    reads: dict[str, list[int]] = {}
    for index, c in enumerate(consumers):
        reads.setdefault(c.node, []).append(index)
    proof = _ConstantProof(gm, graph, node_labels, keep)
    constants: list[torch.Tensor | None] = [None] * len(consumers)
    for node in gm.graph.nodes:
        for index in reads.pop(node.name, []):
            constants[index] = proof.consumed(node, consumers[index])
            if constants[index] is None:
                return None
        if not reads:
            return constants
        if node.op == "output" or _writes_into_shared_input(node, gm):
            return None
        proof.establish(node)
    return constants if not reads else None


class _ConstantProof:
    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, node_labels: dict[str, Any], keep: torch.Tensor):
        self.gm, self.graph, self.node_labels, self.keep = gm, graph, node_labels, keep
        self.probes: dict[fx.Node, torch.Tensor | _Zero | None] = {}  # None: unknown; absent: no removed channel
        self._zero: dict[fx.Node, bool] = {}  # are a node's removed channels all 0 (its probe says so)
        self._masks: dict[tuple, torch.Tensor] = {}  # removed-element masks, by label tuple and shape
        self._probed: dict[tuple, bool] = {}  # does an op with no tensor of its own give 0, by _probe_key
        self.canonical = {name: canonical for canonical, names in graph.aliases.items() for name in names}

    def establish(self, node: fx.Node) -> None:
        if self._has_removed(node):
            try:
                probe = self._probe_of(node)
            except Exception:  # noqa: BLE001 - a form this proof cannot read proves nothing; the model is measured
                probe = None
            self.probes[node] = probe

    def consumed(self, node: fx.Node, consumer) -> torch.Tensor | None:
        """The constants ``consumer`` (at ``node``) reads from its removed input channels, or None if unknown."""
        source = node.args[consumer.input_index] if consumer.input_index < len(node.args) else None
        if not isinstance(source, fx.Node):
            return None
        probe, labels = self.probes.get(source), self._labels(source)
        if probe is None or labels is None:
            return None
        if any(dim != consumer.dim and dim_labels is not None and not bool(self.keep[dim_labels].all())
               for dim, dim_labels in enumerate(labels)):
            return None  # removed channels in another dim too: no single value per channel
        removed = torch.nonzero(~self.keep[consumer.labels]).flatten()
        if probe is ZERO:
            return torch.zeros(len(removed), dtype=source.meta["val"].dtype)
        values = probe.index_select(consumer.dim, removed).movedim(consumer.dim, 0).reshape(len(removed), -1)
        return values[:, 0]

    # -- the rules -----------------------------------------------------------------------------------------------
    def _probe_of(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            value = get_attr_value(self.gm, node.target)
            if not isinstance(value, torch.Tensor) or not self._zero_at_removed(value, self._labels(node)):
                return None
            return ZERO
        rule = rule_for(node, self.gm)
        if isinstance(rule, _LAYERS):
            return self._layer_probe(node, rule)
        if isinstance(rule, _SHAPE_OPS):
            return self._shape_op_probe(node)
        if isinstance(rule, _CHANNELWISE):
            return self._channelwise_probe(node, rule)
        if isinstance(rule, ScaledDotProductAttention):
            return self._attention_probe(node)
        return None

    def _layer_probe(self, node: fx.Node, rule) -> torch.Tensor | None:
        """A layer's removed output channels carry its bias when their weight rows are 0 (whatever the input), and
        its output has removed channels in that dim only."""
        weight_target, bias_target, computed_bias = self._layer_tensors(node, rule)
        if weight_target is None or computed_bias:
            return None
        weight = get_attr_value(self.gm, weight_target)
        produced = [member for dim in range(weight.dim())
                    if (member := self.graph.members.get((self._canonical(weight_target), dim))) is not None
                    and PRODUCE in member.roles]
        labels = self._labels(node)
        if len(produced) != 1 or labels is None:
            return None
        member = produced[0]
        channel_dims = [dim for dim, dim_labels in enumerate(labels) if dim_labels is member.labels]
        if len(channel_dims) != 1 or any(
                dim_labels is not None and dim != channel_dims[0] and not bool(self.keep[dim_labels].all())
                for dim, dim_labels in enumerate(labels)):
            return None
        removed = torch.nonzero(~self.keep[member.labels]).flatten()
        if _any_nonzero(weight, member.dim, removed):
            return None
        bias = get_attr_value(self.gm, bias_target) if bias_target is not None else None
        if bias is not None and (bias.dim() != 1 or len(bias) != len(member.labels)):
            return None
        if bias is None or not _any_nonzero(bias, 0, removed):
            return ZERO
        example = node.meta.get("val")
        cut = self._cut_shape(labels, example.shape)
        view = [1] * len(cut)
        view[channel_dims[0]] = len(bias)
        return torch.where(self._removed_mask(labels, cut), bias.detach().to(example.dtype).reshape(view),
                           torch.tensor(float("nan"), dtype=example.dtype))

    def _channelwise_probe(self, node: fx.Node, rule) -> torch.Tensor | None:
        """The op run on its inputs' probes; a non-zero result only through an op that keeps a uniform value
        uniform. An op that reads no tensor of its own (an activation, a pooling, an add of two activations) and
        gives 0 on zero (or unknown) inputs does so wherever it is used on inputs alike: probed once."""
        key = self._probe_key(node)
        if key is not None and self._probed.get(key):
            return ZERO
        out = self._run_on_probes(node)
        zero = out is not None and self._zero_at_removed(out, self._labels(node))
        if key is not None:
            self._probed[key] = zero
        if zero:
            return ZERO
        return out if out is not None and self._keeps_uniform(node, rule) else None

    def _shape_op_probe(self, node: fx.Node) -> torch.Tensor | None:
        inputs = [a for a in _node_inputs(node) if self._has_removed(a)]
        if not inputs or any(self.probes.get(a) is None for a in inputs):
            return None
        if all(self._is_zero(a) for a in inputs):
            return ZERO
        return self._run_on_probes(node)

    def _attention_probe(self, node: fx.Node) -> torch.Tensor | None:
        """Attention averages the values over the keys: an output head or head-dim is 0 when that of the values is
        (the output has its removed channels in those two dims only)."""
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        labels = self._labels(node)
        if not isinstance(value, fx.Node) or labels is None or len(labels) < 3:
            return None
        if any(dim_labels is not None and dim not in (len(labels) - 3, len(labels) - 1)
               and not bool(self.keep[dim_labels].all()) for dim, dim_labels in enumerate(labels)):
            return None
        return ZERO if self._has_removed(value) and self._is_zero(value) else None

    # -- running an op on probes ---------------------------------------------------------------------------------
    def _run_on_probes(self, node: fx.Node) -> torch.Tensor | None:
        """``node``'s op on its inputs' probes; None unless every removed element of the result is a number and the
        same at every position of the cut dims. The result is brought to the cut shape (a pooling may cut further)."""
        def probe(value: Any) -> Any:
            if not isinstance(value, fx.Node):
                return value
            if value.op == "get_attr":  # copied for an op that writes: not into the model's tensor
                attribute = get_attr_value(self.gm, value.target)
                return attribute.clone() if in_place and isinstance(attribute, torch.Tensor) else attribute
            example = value.meta.get("val")
            if not isinstance(example, torch.Tensor) or not example.is_floating_point():
                raise TypeError("only floating tensors are probed")
            known = self.probes.get(value)
            if known is None:
                return self._nan_probe(value)
            if known is ZERO:
                return self._zero_probe(value)
            return known.clone() if in_place else known

        in_place = _writes_in_place(node, self.gm)
        args = fx.node.map_aggregate(node.args, probe)
        kwargs = fx.node.map_aggregate(node.kwargs, probe)
        with torch.no_grad():
            if node.op == "call_module":
                out = self.gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        labels, example = self._labels(node), node.meta.get("val")
        if not isinstance(out, torch.Tensor) or labels is None or not isinstance(example, torch.Tensor):
            return None
        if out.dim() != len(labels) or any(dim_labels is not None and out.shape[dim] != len(dim_labels)
                                           for dim, dim_labels in enumerate(labels)) or not out.numel():
            return None
        mask = self._removed_mask(labels, out.shape)
        first = out
        for dim, dim_labels in enumerate(labels):
            if dim_labels is None:
                first = first.narrow(dim, 0, 1)
        if not torch.equal(out[mask], first.expand(out.shape)[mask]):  # also false where NaN (unknown) remains
            return None
        cut = self._cut_shape(labels, example.shape)
        return out if tuple(out.shape) == cut else first.expand(cut).clone()

    def _keeps_uniform(self, node: fx.Node, rule) -> bool:
        if isinstance(rule, _POINTWISE):
            return True
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), _KEEPS_UNIFORM_MODULES)
        return canonical_name(node) in _KEEPS_UNIFORM_NAMES

    def _probe_key(self, node: fx.Node) -> tuple | None:
        """What decides a probe of ``node`` when it reads no tensor of its own and its inputs are 0 or unknown;
        None otherwise."""
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                return None
            op: Any = (type(module), repr(module))
        else:
            op = (node.op, node.target)
        inputs = []
        for value in _node_inputs(node):
            example = value.meta.get("val")
            probe = self.probes.get(value)
            if value.op == "get_attr" or not isinstance(example, torch.Tensor):
                return None
            if probe is not None and not self._is_zero(value):
                return None
            inputs.append((probe is not None, self._has_removed(value), tuple(example.shape)))
        constants = fx.node.map_aggregate((node.args, node.kwargs), lambda v: "node" if isinstance(v, fx.Node) else v)
        return op, repr(constants), tuple(inputs)

    # -- probes --------------------------------------------------------------------------------------------------
    def _cut_shape(self, labels: tuple, shape) -> tuple[int, ...]:
        return tuple(int(size) if labels[dim] is not None else min(int(size), _CUT) for dim, size in enumerate(shape))

    def _nan_probe(self, node: fx.Node) -> torch.Tensor:
        example = node.meta.get("val")
        labels = self._labels(node)
        if not isinstance(example, torch.Tensor) or labels is None or len(labels) != example.dim():
            raise TypeError("no probe for a node without a tensor value and labels")
        return torch.full(self._cut_shape(labels, example.shape), float("nan"), dtype=example.dtype)

    def _zero_probe(self, node: fx.Node) -> torch.Tensor:
        example, labels = node.meta.get("val"), self._labels(node)
        mask = self._removed_mask(labels, self._cut_shape(labels, example.shape))
        zero, nan = torch.tensor(0.0, dtype=example.dtype), torch.tensor(float("nan"), dtype=example.dtype)
        return torch.where(mask, zero, nan)

    def _is_zero(self, node: fx.Node) -> bool:
        """Whether ``node`` has a probe, 0 at every removed channel."""
        probe = self.probes.get(node)
        if probe is None or probe is ZERO:
            return probe is ZERO
        if node not in self._zero:
            self._zero[node] = self._zero_at_removed(probe, self._labels(node))
        return self._zero[node]

    def _removed_mask(self, labels: tuple, shape) -> torch.Tensor:
        """A bool tensor of ``shape``: True where an element has a removed label in some dim."""
        key = (tuple(id(dim_labels) for dim_labels in labels), tuple(shape))
        if key not in self._masks:
            mask = torch.zeros([1] * len(shape), dtype=torch.bool)
            for dim, dim_labels in enumerate(labels):
                if dim_labels is not None:
                    view = [1] * len(shape)
                    view[dim] = len(dim_labels)
                    mask = mask | (~self.keep[dim_labels]).reshape(view)
            self._masks[key] = mask.expand(shape)
        return self._masks[key]

    def _zero_at_removed(self, tensor: torch.Tensor, labels: tuple | None) -> bool:
        """Whether ``tensor`` (a probe, or a tensor the model reads) is 0 at every element with a removed label."""
        if labels is None or len(labels) != tensor.dim():
            return False
        return not bool(tensor.detach()[self._removed_mask(labels, tensor.shape)].any())

    # -- reading the graph ---------------------------------------------------------------------------------------
    def _layer_tensors(self, node: fx.Node, rule) -> tuple[str | None, str | None, bool]:
        """(weight, bias) targets of a layer node (None: not a parameter, or no bias), and whether its bias is
        computed in the graph."""
        if isinstance(rule, Embedding):
            if node.op == "call_module":
                return f"{node.target}.weight", None, False
            weight = node.args[rule.weight_index] if rule.weight_index < len(node.args) else node.kwargs.get("weight")
            return (weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None), None, False
        layer = WeightArgs(RuleContext(node, self.gm, self.graph, {}))
        return layer.weight, layer.bias, layer.bias is None and layer.bias_node is not None

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
    return isinstance(target, fx.Node) and len(target.users) > 1 and _writes_in_place(node, gm)


def _writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` writes into its first input (``x.add_(y)``, ``x += y``, ``ReLU(inplace=True)``)."""
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
    signature = _signature_of(node.target)
    try:
        bound = signature.bind(*node.args, **node.kwargs) if signature is not None else None
    except TypeError:
        return False
    return bound is not None and bool(bound.arguments.get("inplace", False))


@functools.lru_cache(maxsize=None)
def _signature_of(function) -> inspect.Signature | None:
    """``function``'s signature if it takes ``inplace`` (reading one costs more than the rest of a check)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    return signature if "inplace" in signature.parameters else None
