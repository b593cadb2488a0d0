"""THE OP-RULE TABLE: one rule per op, whatever form the op takes in the graph.

An op reaches a graph as an nn.Module leaf (symbolic frontend), a torch function or Tensor method (symbolic), or an
aten overload (export frontend). ``rule_for`` finds its rule: modules by class, functions and methods by a canonical
name, aten ops by their overload name first and then their packet name. A node without a rule is a barrier.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .attention import Einsum, MatMul, ScaledDotProductAttention
from fxsparse.channels import ALL

from .base import Rule
from .elementwise import (
    Barrier, Creation, Elementwise, FirstInputOnly, Like, MixesAlongDim, NoTensor, Reduction, Spatial,
)
from fxsparse.modules import DotProductAttention, PaddedConstantCorrection

from .layers import BorderCorrection, ChannelNorm, Conv, Embedding, GetAttr, LastDimsNorm, Linear, PReLU
from .shape_ops import (
    AtenIndex, Cat, Expand, GetItem, IndexSelect, PatchMerging, Permute, Repeat, Reshape, ReshapeAs, SliceOp, Split,
    Stack, Unflatten,
)

aten = torch.ops.aten

ELEMENTWISE = Elementwise()
_ELEMENTWISE_NAMES = """
add sub mul div truediv floordiv rsub radd rmul rtruediv pow neg abs exp expm1 log log1p log2 sqrt rsqrt sin cos
tanh sigmoid relu relu6 gelu silu mish hardswish hardsigmoid hardtanh leaky_relu elu selu celu softplus softsign
tanhshrink hardshrink softshrink threshold logsigmoid clamp clamp_min clamp_max clip where maximum minimum
dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d contiguous clone detach to type float half
bfloat16 double masked_fill erf erfc reciprocal sign square logical_not logical_and logical_or eq ne lt gt le ge
mod remainder fmod round floor ceil trunc frac lerp addcmul addcdiv sgn nan_to_num copy lift_fresh_copy _to_copy
alias bitwise_not bitwise_and bitwise_or isnan isinf isfinite
""".split()

FUNCTION_RULES: dict[str, Rule] = {name: ELEMENTWISE for name in _ELEMENTWISE_NAMES}
FUNCTION_RULES.update({
    "type_as": FirstInputOnly(), "view_as": ReshapeAs(), "reshape_as": ReshapeAs(),
    "zeros_like": Like(), "ones_like": Like(), "empty_like": Like(), "full_like": Like(), "rand_like": Like(),
    "randn_like": Like(),
    # creation and metadata
    **{n: Creation() for n in "zeros ones empty full arange rand randn randint linspace tensor scalar_tensor "
                               "new_zeros new_ones new_empty new_full new_tensor eye tril_indices triu_indices "
                               "_tensor_constant".split()},
    **{n: NoTensor() for n in "size sym_size dim numel _assert_tensor_metadata _assert_scalar sym_constrain_range "
                               "sym_constrain_range_for_size _assert_async item getattr is_floating_point "
                               "_set_grad_enabled".split()},
    # channel mixing along one dim
    "softmax": MixesAlongDim(1), "log_softmax": MixesAlongDim(1), "_softmax": MixesAlongDim(1),
    "_log_softmax": MixesAlongDim(1), "cumsum": MixesAlongDim(1, blocks=ALL), "cumprod": MixesAlongDim(1, blocks=ALL),
    "normalize": MixesAlongDim(2, "dim", 1), "glu": Barrier("glu gates one half of a dim with the other"), "logcumsumexp": MixesAlongDim(1, blocks=ALL),
    "tril": Spatial(2), "triu": Spatial(2),
    # reductions
    **{n: Reduction() for n in "sum std var logsumexp prod norm nansum var_mean std_mean".split()},
    **{n: Reduction(uniform_repeat=True) for n in "mean amax amin all any nanmean".split()},
    **{n: Reduction(blocks=ALL) for n in "argmax argmin max min".split()},  # indices of channels come out
    # pooling, resizing, padding
    **{f"{p}_pool{k}d": Spatial(k) for p in ("avg", "max", "lp") for k in (1, 2, 3)},
    **{f"adaptive_{p}_pool{k}d": Spatial(k) for p in ("avg", "max") for k in (1, 2, 3)},
    **{f"max_pool{k}d_with_indices": Spatial(k) for k in (1, 2, 3)},
    "_adaptive_avg_pool2d": Spatial(2), "_adaptive_avg_pool3d": Spatial(3),
    "interpolate": Spatial(2), "upsample_nearest2d": Spatial(2), "upsample_bilinear2d": Spatial(2),
    "upsample_bicubic2d": Spatial(2), "_upsample_bilinear2d_aa": Spatial(2), "_upsample_nearest_exact2d": Spatial(2),
    "pad": Spatial(pad_index=1), "constant_pad_nd": Spatial(pad_index=1), "roll": Spatial(2),
    # reshapes, permutations, joins, cuts
    "view": Reshape("varargs"), "reshape": Reshape("varargs"), "_unsafe_view": Reshape(1),
    "flatten": Reshape(), "squeeze": Reshape(), "unsqueeze": Reshape(), "unflatten": Unflatten(),
    "permute": Permute("permute"), "transpose": Permute("transpose"), "swapaxes": Permute("transpose"),
    "swapdims": Permute("transpose"), "t": Permute("t"), "movedim": Permute("movedim"),
    "numpy_T": Permute("t"),
    "cat": Cat(), "concat": Cat(), "concatenate": Cat(), "stack": Stack(),
    "split": Split(1, 2, 0), "split_with_sizes": Split(1, 2, 0), "chunk": Split(1, 2, 0),
    "tensor_split": Split(1, 2, 0), "unbind": Split(dim_index=1, unbind=True),
    "getitem": GetItem(), "slice": SliceOp("slice"), "narrow": SliceOp("narrow"), "select": SliceOp("select"),
    "index_select": IndexSelect(), "index": AtenIndex(),
    "expand": Expand("varargs"), "expand_as": FirstInputOnly(), "broadcast_to": Expand(1), "repeat": Repeat(),
    # layers, functional form
    "linear": Linear(),
    **{f"conv{k}d": Conv("functional") for k in (1, 2, 3)},
    **{f"conv_transpose{k}d": Conv("functional_transpose") for k in (1, 2, 3)},
    "convolution": Conv("aten_convolution"), "_convolution": Conv("aten_convolution"),
    "batch_norm": ChannelNorm(params=((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))),
    "instance_norm": ChannelNorm(params=((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))),
    "layer_norm": LastDimsNorm("shape", 1, params=((2, "weight"), (3, "bias"))),
    "native_layer_norm": LastDimsNorm("shape", 1, params=((2, "weight"), (3, "bias"))),
    "rms_norm": LastDimsNorm("shape", 1, params=((2, "weight"),)),
    "group_norm": LastDimsNorm("channels", params=((2, "weight"), (3, "bias"))),
    "native_group_norm": LastDimsNorm("channels", params=((1, "weight"), (2, "bias"))),
    "local_response_norm": Barrier("local response norm mixes neighbouring channels"),
    "embedding": Embedding(weight_index=1, input_index=0), "prelu": PReLU(), "_prelu_kernel": PReLU(),
    "matmul": MatMul(), "mm": MatMul(), "bmm": MatMul(), "addmm": MatMul(1, 0), "baddbmm": MatMul(1, 0),
    "scaled_dot_product_attention": ScaledDotProductAttention(),
    "pixel_shuffle": Barrier("pixel shuffle moves channels into space"),
    "pixel_unshuffle": Barrier("pixel unshuffle moves space into channels"),
    "einsum": Einsum(),
    # torchvision's fx-wrapped helpers (kept whole by symbolic tracing)
    "stochastic_depth": FirstInputOnly(),
    "shifted_window_attention": Barrier("Swin window attention: its head size derives from the embed dim"),
    "_get_relative_position_bias": Barrier("Swin relative position bias"),
    "_patch_merging_pad": PatchMerging(),
})

# aten overloads whose arguments differ from the function of the same packet name
ATEN_OVERLOAD_RULES: dict[str, Rule] = {
    "aten.embedding.default": Embedding(weight_index=0, input_index=1),
    "aten._native_batch_norm_legit_no_training.default": ChannelNorm(
        params=((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
    "aten._native_batch_norm_legit.default": ChannelNorm(
        params=((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
    "aten.batch_norm.default": ChannelNorm(
        params=((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
    "aten.instance_norm.default": ChannelNorm(
        params=((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
    "aten.split.Tensor": Split(1, 2, 0, replacement=aten.split_with_sizes.default),
    "aten.split_with_sizes.default": Split(1, 2, 0, replacement=aten.split_with_sizes.default),
    "aten.chunk.default": Split(1, 2, 0, replacement=aten.split_with_sizes.default),
    "aten.view.default": Reshape(1), "aten.reshape.default": Reshape(1), "aten.expand.default": Expand(1),
    "aten.max.dim": Reduction(blocks=ALL), "aten.min.dim": Reduction(blocks=ALL),
    "aten.conv_transpose1d.default": Conv("functional_transpose"),
    "aten.conv_transpose2d.input": Conv("functional_transpose"),
    "aten.conv_transpose3d.input": Conv("functional_transpose"),
    "aten.softmax.int": MixesAlongDim(1), "aten.log_softmax.int": MixesAlongDim(1),
    "aten.repeat.default": Repeat(),
}

MODULE_RULES: list[tuple[type, Rule]] = [
    (PaddedConstantCorrection, BorderCorrection()),
    (nn.Linear, Linear()),
    (nn.modules.conv._ConvNd, Conv("module")),
    (nn.modules.batchnorm._BatchNorm, ChannelNorm()),
    (nn.modules.instancenorm._InstanceNorm, ChannelNorm()),
    (nn.LayerNorm, LastDimsNorm("shape")),
    (nn.GroupNorm, LastDimsNorm("channels")),
    (nn.LocalResponseNorm, Barrier("local response norm mixes neighbouring channels")),
    (nn.Embedding, Embedding()),
    (nn.PReLU, PReLU()),
    (nn.Flatten, Reshape()),
    (nn.Identity, ELEMENTWISE),
    (nn.modules.dropout._DropoutNd, ELEMENTWISE),
    (nn.Softmax, MixesAlongDim()),
    (nn.LogSoftmax, MixesAlongDim()),
    (nn.Softmax2d, Barrier("softmax over channels")),
    (nn.ChannelShuffle, Barrier("channel shuffle module")),
    (nn.PixelShuffle, Barrier("pixel shuffle moves channels into space")),
    (DotProductAttention, ScaledDotProductAttention()),
    (nn.MultiheadAttention, Barrier("nn.MultiheadAttention kept whole (not lowered): heads inside it are not pruned")),
    (nn.Upsample, Spatial(2)),
]
for _k in (1, 2, 3):
    for _cls in ("AvgPool", "MaxPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool"):
        if hasattr(nn, f"{_cls}{_k}d"):
            MODULE_RULES.append((getattr(nn, f"{_cls}{_k}d"), Spatial(_k)))
    for _cls in ("ZeroPad", "ConstantPad", "ReflectionPad", "ReplicationPad", "CircularPad"):
        if hasattr(nn, f"{_cls}{_k}d"):
            MODULE_RULES.append((getattr(nn, f"{_cls}{_k}d"), Spatial(_k)))
if hasattr(nn, "RMSNorm"):
    MODULE_RULES.append((nn.RMSNorm, LastDimsNorm("shape")))
_ACTIVATIONS = tuple(
    getattr(nn, n) for n in (
        "ReLU ReLU6 GELU SiLU Mish Hardswish Hardsigmoid Hardtanh LeakyReLU ELU SELU CELU Softplus Softsign Sigmoid "
        "Tanh Tanhshrink Hardshrink Softshrink Threshold LogSigmoid".split()) if hasattr(nn, n))
MODULE_RULES.append((_ACTIVATIONS, ELEMENTWISE))

_OPERATOR_NAMES = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub", operator.mul: "mul",
    operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div", operator.floordiv: "floordiv",
    operator.neg: "neg", operator.pow: "pow", operator.matmul: "matmul", operator.getitem: "getitem",
    operator.mod: "mod", operator.and_: "logical_and", operator.or_: "logical_or", operator.eq: "eq",
    operator.ne: "ne", operator.lt: "lt", operator.gt: "gt", operator.le: "le", operator.ge: "ge",
    getattr: "getattr",
}

GET_ATTR = GetAttr()


def canonical_name(node: fx.Node) -> str:
    """The name a function, method or aten op is looked up by: ``torch.add``, ``x.add_``, ``aten.add.Tensor``
    and ``operator.iadd`` all become "add"."""
    target = node.target
    if node.op == "call_method":
        name = target
    elif target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
        name = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div",
                "rtruediv": "rtruediv", "and": "logical_and", "or": "logical_or", "invert": "bitwise_not"}.get(name, name)
    if name.endswith("_") and not name.startswith("_") and name[:-1] in FUNCTION_RULES:
        name = name[:-1]  # in-place variant: relu_ -> relu
    return name


def rule_for(node: fx.Node, gm: fx.GraphModule) -> Optional[Rule]:
    """The rule of ``node``'s op, or None when the table has none (the node is then a barrier)."""
    if node.op == "get_attr":
        return GET_ATTR
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls, rule in MODULE_RULES:
            if isinstance(module, cls):
                return rule
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        overload = f"aten.{node.target._schema.name.split('::')[-1]}.{node.target._overloadname}"
        if overload in ATEN_OVERLOAD_RULES:
            return ATEN_OVERLOAD_RULES[overload]
    return FUNCTION_RULES.get(canonical_name(node))
