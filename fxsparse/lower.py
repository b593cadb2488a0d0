"""Lowering: modules the op-rule table cannot see into, rewritten as ops it can.

nn.MultiheadAttention computes its heads inside one module, so the table sees it whole: a barrier. Yet its forward
is a handful of ops the table knows, and a smaller nn.MultiheadAttention could not hold a pruned one anyway (its
q, k and v widths are all its embed_dim, the width of its query input). So each call is replaced by those ops::

    q_proj(query), k_proj(key), v_proj(value)   nn.Linear: the rows of in_proj_weight (or q/k/v_proj_weight)
    .unflatten(-1, (heads, head_dim))           then a transpose (batch_first) or permute to [batch, heads, seq, dim]
    attention(q, k, v, attn_mask=...)           fxsparse.modules.DotProductAttention (scaled dot-product attention)
    transpose or permute back, .flatten(-2)
    out_proj(...)                               the module's own out_proj

after which its heads and head dims prune like any transformer's. The parts live in a LoweredMultiheadAttention
that takes the module's place at its own path (``<path>.q_proj``, ...), so the old in_proj tensors are gone.

A module is lowered only where these ops compute what it computes: no add_bias_kv or add_zero_attn, no
key_padding_mask, batched 3-D inputs, an attn_mask that is absent or 2-D, and its attention weights unread (the
second output, which torchvision's ViT discards). Otherwise it stays whole, and the reason is recorded. ``is_causal``
is only a hint that attn_mask is causal: the mask itself is used. Attention dropout is kept, and follows
``train()``/``eval()`` as the module's own did.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .graph_utils import node_shape, tensor_value
from .modules import DotProductAttention, LoweredMultiheadAttention

PARTS = ("q_proj", "k_proj", "v_proj", "attention", "out_proj")


@dataclass
class Lowering:
    """What became of one module the rule table cannot see into."""

    module: str  # its path
    kind: str
    why_not: str = ""  # empty when it was lowered

    @property
    def lowered(self) -> bool:
        return not self.why_not


def modules_to_lower(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The modules ``gm``'s graph calls that this step knows how to lower, by path."""
    found: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.MultiheadAttention):
            found[node.target] = module
    return found


def lower_modules(gm: fx.GraphModule) -> list[Lowering]:
    """Lower, in ``gm`` itself, every nn.MultiheadAttention all of whose calls can be lowered; one record per module.

    The nodes must carry shapes (fxsparse.shapes.propagate_shapes): the conditions read input ranks and mask dtypes.
    """
    records = []
    for path, module in modules_to_lower(gm).items():
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
        why_not = _why_not(gm, path, module, calls)
        if not why_not:
            _replace_module(gm, path, module)
            for node in calls:
                _lower_call(gm.graph, node, path, module)
        records.append(Lowering(path, "nn.MultiheadAttention", why_not))
    if any(record.lowered for record in records):
        gm.graph.lint()
        gm.recompile()
    return records


