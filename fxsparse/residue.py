"""Exactness for removed channels that are not zero.

A removed channel whose producing weights are masked still carries whatever its bias, a BatchNorm shift or an
activation of zero puts there: a value that no longer depends on the input. Dropping it would change the model
(NNI's ModelSpeedup drifts exactly here), so its contribution is measured where it is consumed, on the masked
model (or proven from the weights, fxsparse.constant_channels, where that costs less than a run), and kept: in
the consumer's bias when it is the same everywhere, in a PaddedConstantCorrection when a zero-padded convolution
makes it vary at the borders. A contribution that can be kept neither way (a product of two activations, a
grouped convolution) means the channel stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .channels import ChannelAnalysis
from .constant_channels import removed_input_constants, writes_into_shared_inputs
from .graph_utils import get_attr_value, placeholder_values
from .modules import PaddedConstantCorrection
from .rules.layers import Consumer


@dataclass
class Fold:
    consumer: Consumer
    out_dim: int  # the consumer output's channel dim
    vector: torch.Tensor  # per (old) output channel: a constant to add to the bias
    correction: torch.Tensor | None = None  # folded kernel for a PaddedConstantCorrection
    conv_args: tuple | None = None  # (stride, padding, dilation)


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the evaluated arguments and output of the named nodes: copies of them when a later
    node may write into a tensor they read (``x.add_(1)`` after a layer read ``x``)."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}
        self.copy = writes_into_shared_inputs(gm)

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self.copy:
                args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        result = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = (args, kwargs, result)
        return result


def _broadcast_mask(mask: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = len(mask)
    return mask.reshape(shape)


def _call(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict, bias_index: int | None) -> torch.Tensor:
    """Run ``node``'s op on ``args`` with its bias (at ``bias_index``; None: keep it) zeroed."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if bias_index is not None and getattr(module, "bias", None) is not None:
            return torch.func.functional_call(module, {"bias": torch.zeros_like(module.bias)}, args, kwargs)
        return module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if bias_index is not None and 0 <= bias_index < len(args) and isinstance(args[bias_index], torch.Tensor):
        args = args[:bias_index] + (torch.zeros_like(args[bias_index]),) + args[bias_index + 1:]
    return node.target(*args, **kwargs)


