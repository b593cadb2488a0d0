"""Rules for layers with weights: linear, convolution, normalisation, embedding, PReLU, parameters themselves.

Each layer rule reads its weights in one of three forms (an nn.Module leaf, a torch.nn.functional call, an aten
op from torch.export) through a small *view* object, so the channel logic is written once per layer kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxsparse.channels import CONSUME, FOLLOW, PRODUCE, REMOVE, SCALE

from .base import NodeLabels, RewriteContext, Rule, RuleContext


@dataclass
class Consumer:
    """A node that contracts a channel dim with a weight or another activation; shrink folds what removed
    channels still contribute there (a bias, a BatchNorm shift) into the node's bias."""

    node: str
    kind: str  # "linear", "conv", "matmul"
    input_index: int
    dim: int
    labels: torch.Tensor
    bias_index: int = 2  # where a functional or aten form takes its bias


def _param_ref(rc: RuleContext, value: Any) -> str | None:
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


class WeightArgs:
    """Where a layer's input, weight and bias are, for the module, functional and aten forms."""

    def __init__(self, rc: RuleContext, weight_index: int = 1, bias_index: int = 2, input_index: int = 0):
        self.rc = rc
        if rc.node.op == "call_module":
            module = rc.module
            prefix = rc.node.target
            self.input = rc.node.args[0]
            self.weight = f"{prefix}.weight" if getattr(module, "weight", None) is not None else None
            self.bias = f"{prefix}.bias" if getattr(module, "bias", None) is not None else None
            self.weight_node = self.bias_node = None
        else:
            self.input = rc.arg(input_index, "input")
            self.weight_node = rc.arg(weight_index, "weight")
            self.bias_node = rc.arg(bias_index, "bias")
            self.weight = _param_ref(rc, self.weight_node)
            self.bias = _param_ref(rc, self.bias_node)

    def weight_labels(self, dim: int, role: str):
        if self.weight is not None:
            return self.rc.param(self.weight, dim, role)
        if self.weight_node is None:
            return None
        return self.rc.weight_labels(self.weight_node, dim, role)

    def tie_bias(self, labels) -> None:
        if self.bias is not None:
            self.rc.tie(labels, self.rc.param(self.bias, 0, FOLLOW))
        elif isinstance(self.bias_node, fx.Node):
            self.rc.tie(labels, self.rc.labels_of(self.bias_node)[0])


class Linear(Rule):
    name = "linear"

    def labels(self, rc: RuleContext) -> NodeLabels:
        w = WeightArgs(rc)
        x = rc.labels_of(w.input)
        rc.tie(x[-1], w.weight_labels(1, CONSUME))
        out = w.weight_labels(0, PRODUCE)
        w.tie_bias(out)
        if x[-1] is not None:
            rc.graph.consumers.append(Consumer(rc.node.name, "linear", 0, len(x) - 1, x[-1]))
        return tuple(x[:-1]) + (out,)

    def rewrite(self, wc: RewriteContext) -> None:
        if wc.node.op == "call_module":
            m = wc.module
            m.out_features, m.in_features = m.weight.shape