# -- when lowering is exact -----------------------------------------------------------------------------------------
def _arguments(node: fx.Node, module: nn.MultiheadAttention) -> dict:
    """The call's arguments by name, defaults included."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _why_not(gm: fx.GraphModule, path: str, module: nn.MultiheadAttention, calls: list[fx.Node]) -> str:
    """Why the module cannot be lowered ("" when it can): a reason of its own, or of any one of its calls."""
    reasons = [_why_not_module(gm, path, module)] + [_why_not_call(node, module) for node in calls]
    return next((why for why in reasons if why), "")


def _why_not_module(gm: fx.GraphModule, path: str, module: nn.MultiheadAttention) -> str:
    if module.bias_k is not None:
        return "add_bias_kv=True (learned key/value biases) is not lowered"
    if module.add_zero_attn:
        return "add_zero_attn=True is not lowered"
    if any(n.op == "get_attr" and n.target.startswith(f"{path}.") for n in gm.graph.nodes):
        return "the model reads its parameters directly"
    return ""


def _why_not_call(node: fx.Node, module: nn.MultiheadAttention) -> str:
    args = _arguments(node, module)
    if args["key_padding_mask"] is not None:
        return "a key_padding_mask is not lowered"
    for name in ("query", "key", "value"):
        shape = node_shape(args[name]) if isinstance(args[name], fx.Node) else None
        if shape is None or len(shape) != 3:
            return f"its {name} is not a batched 3-D tensor"
    mask = args["attn_mask"]
    if mask is not None:
        value = tensor_value(mask) if isinstance(mask, fx.Node) else None
        if value is None or value.dim() != 2 or not (value.dtype == torch.bool or value.dtype.is_floating_point):
            return "only a 2-D bool or float attn_mask is lowered"
    for user in node.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if not (index == 0 or (index == 1 and not user.users)):
            return "its attention weights are used"
    return ""


# -- the rewrite ----------------------------------------------------------------------------------------------------
def _replace_module(gm: fx.GraphModule, path: str, module: nn.MultiheadAttention) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    q_proj, k_proj, v_proj = _projections(module)
    parts = LoweredMultiheadAttention(q_proj, k_proj, v_proj, DotProductAttention(module.dropout), module.out_proj)
    setattr(parent, name, parts.train(module.training))  # a new module is in training mode: dropout would apply


def _projections(module: nn.MultiheadAttention) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The q, k and v projections as nn.Linear, with copies of the module's weights."""
    if module._qkv_same_embed_dim:
        weights, source = module.in_proj_weight.split(module.embed_dim), module.in_proj_weight
    else:
        weights, source = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight), module.q_proj_weight
    bias = module.in_proj_bias
    biases = bias.split(module.embed_dim) if bias is not None else (None, None, None)
    return tuple(_linear(w, b, source.requires_grad) for w, b in zip(weights, biases))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return linear


def _lower_call(graph: fx.Graph, node: fx.Node, path: str, module: nn.MultiheadAttention) -> None:
    """Replace one call by the lowered ops; users of its output [0] read the new output, [1] had no users."""
    args = _arguments(node, module)
    batch_first = module.batch_first
    with graph.inserting_before(node):
        q, k, v = (_into_heads(graph, graph.call_module(f"{path}.{part}", (args[name],)), module, batch_first)
                   for part, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")))
        mask = _sdpa_mask(graph, args["attn_mask"])
        attended = graph.call_module(f"{path}.attention", (q, k, v), {"attn_mask": mask} if mask is not None else {})
        out = graph.call_module(f"{path}.out_proj", (_from_heads(graph, attended, batch_first),))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _into_heads(graph: fx.Graph, x: fx.Node, module: nn.MultiheadAttention, batch_first: bool) -> fx.Node:
    """[batch, seq, embed] (or [seq, batch, embed]) -> [batch, heads, seq, head_dim]."""
    x = graph.call_method("unflatten", (x, -1, (module.num_heads, module.head_dim)))
    return graph.call_method("transpose", (x, 1, 2)) if batch_first else graph.call_method("permute", (x, 1, 2, 0, 3))


def _from_heads(graph: fx.Graph, x: fx.Node, batch_first: bool) -> fx.Node:
    """[batch, heads, seq, head_dim] -> [batch, seq, embed] (or [seq, batch, embed])."""
    x = graph.call_method("transpose", (x, 1, 2)) if batch_first else graph.call_method("permute", (x, 2, 0, 1, 3))
    return graph.call_method("flatten", (x, -2))


def _sdpa_mask(graph: fx.Graph, mask: fx.Node | None) -> fx.Node | None:
    """attn_mask as scaled dot-product attention reads it: a bool mask flips, since True means "masked out" to
    nn.MultiheadAttention and "attends" to F.scaled_dot_product_attention; a float mask is added by both."""
    if mask is None or tensor_value(mask).dtype != torch.bool:
        return mask
    return graph.call_method("logical_not", (mask,))