def _conv_settings(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> tuple | None:
    """(stride, padding, dilation, weight, groups) of a zero-padded, non-transposed convolution node, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "transposed", False) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return m.stride, m.padding, m.dilation, m.weight, m.groups
    get = lambda i, name, default=None: args[i] if i < len(args) else kwargs.get(name, default)  # noqa: E731
    aten_form = "convolution" in str(node.target)
    if aten_form and get(6, "transposed"):
        return None
    padding = get(4, "padding", 0)
    if isinstance(padding, str):
        return None
    groups = get(8, "groups", 1) if aten_form else get(6, "groups", 1)
    return get(3, "stride", 1), padding, get(5, "dilation", 1), get(1, "weight"), groups


def _max_abs(t: torch.Tensor) -> float:
    """max |t| without an |t|-sized temporary."""
    return torch.linalg.vector_norm(t, float("inf")).item() if t.numel() else 0.0


def _spread(t: torch.Tensor, keep_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index of ``keep_dim``: the value (first element) and max - min over all other dims."""
    moved = t.movedim(keep_dim, 0).reshape(t.shape[keep_dim], -1)
    return moved[:, 0], moved.max(dim=1).values - moved.min(dim=1).values


def settle_residues(
    gm: fx.GraphModule, analysis: ChannelAnalysis, consumers: list[Consumer], removed: torch.Tensor,
    args: tuple, kwargs: dict, node_labels: dict[str, Any], max_rounds: int = 4, prove: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[Fold], list[str], Any]:
    """Final (removed units, keep per label, folds, notes on channels kept back), and ``gm``'s output on
    ``args``/``kwargs``, which the residues are measured on (None when no channel needed measuring).

    ``prove``: first try to show from the weights what every removed channel carries to its consumers
    (fxsparse.constant_channels), and measure only if that fails. A caller that runs the model on ``args`` anyway
    (verification) measures at once and takes the output."""
    notes: list[str] = []
    nodes = {n.name: n for n in gm.graph.nodes}
    model_output = None
    for _ in range(max_rounds):
        keep = analysis.keep_labels(removed)
        active = [c for c in consumers if not bool(keep[c.labels].all())]
        if not active:
            return removed, keep, [], notes, model_output
        outcomes = _from_constants(gm, nodes, analysis, active, keep, node_labels) if prove else None
        if outcomes is None:
            capture = _Capture(gm, {c.node for c in active})
            with torch.no_grad():
                model_output = capture.run(*placeholder_values(gm, args, kwargs))
            outcomes = [_measure(gm, nodes[c.node], c, keep, *capture.seen[c.node], node_labels) for c in active]
        folds, blocked = {}, []
        for c, (fold, why) in zip(active, outcomes):
            if fold is not None:
                folds[c.node] = fold
            elif why:
                blocked.append(c.labels[~keep[c.labels]])
                notes.append(f"{c.node}: {why}; its removed input channels are kept")
        blocked += _settle_shared_layers(gm, nodes, consumers, keep, folds, notes)
        folds = list(folds.values())
        if not blocked:
            return removed, keep, folds, notes, model_output
        removed = analysis.restore(removed, torch.cat(blocked))
    raise RuntimeError("removed channels' residues did not settle")


def _settle_shared_layers(gm, nodes, consumers: list[Consumer], keep, folds: dict[str, Fold],
                          notes: list[str]) -> list[torch.Tensor]:
    """One layer called several times (or layers sharing one bias) has one bias to fold into: each distinct
    contribution is folded once. Calls that agree keep a single fold (dropped from ``folds`` for the others); calls
    that differ (a call with nothing to fold counts as a zero contribution) cannot share one bias, so their removed
    input channels stay. Returns the labels to restore."""
    calls: dict[int, list[Consumer]] = {}
    for c in consumers:
        key = _bias_owner(gm, nodes[c.node], c.bias_index) if c.kind in _WITH_BIAS else None
        if key is not None:
            calls.setdefault(key, []).append(c)
    blocked = []
    for members in calls.values():
        if len(members) < 2 or not any(c.node in folds for c in members):
            continue
        first = folds.get(members[0].node)
        if all(_same_fold(first, folds.get(c.node)) for c in members[1:]):
            for c in members[1:]:
                folds.pop(c.node, None)
            continue
        for c in members:
            folds.pop(c.node, None)
            blocked.append(c.labels[~keep[c.labels]])
        names = ", ".join(c.node for c in members)
        notes.append(f"{names}: one layer's bias, and its calls get different constants from removed channels, "
                     "which one bias cannot hold; their removed input channels are kept")
    return blocked


def _bias_owner(gm: fx.GraphModule, node: fx.Node, bias_index: int) -> int | None:
    """What a fold into ``node`` lands in, by identity: its module (whose one bias every call adds), or the bias
    tensor a functional layer reads; None when a fold would make a bias of this node's own."""
    if node.op == "call_module":
        return id(gm.get_submodule(node.target))
    bias = node.args[bias_index] if 0 <= bias_index < len(node.args) else node.kwargs.get("bias")
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        return id(get_attr_value(gm, bias.target))
    return None


def _same_fold(a: Fold | None, b: Fold | None) -> bool:
    if a is None or b is None:
        return a is b
    if (a.correction is None) != (b.correction is None) or a.vector.shape != b.vector.shape:
        return False
    close = lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6 * max(_max_abs(x), 1e-6))  # noqa: E731
    return close(a.vector, b.vector) and (a.correction is None or close(a.correction, b.correction))


# Consumers with a bias that can hold what removed input channels contribute; the others are products of two
# activations, where what a removed channel adds depends on the other operand.
_WITH_BIAS = ("linear", "conv", "grouped")


