"""Exactness for removed channels that are not zero.

A removed channel whose producing weights are masked still carries whatever its bias, a BatchNorm shift or an
activation of zero puts there: a value that no longer depends on the input. Dropping it would change the model
(NNI's ModelSpeedup drifts exactly here), so its contribution is measured where it is consumed, on the masked
model, and kept: in the consumer's bias when it is the same everywhere, in a PaddedConstantCorrection when a
zero-padded convolution makes it vary at the borders. A contribution that can be kept neither way (a product of
two activations, a grouped convolution) means the channel stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .channels import ChannelAnalysis
from .graph_utils import placeholder_values
from .rules.layers import Consumer


@dataclass
class Fold:
    consumer: Consumer
    out_dim: int  # the consumer output's channel dim
    vector: torch.Tensor  # per (old) output channel: a constant to add to the bias
    correction: torch.Tensor | None = None  # folded kernel for a PaddedConstantCorrection
    conv_args: tuple | None = None  # (stride, padding, dilation)


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the evaluated arguments and output of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
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
    """(stride, padding, dilation, weight) of a non-transposed convolution node, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "transposed", False) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return m.stride, m.padding, m.dilation, m.weight
    get = lambda i, name, default=None: args[i] if i < len(args) else kwargs.get(name, default)  # noqa: E731
    if "convolution" in str(node.target):
        if get(6, "transposed"):
            return None
    padding = get(4, "padding", 0)
    if isinstance(padding, str):
        return None
    return get(3, "stride", 1), padding, get(5, "dilation", 1), get(1, "weight")


def _spread(t: torch.Tensor, keep_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index of ``keep_dim``: the value (first element) and max - min over all other dims."""
    moved = t.movedim(keep_dim, 0).reshape(t.shape[keep_dim], -1)
    return moved[:, 0], moved.max(dim=1).values - moved.min(dim=1).values


def settle_residues(
    gm: fx.GraphModule, analysis: ChannelAnalysis, consumers: list[Consumer], removed: torch.Tensor,
    args: tuple, kwargs: dict, node_labels: dict[str, Any], max_rounds: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, list[Fold], list[str]]:
    """Final (removed units, keep per label, folds, notes on channels kept back)."""
    notes: list[str] = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for _ in range(max_rounds):
        keep = analysis.keep_labels(removed)
        active = [c for c in consumers if not bool(keep[c.labels].all())]
        if not active:
            return removed, keep, [], notes
        capture = _Capture(gm, {c.node for c in active})
        with torch.no_grad():
            capture.run(*placeholder_values(gm, args, kwargs))
        folds, blocked = [], []
        for c in active:
            node = nodes[c.node]
            call_args, call_kwargs, output = capture.seen[c.node]
            fold, why = _measure(gm, node, c, keep, call_args, call_kwargs, output, node_labels)
            if fold is not None:
                folds.append(fold)
            elif why:
                blocked.append(c.labels[~keep[c.labels]])
                notes.append(f"{c.node}: {why}; its removed input channels are kept")
        if not blocked:
            return removed, keep, folds, notes
        removed = analysis.restore(removed, torch.cat(blocked))
    raise RuntimeError("removed channels' residues did not settle")


def _measure(gm, node, c: Consumer, keep, call_args, call_kwargs, output, node_labels):
    """(Fold or None, reason the channels must stay or None)."""
    x = call_args[c.input_index]
    removed_mask = _broadcast_mask((~keep[c.labels]).to(x.dtype), c.dim, x.dim())
    only_removed = list(call_args)
    only_removed[c.input_index] = x * removed_mask
    with torch.no_grad():
        if c.kind == "attention":
            q, k = only_removed[0], call_args[1]
            contribution = q @ k.transpose(-1, -2)
            across_keys = contribution.amax(-1) - contribution.amin(-1)
            scale = contribution.abs().max().item() + 1e-30
            if across_keys.abs().max().item() <= 1e-5 * max(scale, 1.0):
                return None, None  # constant over the keys: softmax cancels it
            return None, "removed head-dims add a key-dependent score"
        bias_index = c.bias_index if c.kind in ("linear", "conv") else None
        contribution = _call(gm, node, tuple(only_removed), call_kwargs, bias_index)
    scale = output.abs().max().item() if isinstance(output, torch.Tensor) else 1.0
    tol = 1e-6 * max(scale, 1e-6)
    if contribution.abs().max().item() <= tol:
        return None, None
    if c.kind in ("linear", "conv"):
        out_labels = node_labels[c.node]
        out_dim = len(out_labels) - 1 if c.kind == "linear" else c.dim
        value, spread = _spread(contribution, out_dim)
        if spread.max().item() <= 1e-5 * max(scale, 1e-6):
            return Fold(c, out_dim, value), None
        if c.kind == "conv":
            settings = _conv_settings(gm, node, call_args, call_kwargs)
            inputs_removed = x.index_select(c.dim, torch.nonzero(~keep[c.labels]).flatten())
            const, in_spread = _spread(inputs_removed, c.dim)
            if settings is not None and in_spread.max().item() <= 1e-6 * max(inputs_removed.abs().max().item(), 1e-6):
                stride, padding, dilation, weight = settings
                columns = weight.index_select(1, torch.nonzero(~keep[c.labels]).flatten())
                shape = [1, len(const)] + [1] * (weight.dim() - 2)
                kernel = (columns * const.reshape(shape)).sum(dim=1, keepdim=True)
                return Fold(c, out_dim, torch.zeros(weight.shape[0]), kernel.detach(), (stride, padding, dilation)), None
        return None, "removed channels contribute a position-dependent value"
    return None, f"removed channels contribute to a product of activations ({c.kind})"
