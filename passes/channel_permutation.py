"""ChannelPermutation: reorder channels so that N:M sparsity of their consumers keeps more of the large weights.

For every group of channels that can be reordered (fxsparse.analysis, REORDER), the weights that will be N:M
sparsified along those channels (the *consumers*: the input dimension of Linear and Conv weights) are stacked row
by row, and fxsparse.permutation searches an order of the channels that keeps more magnitude after N:M pruning of
all of them together. The order is applied by the one index-map rewrite: every member of the group moves with it
(the producing layer's rows, BatchNorm statistics, biases, residual partners, heads), so no output changes, which
the pass manager verifies.

A group is searched in *domains*: channels that every tensor of the model holds alike (a concatenation's two halves
are different domains: a channel may only move within its half). A domain is searched when each of its consumers
holds it as one block of whole N:M groups; the report says why the others were left alone.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fxsparse.analysis import ChannelFacts, reorder_domains
from fxsparse.channels import CONSUME, REORDER
from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError
from fxsparse.graph_utils import get_attr_value
from fxsparse.index_map import IndexMap
from fxsparse.copying import copy_sharing_tensors
from fxsparse.pass_manager import Pass
from fxsparse.permutation import search_permutation
from fxsparse.rewrite import reindex


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4)."""
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise BadArgumentError(f"pattern must be 'N:M' with 0 < N < M, e.g. '2:4', not {pattern!r}")
    return n, m


def consumer_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` as [rows, channels] with the consumed dim last: apex's layout, where a conv's output channels and
    kernel positions are all rows, and N:M groups run along the input channels."""
    return weight.detach().movedim(dim, -1).reshape(-1, weight.shape[dim])


class ChannelPermutation(Pass):
    """Reorder channels so that ``pattern`` (N:M) sparsity of their consumers keeps the most magnitude.

    ``consumers``: name prefixes of the weights that will be N:M sparsified (default: every Linear or Conv weight
    whose input dimension splits into groups of M). ``seed`` and ``kicks`` set the search (see
    fxsparse.permutation.search_permutation); the same seed gives the same permutation.
    """

    name = "ChannelPermutation"
    requires = ("groups",)
    rewrites = True

    def __init__(self, pattern: str = "2:4", consumers: Sequence[str] | None = None, seed: int = 0,
                 kicks: int | None = None):
        self.pattern = pattern
        self.n, self.m = parse_nm(pattern)
        if isinstance(consumers, str):
            consumers = [consumers]
        self.consumers = list(consumers) if consumers is not None else None
        self.seed, self.kicks = seed, kicks

    def settings(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "consumers": self.consumers, "seed": self.seed, "kicks": self.kicks}

    def _is_consumer(self, module, member) -> bool:
        """A weight dim that reads channels and will be N:M sparsified along them."""
        if CONSUME not in member.roles:
            return False
        if self.consumers is not None and not any(member.target.startswith(p) for p in self.consumers):
            return False
        shape = get_attr_value(module, member.target).shape
        return len(shape) >= 2 and shape[member.dim] % self.m == 0

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        facts: ChannelFacts = ctx.facts["groups"]
        analysis = facts.analysis
        comp = analysis.component
        groups = facts.groups_for(REORDER)
        consumers = [m for m in facts.graph.members.values() if self._is_consumer(ctx.module, m)]
        all_units = torch.cat([g.units for g in groups]) if groups else torch.empty(0, dtype=torch.long)
        domain_of = dict(zip(all_units.tolist(), reorder_domains(facts, all_units).tolist()))
        slots, sources, rows = [], [], []
        totals = [0.0, 0.0, 0.0]
        for group in groups:
            by_domain: dict[int, list[int]] = {}
            for unit in group.units.tolist():
                by_domain.setdefault(domain_of[unit], []).append(unit)
            for units in by_domain.values():
                row, order = self._search_domain(ctx.module, comp, consumers, torch.tensor(units), group.id)
                rows.append(row)
                if order is not None:
                    slots.append(order[0])
                    sources.append(order[1])
                    totals = [t + row[k] for t, k in zip(totals, ("kept before", "kept after", "bound"))]
        if slots:
            index_map = IndexMap.permutation(analysis, torch.cat(slots), torch.cat(sources))
            ctx.module, _ = reindex(ctx.module, facts, index_map, ctx.args, ctx.kwargs, ctx.plan)
        else:  # nothing to move: still a new module, as the pass manager requires of a rewrite
            ctx.module = copy_sharing_tensors(ctx.module)
        searched = [r for r in rows if "efficacy" in r]
        gap = totals[2] - totals[0]
        efficacy = (totals[1] - totals[0]) / gap if gap > 0 else 0.0
        self._summary = (f"{len(slots)} of {len(rows)} channel domains permuted for {self.pattern}; magnitude kept "
                         f"{totals[0]:.4g} -> {totals[1]:.4g} (bound {totals[2]:.4g}, efficacy {efficacy:.1%})"
                         if searched else f"no channel domain has an {self.pattern} consumer")
        return rows

    def _search_domain(self, module, comp, consumers, units: torch.Tensor, group_id: int):
        """(report row, (slots, sources) or None) for one domain of a group."""
        base = {"group": group_id, "channels": len(units)}
        unit_flag = torch.zeros(len(comp), dtype=torch.bool)
        unit_flag[units] = True
        blocks, names, order = [], [], None
        for member in consumers:
            roots = comp[member.labels]
            positions = torch.nonzero(unit_flag[roots]).flatten()
            if not len(positions):
                continue
            held = roots[positions]
            start, length = int(positions[0]), len(positions)
            contiguous = int(positions[-1]) - start + 1 == length and length == len(units)
            if not contiguous or start % self.m or length % self.m or len(torch.unique(held)) != length:
                return {**base, "result": f"kept: {member.target} does not read these channels as one block of "
                                          f"whole {self.pattern} groups"}, None
            if order is None:
                order = held
            elif not torch.equal(held, order):
                return {**base, "result": f"kept: {member.target} reads these channels in another order"}, None
            weight = get_attr_value(module, member.target)
            blocks.append(consumer_matrix(weight, member.dim)[:, start: start + length])
            names.append(member.target)
        if not blocks:
            return {**base, "result": f"kept: no {self.pattern} consumer reads these channels"}, None
        result = search_permutation(torch.cat(blocks), self.n, self.m, self.seed, self.kicks)
        row = {**base, "consumers": ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""),
               "kept before": round(result.kept_before, 4), "kept after": round(result.kept_after, 4),
               "bound": round(result.bound, 4), "efficacy": f"{result.efficacy:.1%}"}
        if result.kept_after <= result.kept_before:
            return {**row, "result": "kept: no better order found"}, None
        return {**row, "result": "permuted"}, (order, order[result.permutation])

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