def _measure(gm, node, c: Consumer, keep, call_args, call_kwargs, output, node_labels):
    """(Fold or None, reason the channels must stay or None)."""
    if c.kind == "attention":
        return _measure_attention(c, keep, call_args)
    x = call_args[c.input_index]
    removed_index = torch.nonzero(~keep[c.labels]).flatten()
    removed_inputs = x.index_select(c.dim, removed_index)
    if not removed_inputs.any():  # the common case (zero biases, a ReLU of a negative shift): nothing to keep
        return None, None
    const, in_spread = _spread(removed_inputs, c.dim)
    uniform_inputs = in_spread.max().item() <= 1e-6 * max(_max_abs(removed_inputs), 1e-6)
    scale = _max_abs(output) if isinstance(output, torch.Tensor) else 1.0
    batched_conv = c.kind in ("conv", "grouped") and c.dim == 1
    settings = _conv_settings(gm, node, call_args, call_kwargs) if batched_conv else None
    with torch.no_grad():
        if uniform_inputs and settings is not None:
            return _measure_uniform_conv(c, removed_index, const, x, settings, scale)
        contribution = _contribution(gm, node, c, keep, call_args, call_kwargs, one_position=uniform_inputs)
    if contribution.abs().max().item() <= 1e-6 * max(scale, 1e-6):
        return None, None
    if c.kind not in _WITH_BIAS:
        return None, f"removed channels contribute to a product of activations ({c.kind})"
    out_dim = len(node_labels[c.node]) - 1 if c.kind == "linear" else c.dim
    value, spread = _spread(contribution, out_dim)
    if spread.max().item() <= 1e-5 * max(scale, 1e-6):
        return Fold(c, out_dim, value), None
    return None, "removed channels contribute a position-dependent value"


# The proof of what removed channels carry (fxsparse.constant_channels) costs about 0.3 ms per graph node on a
# 2-core CPU, a run of the model about its MACs at tens of GMAC/s: on ResNet-50 at batch 1 (7.7M MACs per node) the
# proof took 62 ms and the run 75 ms; on MobileNetV2 (0.75M per node) 52 ms and about 20 ms.
PROOF_MIN_MACS_PER_NODE = 5_000_000


def proving_pays(macs: int | None, nodes: int) -> bool:
    """Whether a model of ``macs`` per forward and ``nodes`` graph nodes is cheaper to prove than to run."""
    return macs is not None and macs >= PROOF_MIN_MACS_PER_NODE * nodes


def _from_constants(gm, nodes, analysis: ChannelAnalysis, active: list[Consumer], keep, node_labels):
    """``_measure``'s (Fold or None, reason) per consumer, from the constants the proof shows their removed inputs
    carry; None when the proof fails or a consumer needs the model run to tell."""
    constants = removed_input_constants(gm, analysis.graph, node_labels, keep, active)
    if constants is None:
        return None
    outcomes = []
    for c, const in zip(active, constants):
        outcome = _fold_constant(gm, nodes[c.node], c, keep, const, node_labels)
        if outcome is None:
            return None
        outcomes.append(outcome)
    return outcomes


def _fold_constant(gm, node, c: Consumer, keep, const: torch.Tensor, node_labels):
    """``_measure`` for removed inputs known to carry ``const`` (a value per removed channel, the same at every
    position), or None where only a run tells: a non-zero constant into a product of activations or into a layer
    in functional form. A border-dependent contribution always goes to a correction (no run gives the output's
    scale that would make a small border effect negligible)."""
    if not bool(const.any()):
        return None, None
    if node.op != "call_module" or c.kind not in _WITH_BIAS:
        return None
    example = node.args[c.input_index].meta.get("val")
    if not isinstance(example, torch.Tensor):
        return None
    removed_index = torch.nonzero(~keep[c.labels]).flatten()
    with torch.no_grad():
        if c.kind == "linear":
            one_position = torch.zeros([1] * (example.dim() - 1) + [example.shape[c.dim]], dtype=example.dtype)
            one_position[..., removed_index] = const.to(example.dtype)
            contribution = _call(gm, node, (one_position,), {}, c.bias_index)
            return Fold(c, len(node_labels[c.node]) - 1, contribution.reshape(-1)), None
        settings = _conv_settings(gm, node, (), {}) if c.dim == 1 else None
        if settings is None:
            return None
        spatial = tuple(example.shape[2:])
        x = torch.zeros((1, 1) + spatial, dtype=example.dtype).expand((1, example.shape[1]) + spatial)
        return _measure_uniform_conv(c, removed_index, const, x, settings, scale=0.0)