class Conv(Rule):
    """Convolutions and transposed convolutions, grouped and depthwise included.

    ``form``: "module", "functional" (x, w, b, stride, padding, dilation, groups), "aten_convolution"
    (x, w, b, stride, padding, dilation, transposed, output_padding, groups) or "functional_transpose"
    (x, w, b, stride, padding, output_padding, groups, dilation).
    """

    name = "conv"

    def __init__(self, form: str, spatial: int | None = None):
        self.form, self.spatial = form, spatial

    def _config(self, get, module) -> tuple[bool, int]:
        if self.form == "module":
            return bool(getattr(module, "transposed", False)), module.groups
        if self.form == "functional":
            return False, get(6, "groups", 1)
        if self.form == "functional_transpose":
            return True, get(6, "groups", 1)
        return bool(get(6, "transposed")), get(8, "groups")

    def labels(self, rc: RuleContext) -> NodeLabels:
        w = WeightArgs(rc)
        module = rc.module if rc.node.op == "call_module" else None
        transposed, groups = self._config(rc.arg, module)
        x = rc.labels_of(w.input)
        out_shape = rc.out_shape
        k = len(out_shape) - 2 if len(out_shape) >= 3 else len(out_shape) - 1
        cdim = len(x) - k - 1
        for d in range(cdim + 1, len(x)):
            rc.fix(x[d])
        in_lab = x[cdim]
        c_in, c_out = rc.shape_of(w.input)[cdim], out_shape[cdim]
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        if groups == 1:
            rc.tie(in_lab, w.weight_labels(in_dim, CONSUME))
            out = w.weight_labels(out_dim, PRODUCE)
            if in_lab is not None:
                rc.graph.consumers.append(Consumer(rc.node.name, "conv", 0, cdim, in_lab))
        elif not transposed and groups == c_in == c_out:  # depthwise: channel c in, channel c out
            # the kernel row makes channel c's values (a producer): a masked row leaves only the bias behind
            out = w.weight_labels(0, PRODUCE)
            rc.tie(in_lab, out)
            rc.node.meta["fxsparse_groups"] = out
        elif not transposed:
            group_in, inner_in = rc.factor(in_lab, groups, c_in // groups)
            rc.tie(inner_in, w.weight_labels(1, CONSUME))
            out = w.weight_labels(0, PRODUCE)
            group_out, _ = rc.factor(out, groups, c_out // groups)
            rc.tie(group_in, group_out)
            rc.node.meta["fxsparse_groups"] = group_out
            if in_lab is not None:
                rc.graph.consumers.append(Consumer(rc.node.name, "grouped", 0, cdim, in_lab))
        else:
            return rc.barrier("grouped transposed convolution")
        w.tie_bias(out)
        return tuple(x[:cdim]) + (out,) + (None,) * k

    def rewrite(self, wc: RewriteContext) -> None:
        groups_labels = wc.node.meta.get("fxsparse_groups")
        new_groups = int(wc.counts(groups_labels).sum()) if groups_labels is not None else None
        if wc.node.op == "call_module":
            m = wc.module
            if new_groups is not None:
                m.groups = new_groups
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif new_groups is not None:
            if self.form == "aten_convolution":
                wc.set_arg(8, "groups", new_groups)
            else:
                wc.set_arg(6, "groups", new_groups)


class ChannelNorm(Rule):
    """Per-channel normalisation (BatchNorm, InstanceNorm) and per-channel affine ops: parameters follow dim 1.

    ``params``: (arg index, name) of each per-channel tensor argument in the functional/aten form.
    """

    name = "channel norm"

    def __init__(self, params: tuple = (), module_params: tuple = ("weight", "bias", "running_mean", "running_var"),
                 attribute: str = "num_features"):
        self.params, self.module_params, self.attribute = params, module_params, attribute

    def labels(self, rc: RuleContext) -> NodeLabels:
        x = rc.labels_of(rc.node.args[0])
        cdim = 1 if len(x) > 1 else 0
        channel = x[cdim]
        if rc.node.op == "call_module":
            module = rc.module
            for pname in self.module_params:
                value = getattr(module, pname, None)
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
                    role = SCALE if pname == "weight" else FOLLOW
                    channel = rc.tie(channel, rc.param(f"{rc.node.target}.{pname}", 0, role))
        else:
            for index, pname in self.params:
                value = rc.arg(index, pname)
                if isinstance(value, fx.Node) and rc.shape_of(value) and len(rc.shape_of(value)) == 1:
                    if rc.shape_of(value)[0] > 1:
                        role = SCALE if pname == "weight" else FOLLOW
                        channel = rc.tie(channel, rc.weight_labels(value, 0, role))
        out = tuple(x[:cdim]) + (channel,) + tuple(x[cdim + 1:])
        value = rc.node.meta.get("val")
        if isinstance(value, (tuple, list)):  # aten's native batch norm returns (out, mean, invstd)
            return (out,) + tuple(opaque_like_value(v) for v in value[1:])
        return out

    def rewrite(self, wc: RewriteContext) -> None:
        if wc.node.op == "call_module" and self.attribute:
            module = wc.module
            for pname in self.module_params:
                value = getattr(module, pname, None)
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    setattr(module, self.attribute, value.shape[0])
                    return


def opaque_like_value(value: Any):
    if isinstance(value, torch.Tensor):
        return (None,) * value.dim()
    return None


class LastDimsNorm(Rule):
    """LayerNorm / RMSNorm / GroupNorm: statistics over several channels. LayerNorm's and RMSNorm's channels cannot
    be removed but can be reordered, and repeated uniformly; GroupNorm's are fixed.

    ``normalized``: "shape" (the trailing dims of normalized_shape, at ``shape_index``) or "channels" (dim 1).
    """

    name = "norm"

    def __init__(self, normalized: str = "shape", shape_index: int = 1, params: tuple = ()):
        self.normalized, self.shape_index, self.params = normalized, shape_index, params

    def labels(self, rc: RuleContext) -> NodeLabels:
        x = rc.labels_of(rc.node.args[0])
        if self.normalized == "channels":
            dims = [1]
        else:
            shape = rc.module.normalized_shape if rc.node.op == "call_module" else rc.arg(self.shape_index, "normalized_shape")
            if isinstance(shape, int):
                shape = [shape]
            dims = list(range(len(x) - len(shape), len(x)))
        for d in dims:
            if self.normalized == "shape":
                # statistics over the whole dim: removing a channel changes them, a reordering does not, and a
                # repeat keeps them only when every channel is repeated equally (recorded as a uniform set)
                rc.fix(x[d], REMOVE)
                if x[d] is not None:
                    rc.graph.uniform.append(x[d])
            else:  # GroupNorm: statistics per group of consecutive channels
                rc.fix(x[d])
        tensors: list = []
        if rc.node.op == "call_module":
            for pname in ("weight", "bias"):
                if getattr(rc.module, pname, None) is not None:
                    tensors.append(f"{rc.node.target}.{pname}")
        else:
            tensors = [rc.arg(i, n) for i, n in self.params]
        for t in tensors:
            if t is None:
                continue
            for j, d in enumerate(dims if self.normalized == "shape" else [1]):
                labels = rc.param(t, j, FOLLOW) if isinstance(t, str) else rc.weight_labels(t, j, FOLLOW)
                rc.tie(x[d], labels)
        value = rc.node.meta.get("val")
        if isinstance(value, (tuple, list)):
            return (tuple(x),) + tuple(opaque_like_value(v) for v in value[1:])
        return tuple(x)

    def rewrite(self, wc: RewriteContext) -> None:
        """A repeat (or any re-indexing that changes a width) resizes ``normalized_shape``: the module attribute
        of LayerNorm / RMSNorm, or the functional/aten argument. GroupNorm's channels are fixed: nothing changes."""
        if self.normalized != "shape":
            return
        new = wc.new_shape(wc.node)
        if isinstance(new, tuple) and new and isinstance(new[0], tuple):  # aten's native_layer_norm: (out, ...)
            new = new[0]
        if new is None:
            return
        if wc.node.op == "call_module":
            module = wc.module
            size = len(module.normalized_shape) if isinstance(module.normalized_shape, (tuple, list)) else 1
            module.normalized_shape = tuple(int(s) for s in new[len(new) - size:])
            return
        shape = wc.arg(self.shape_index, "normalized_shape")
        if isinstance(shape, (tuple, list)):
            wc.set_arg(self.shape_index, "normalized_shape", [int(s) for s in new[len(new) - len(shape):]])
        elif isinstance(shape, int):
            wc.set_arg(self.shape_index, "normalized_shape", int(new[-1]))


class Embedding(Rule):
    """Embedding lookups: the embedding dim is produced by the table's dim 1. ``weight_index``: the table's arg."""

    name = "embedding"

    def __init__(self, weight_index: int = 1, input_index: int = 0):
        self.weight_index, self.input_index = weight_index, input_index

    def labels(self, rc: RuleContext) -> NodeLabels:
        if rc.node.op == "call_module":
            idx = rc.node.args[0]
            out = rc.param(f"{rc.node.target}.weight", 1, PRODUCE)
        else:
            idx = rc.arg(self.input_index, "input")
            out = rc.weight_labels(rc.arg(self.weight_index, "weight"), 1, PRODUCE)
        return (None,) * len(rc.shape_of(idx)) + (out,)

    def rewrite(self, wc: RewriteContext) -> None:
        if wc.node.op == "call_module":
            wc.module.embedding_dim = wc.module.weight.shape[1]


class PReLU(Rule):
    name = "prelu"

    def labels(self, rc: RuleContext) -> NodeLabels:
        x = rc.labels_of(rc.node.args[0])
        if rc.node.op == "call_module":
            weight = rc.module.weight
            target = f"{rc.node.target}.weight"
            labels = rc.param(target, 0, FOLLOW) if weight.numel() > 1 else None
        else:
            w = rc.arg(1, "weight")
            labels = rc.weight_labels(w, 0, FOLLOW) if rc.shape_of(w) and rc.shape_of(w)[0] > 1 else None
        if labels is None:
            return x
        cdim = 1 if len(x) > 1 else 0
        channel = rc.tie(x[cdim], labels)
        return tuple(x[:cdim]) + (channel,) + tuple(x[cdim + 1:])

    def rewrite(self, wc: RewriteContext) -> None:
        if wc.node.op == "call_module":
            wc.module.num_parameters = wc.module.weight.numel()


class GetAttr(Rule):
    """A parameter, buffer or constant read in the graph: every dim gets its canonical labels."""

    name = "get_attr"

    def labels(self, rc: RuleContext) -> NodeLabels:
        value = rc.node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        return tuple(rc.param(rc.node.target, d) for d in range(value.dim()))


class BorderCorrection(Rule):
    """fxsparse's PaddedConstantCorrection: reads only its input's spatial size. Its kernel rows are part of what
    produces the corrected convolution's output channels (the add that follows ties them), so a channel removed
    later has them zeroed with the convolution's own rows."""

    name = "border correction"

    def labels(self, rc: RuleContext) -> NodeLabels:
        channels = rc.param(f"{rc.node.target}.weight", 0, PRODUCE)
        return (None, channels) + (None,) * (len(rc.out_shape) - 2)
