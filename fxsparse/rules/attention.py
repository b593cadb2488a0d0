"""Rules for products of activations: matmul and its relatives, and scaled dot-product attention."""
from __future__ import annotations

import math

import torch.fx as fx

from fxsparse.channels import CONSUME, PRODUCE, REPEAT

from .base import NodeLabels, RewriteContext, Rule, RuleContext
from .elementwise import broadcast
from .layers import Consumer


def _tie_batch(rc: RuleContext, a: tuple, b: tuple, a_shape, b_shape) -> list:
    """Broadcast-tie the batch dims (all but the last two) of two matmul operands; returns the output's."""
    batch_a, batch_b = list(a[:-2]), list(b[:-2])
    sa, sb = list(a_shape[:-2]), list(b_shape[:-2])
    n = max(len(batch_a), len(batch_b))
    batch_a = [None] * (n - len(batch_a)) + batch_a
    batch_b = [None] * (n - len(batch_b)) + batch_b
    sa = [1] * (n - len(sa)) + sa
    sb = [1] * (n - len(sb)) + sb
    out = []
    for la, lb, za, zb in zip(batch_a, batch_b, sa, sb):
        if za == 1 and zb != 1:
            out.append(lb)
        elif zb == 1 and za != 1:
            out.append(la)
        else:
            out.append(rc.tie(la, lb))
    return out


class MatMul(Rule):
    """matmul / mm / bmm (``addmm`` and ``baddbmm`` with ``bias_index`` 0): the inner dims are contracted."""

    name = "matmul"

    def __init__(self, first: int = 0, bias_index: int | None = None):
        self.first, self.bias_index = first, bias_index

    def labels(self, rc: RuleContext) -> NodeLabels:
        a_node, b_node = rc.node.args[self.first], rc.node.args[self.first + 1]
        a, b = rc.labels_of(a_node), rc.labels_of(b_node)
        sa, sb = rc.shape_of(a_node), rc.shape_of(b_node)
        if len(a) == 1 or len(b) == 1:
            return rc.barrier("matrix-vector product")
        if b_node.op == "get_attr" and len(b) == 2:  # x @ W: a linear layer (HF's Conv1D exports as addmm)
            rc.tie(a[-1], rc.param(b_node.target, 0, CONSUME))
            out_channels = rc.param(b_node.target, 1, PRODUCE)
            if a[-1] is not None:
                rc.graph.consumers.append(Consumer(rc.node.name, "linear", self.first, len(a) - 1, a[-1],
                                                   bias_index=self.bias_index if self.bias_index is not None else -1))
            out = tuple(a[:-1]) + (out_channels,)
        else:
            rc.tie(a[-1], b[-2])
            rc.fix(a[-1], REPEAT)  # a sum over the products of two activations: copies would count twice
            if a[-1] is not None:
                rc.graph.consumers.append(Consumer(rc.node.name, "matmul", self.first, len(a) - 1, a[-1]))
            out = tuple(_tie_batch(rc, a, b, sa, sb)) + (a[-2], b[-1])
        if self.bias_index is not None:
            bias = rc.node.args[self.bias_index]
            if isinstance(bias, fx.Node):
                rc.env[rc.node] = out
                out = broadcast(rc, [bias, rc.node], rc.out_shape)
        return out


class ScaledDotProductAttention(Rule):
    """F.scaled_dot_product_attention: q, k, v of shape [..., heads, seq, dim].

    Heads of q, k and v are tied (with grouped-query attention, each key/value head with its group of query
    heads); q and k head-dims are tied and contracted; the output takes q's heads and v's head-dim. Removing
    head-dims changes the default scale 1/sqrt(E), so the rewrite pins the original scale.
    """

    name = "sdpa"

    def labels(self, rc: RuleContext) -> NodeLabels:
        q_node, k_node, v_node = rc.arg(0, "query"), rc.arg(1, "key"), rc.arg(2, "value")
        q, k, v = rc.labels_of(q_node), rc.labels_of(k_node), rc.labels_of(v_node)
        sq, sk = rc.shape_of(q_node), rc.shape_of(k_node)
        if len(q) < 3:
            return rc.barrier("attention without a head dim")
        rc.tie(q[-1], k[-1])
        rc.fix(q[-1], REPEAT)  # q.k sums over head dims: a copied dim would count twice (whole heads can be copied)
        if q[-1] is not None:
            rc.graph.consumers.append(Consumer(rc.node.name, "attention", 0, len(q) - 1, q[-1]))
        rc.tie(k[-2], v[-2])
        hq, hk = sq[-3], sk[-3]
        heads = q[-3]
        if hq == hk:
            heads = rc.tie(heads, k[-3])
        elif k[-3] is not None or heads is not None:
            rep = hq // hk
            if k[-3] is None or heads is None:
                rc.fix(k[-3] if k[-3] is not None else heads)
            else:
                rc.tie(heads, k[-3].repeat_interleave(rep))
        rc.tie(k[-3], v[-3])
        mask = rc.arg(3, "attn_mask")
        ms = rc.shape_of(mask)  # None also for a node holding None (a forward's attn_mask=None, traced)
        if ms is not None:
            if len(ms) >= 3 and ms[-3] != 1:
                heads = rc.tie(heads, rc.labels_of(mask)[-3])
        return tuple(q[:-3]) + (heads, q[-2], v[-1])

    def rewrite(self, wc: RewriteContext) -> None:
        q_node = wc.node.args[0]
        old_e, new_e = wc.old_shape(q_node)[-1], wc.new_shape(q_node)[-1]
        if old_e != new_e and wc.node.kwargs.get("scale") is None and len(wc.node.args) < 8:
            kwargs = dict(wc.node.kwargs)
            kwargs["scale"] = 1.0 / math.sqrt(old_e)
            wc.node.kwargs = kwargs


class Einsum(Rule):
    """einsum by its equation: dims sharing a letter are tied; letters missing from the output are contracted."""

    name = "einsum"

    def labels(self, rc: RuleContext) -> NodeLabels:
        equation = rc.node.args[0].replace(" ", "")
        operands = rc.node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        if "..." in equation or "->" not in equation:
            return rc.barrier("einsum with an ellipsis or an implicit output")
        inputs, output = equation.split("->")
        specs = inputs.split(",")
        by_letter: dict[str, object] = {}
        for spec, node in zip(specs, operands):
            labels, shape = rc.labels_of(node), rc.shape_of(node)
            for letter, lab, size in zip(spec, labels, shape):
                if size == 1:
                    rc.fix(lab)
                    continue
                by_letter[letter] = rc.tie(by_letter[letter], lab) if letter in by_letter else lab
        for letter, lab in by_letter.items():
            if letter not in output:
                rc.fix(lab, REPEAT)  # contracted between operands: copies would count twice
        for position, letter in enumerate(specs[0]):
            if letter not in output and by_letter.get(letter) is not None:
                rc.graph.consumers.append(
                    Consumer(rc.node.name, "einsum", 1, position, rc.labels_of(operands[0])[position]))
        return tuple(by_letter.get(letter) for letter in output)
