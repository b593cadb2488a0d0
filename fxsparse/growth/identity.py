"""How a copy of a block is made to compute the identity: read off the block's graph.

The residual stream is followed from the block's input: an add one of whose operands is the stream is a residual
add, the other operand its branch. Zeroing the last parametric op of every branch (a projection, or a BatchNorm's
weight and bias) makes every branch output zero, so a pre-norm block (GPT-2, LLaMA, ViT, ConvNeXt, ResNet,
MobileNetV2) returns its input. Ops between that layer and the add must map zero to zero (dropout, views, a
layer scale, stochastic depth); anything else stops the search and the block is reported as not growable.

A post-norm block (BERT: ``out = LN(x + f(x))``) cannot return its input, since its last norm re-scales it. It is
grown right after a norm, the block before it, whose output ``n = gamma * z + beta`` is moved into the copy: the
norm before gets gamma=1, beta=0 (so it hands the copy the normalised ``z``), the copy's inner norms the same (LN of
``z + 0`` is ``z`` up to eps), and the copy's last norm takes the old gamma and beta, giving back ``n``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import FxsparseError
from ..graph_utils import get_attr_value
from .blocks import Block

_ADDS = {"add", "iadd", "add_"}
_NORMS = {"layer_norm", "native_layer_norm"}
_NORM_MODULES = (torch.nn.LayerNorm,)
# ops that map a zero input to a zero output, walked through on the way back from a residual add
_ZERO_PRESERVING = {"dropout", "native_dropout", "feature_dropout", "view", "_unsafe_view", "reshape", "permute",
                    "transpose", "contiguous", "clone", "flatten", "unflatten", "unsqueeze", "squeeze", "alias",
                    "stochastic_depth", "t", "mul", "getitem", "to", "_to_copy"}
_ZERO_PRESERVING_MODULES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity", "StochasticDepth",
                            "Permute", "Flatten")
# ops whose output is zero once their parameters (weight, bias) are
_PRODUCERS = {"linear", "addmm", "conv1d", "conv2d", "conv3d", "convolution", "batch_norm",
              "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "layer_norm", "native_layer_norm",
              "group_norm", "rms_norm"}
_PRODUCER_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm,
                     torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
_PRODUCER_CLASS_NAMES = ("Conv1D", "LlamaRMSNorm")  # Hugging Face's, matched by name: transformers is optional


class NotGrowableError(FxsparseError):
    """A block whose copy cannot be made to compute the identity; the message says why."""


@dataclass
class IdentityRecipe:
    """What a new copy of a block changes, by parameter names relative to the block.

    ``zero``: parameters zeroed (every residual branch's last layer). ``inner_norms`` and ``last_norm``: for a
    post-norm block, the (weight, bias) of the norms after each residual add; the copy's inner ones get 1 and 0,
    the last one takes the affine of the norm before the copy, which gets 1 and 0.
    """

    zero: list[str]
    inner_norms: list[list[str]] = field(default_factory=list)
    last_norm: list[str] = field(default_factory=list)

    @property
    def post_norm(self) -> bool:
        return bool(self.last_norm)

    def to_dict(self) -> dict:
        return {"zero": self.zero, "inner_norms": self.inner_norms, "last_norm": self.last_norm}

    @classmethod
    def from_dict(cls, data: dict) -> "IdentityRecipe":
        return cls(list(data["zero"]), [list(n) for n in data.get("inner_norms", [])], list(data.get("last_norm", [])))


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    target = getattr(node.target, "overloadpacket", node.target)
    return getattr(target, "__name__", str(target))


def _is_parameter(gm: fx.GraphModule, node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "get_attr"
            and isinstance(get_attr_value(gm, node.target), torch.nn.Parameter))


def _module_parameters(gm: fx.GraphModule, block: Block, target: str) -> list[str]:
    return [block.relative(f"{target}.{name}") for name, _ in gm.get_submodule(target).named_parameters()]


def _branch_producer(gm: fx.GraphModule, block: Block, node: fx.Node) -> list[str]:
    """Parameters (relative names) whose zeroing makes ``node`` zero; raises NotGrowableError if none is found."""
    inside = set(block.nodes)
    while node in inside:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = type(module).__name__
            if isinstance(module, _PRODUCER_MODULES) or kind in _PRODUCER_CLASS_NAMES:
                return _module_parameters(gm, block, node.target)
            if isinstance(module, torch.nn.MultiheadAttention):
                return _module_parameters(gm, block, f"{node.target}.out_proj")
            if kind not in _ZERO_PRESERVING_MODULES:
                break
            node = node.args[0]
            continue
        name = op_name(node)
        params = [a.target for a in node.args if _is_parameter(gm, a)]
        if name in _PRODUCERS and params:
            return [block.relative(p) for p in params]
        if name not in _ZERO_PRESERVING or node.op not in ("call_function", "call_method"):
            break
        if name == "getitem" and node.args[1] != 0:
            break
        operands = [a for a in node.args if isinstance(a, fx.Node) and not _is_parameter(gm, a)]
        if name == "mul" and not operands and params:
            return [block.relative(p) for p in params]
        if name == "mul" and len(operands) != 1:
            break
        node = operands[0]
    raise NotGrowableError(f"block {block.path}: no layer whose zeroing silences the residual branch ending at "
                           f"{node.name} ({node.op} {op_name(node) if node.op != 'call_module' else node.target})")


_SAME_VALUE = {"to", "_to_copy", "alias", "clone", "contiguous", "type_as"}


def _source(node: fx.Node) -> fx.Node:
    """The node whose value ``node`` is (a ``.to()`` of a float32 tensor to float32 is that tensor)."""
    while node.op in ("call_function", "call_method") and op_name(node) in _SAME_VALUE and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _reaches(start: fx.Node, target: fx.Node, inside: set[fx.Node]) -> bool:
    """Is ``target`` an input of ``start``, walking back through the block's nodes only?"""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is target:
            return True
        if node in seen or node not in inside:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return False


def _norm_parameters(gm: fx.GraphModule, block: Block, node: fx.Node) -> list[str] | None:
    """(weight, bias) of a LayerNorm node, relative to the block, or None if ``node`` is not one with both."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _NORM_MODULES):
        names = _module_parameters(gm, block, node.target)
        return names if len(names) == 2 else None
    if node.op == "call_function" and op_name(node) in _NORMS:
        params = [a.target for a in node.args if _is_parameter(gm, a)]
        return [block.relative(p) for p in params] if len(params) == 2 else None
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class StreamAnalysis:
    recipe: IdentityRecipe
    stream_input: fx.Node  # the block's input along the residual stream


def analyse_block(gm: fx.GraphModule, block: Block) -> StreamAnalysis:
    """Follow the residual stream through ``block`` and return its identity recipe; NotGrowableError says why not."""
    inside = set(block.nodes)
    output = block.output
    if output is None:
        raise NotGrowableError(f"block {block.path} hands more than one value to the rest of the model")
    stream, stream_input = None, None
    zero: list[str] = []
    norms: list[tuple[list[str], fx.Node]] = []
    for node in block.nodes:
        if node.op not in ("call_function", "call_method") or op_name(node) not in _ADDS:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        sources = [_source(a) for a in operands]
        if stream is None:
            stream = stream_input = _block_input(operands, sources, inside)
            if stream is None:
                continue
        if _source(stream) not in sources:
            continue
        branch = operands[1] if sources[0] is _source(stream) else operands[0]
        zero += _branch_producer(gm, block, branch)
        stream = node
        user = _only_user(node)
        norm = _norm_parameters(gm, block, user) if user in inside else None
        if norm is not None:
            norms.append((norm, user))
            stream = user
    if stream is None:
        raise NotGrowableError(f"block {block.path} has no residual connection: a copy of it cannot start as the "
                               "identity")
    if norms:
        if stream is not output:
            raise NotGrowableError(f"block {block.path} is post-norm but its last norm is not its output")
        return StreamAnalysis(IdentityRecipe(zero, [n for n, _ in norms[:-1]], norms[-1][0]), stream_input)
    if stream is not output and not _trails(gm, output, stream):
        raise NotGrowableError(f"block {block.path}: its output is not the residual stream")
    return StreamAnalysis(IdentityRecipe(zero), stream_input)


def _block_input(operands: list[fx.Node], sources: list[fx.Node], inside: set[fx.Node]) -> fx.Node | None:
    """The operand of a block's first residual add that comes from outside the block and feeds the other one."""
    for k in (0, 1):
        if sources[k] not in inside and _reaches(operands[1 - k], sources[k], inside):
            return sources[k]
    return None


def _trails(gm: fx.GraphModule, output: fx.Node, stream: fx.Node) -> bool:
    """``output`` is a ReLU of the stream (ResNet's last op): the identity then holds for the inputs it leaves
    unchanged (the ReLU'd output of the block before); the numerical verification after a growth checks it."""
    if output.all_input_nodes != [stream]:
        return False
    if output.op == "call_module":
        return isinstance(gm.get_submodule(output.target), (torch.nn.ReLU, torch.nn.ReLU6))
    return output.op in ("call_function", "call_method") and op_name(output) in {"relu", "relu_", "relu6"}