def _measure_attention(c: Consumer, keep, call_args):
    """Removed head-dims of q add ``q_removed . k_removed`` to every score: harmless iff the same for every key."""
    x = call_args[c.input_index]
    q = x * _broadcast_mask((~keep[c.labels]).to(x.dtype), c.dim, x.dim())
    k = call_args[1]
    if k.dim() >= 3 and k.shape[-3] != q.shape[-3]:  # grouped-query attention: each k head serves several q heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    with torch.no_grad():
        contribution = q @ k.transpose(-1, -2)
    across_keys = contribution.amax(-1) - contribution.amin(-1)
    scale = contribution.abs().max().item() + 1e-30
    if across_keys.abs().max().item() <= 1e-5 * max(scale, 1.0):
        return None, None  # constant over the keys: softmax cancels it
    return None, "removed head-dims add a key-dependent score"


def _contribution(gm, node, c: Consumer, keep, call_args, call_kwargs, one_position: bool) -> torch.Tensor:
    """The consumer's output from its removed input channels alone (bias left out).

    ``one_position``: the removed channels hold the same values at every position, and the consumer is a linear
    layer acting on each position alone, so one position tells it all (a full layer costs as much as the model's).
    """
    x = call_args[c.input_index]
    only_removed = x * _broadcast_mask((~keep[c.labels]).to(x.dtype), c.dim, x.dim())
    if one_position and c.kind == "linear":
        first = only_removed.reshape(-1, x.shape[c.dim])[:1]
        only_removed = first.reshape([1] * (x.dim() - 1) + [x.shape[c.dim]])
    args = list(call_args)
    args[c.input_index] = only_removed
    bias_index = c.bias_index if c.kind in _WITH_BIAS else None
    return _call(gm, node, tuple(args), call_kwargs, bias_index)


def _measure_uniform_conv(c: Consumer, removed_index, const, x, settings, scale):
    """A zero-padded convolution of channels that are constant over space: what they add is the convolution of an
    all-ones image with the folded kernel ``sum_c W[:, c] * value_c``; a constant (bias) away from the borders."""
    stride, padding, dilation, weight, groups = settings
    kernel = _folded_kernel(weight, groups, removed_index, const, x.shape[1])
    correction = PaddedConstantCorrection(kernel, stride, padding, dilation)
    contribution = correction(x[:1, :1])
    if contribution.abs().max().item() <= 1e-6 * max(scale, 1e-6):
        return None, None
    value, spread = _spread(contribution, 1)
    if spread.max().item() <= 1e-5 * max(scale, 1e-6):
        return Fold(c, c.dim, value), None
    return Fold(c, c.dim, torch.zeros(weight.shape[0]), kernel.detach(), (stride, padding, dilation)), None


def _folded_kernel(weight: torch.Tensor, groups: int, removed_index, const, in_channels: int) -> torch.Tensor:
    """``K[o] = sum_c W[o, c] * value_c`` over the removed input channels c that output o reads (in a grouped
    convolution, those of its own group): one input channel that adds what the removed ones added."""
    values = torch.zeros(in_channels, dtype=weight.dtype)
    values[removed_index] = const.to(weight.dtype)
    out_channels, per_group = weight.shape[:2]
    by_group = weight.reshape(groups, out_channels // groups, per_group, -1)  # [groups, outputs, inputs, taps]
    kernel = torch.einsum("goct,gc->got", by_group, values.reshape(groups, per_group))
    return kernel.reshape(out_channels, 1, *weight.shape[2:])
