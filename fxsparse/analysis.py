"""The channel analyses every structural pass shares: label propagation through the op-rule table, and the groups
of units it yields (what DependencyGroups reports, Prune scores, Shrink removes, ChannelPermutation reorders and
ExpandWidth repeats).

Labels flow through the graph in topological order, each node's rule saying how (fxsparse.rules); the channel
algebra (fxsparse.channels) then joins them into units and groups. A node without a rule, or whose rule cannot follow
it, is a barrier: its channels are fixed and the report names it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .channels import PRODUCE, REMOVE, ChannelAnalysis, ChannelGraph
from .rules import rule_for
from .rules.base import RuleContext, _flat_labels, opaque_like


@dataclass
class Group:
    """Channels of several tensors that are removed together, one unit at a time."""

    id: int
    kind: str  # "channels", "heads/groups" (outer factor), "per-head dims" (inner factor)
    units: torch.Tensor  # component roots, see ChannelAnalysis
    members: list[tuple[str, int]] = field(default_factory=list)
    producers: list[tuple[str, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class ChannelFacts:
    """What DependencyGroups leaves in ``ctx.facts["groups"]``. ``groups`` are the groups of removable units;
    ``groups_for(operation)`` gives those of units that can be reordered or repeated."""

    analysis: ChannelAnalysis
    node_labels: dict[str, Any]
    groups: list[Group]
    fixed_members: int
    _by_operation: dict[int, list[Group]] = field(default_factory=dict)

    @property
    def graph(self) -> ChannelGraph:
        return self.analysis.graph

    def groups_for(self, operation: int) -> list[Group]:
        """Groups of the units no fix blocks for ``operation`` (REMOVE, REORDER or REPEAT)."""
        if operation == REMOVE:
            return self.groups
        if operation not in self._by_operation:
            self._by_operation[operation] = build_groups(self.analysis, self.analysis.channel_units(
                operation=operation))
        return self._by_operation[operation]


def propagate_labels(gm: fx.GraphModule) -> tuple[ChannelGraph, dict[fx.Node, Any]]:
    """Run every node's rule in order; returns the channel graph and each node's output labels."""
    graph = ChannelGraph()
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = opaque_like(node)
            continue
        if node.op == "output":
            rc = RuleContext(node, gm, graph, env)
            fx.node.map_arg(node.args, lambda n: rc.fix_all(env.get(n)))
            continue
        rule = rule_for(node, gm)
        rc = RuleContext(node, gm, graph, env)
        if rule is None:
            if any(lab is not None for n in rc.tensor_args() for lab in _flat_labels(env.get(n))):
                env[node] = rc.barrier("no rule for this op")
            else:
                env[node] = opaque_like(node)
            continue
        try:
            env[node] = rule.labels(rc)
        except Exception as error:  # noqa: BLE001 - an op used in a way its rule cannot follow is a barrier
            env[node] = rc.barrier(f"rule {rule.name} cannot follow it ({type(error).__name__}: {error})"[:200])
    return graph, env


def build_groups(analysis: ChannelAnalysis, units: torch.Tensor | None = None) -> list[Group]:
    """The groups of ``units`` (default: the removable ones), with the parameter dimensions each touches (see
    ``_member_groups``)."""
    units = analysis.units if units is None else units
    if not len(units):
        return []
    unit_group = analysis.space_group[analysis.space_of[units]]
    order = torch.argsort(unit_group, stable=True)
    group_ids, counts = torch.unique_consecutive(unit_group[order], return_counts=True)
    units_by_group = dict(zip(group_ids.tolist(), torch.split(units[order], counts.tolist())))
    kinds = analysis.group_kinds()
    label_group = analysis.space_group[analysis.space_of]
    factors = _component_factors(analysis)
    members: dict[int, list[tuple[str, int]]] = defaultdict(list)
    producers: dict[int, list[tuple[str, int]]] = defaultdict(list)
    all_members = list(analysis.graph.members.values())
    for member, touched in zip(all_members, _member_groups(analysis, all_members, label_group, factors)):
        for group in touched:
            if group in units_by_group:
                members[group].append((member.target, member.dim))
                if PRODUCE in member.roles:
                    producers[group].append((member.target, member.dim))
    ordered = sorted(units_by_group.items(), key=lambda item: int(item[1].min()))
    return [Group(gid, kinds[group], units, members[group], producers[group])
            for gid, (group, units) in enumerate(ordered)]


def _component_factors(analysis: ChannelAnalysis) -> torch.Tensor:
    """Per label, the (outer, inner) labels its component is factored into, or (-1, -1)."""
    factored = torch.nonzero(analysis.factor_of[:, 0] >= 0).flatten()
    by_root = torch.full_like(analysis.factor_of, -1)
    by_root[analysis.component[factored]] = analysis.factor_of[factored]
    return by_root[analysis.component]


def _member_groups(analysis: ChannelAnalysis, members: list, label_group: torch.Tensor,
                   factors: torch.Tensor) -> list[list[int]]:
    """Per member, the groups whose units decide some of its labels: their own, and those of the factors their
    channels are made of (an output projection's columns are heads x head-dims), down to factors of factors.
    Found for all members at once, one level of factors at a time, over arrays of (member, component) pairs."""
    if not members:
        return []
    n, n_groups = analysis.n_labels, int(label_group.max()) + 1
    sizes = torch.tensor([len(member.labels) for member in members])
    owner = torch.repeat_interleave(torch.arange(len(members)), sizes)
    seen = frontier = torch.unique(owner * n + analysis.component[torch.cat([m.labels for m in members])])
    found = []
    while len(frontier):
        owner, comps = frontier // n, frontier % n
        found.append(owner * n_groups + label_group[comps])
        deeper = factors[comps].flatten()
        valid = deeper >= 0
        below = torch.unique(owner.repeat_interleave(2)[valid] * n + analysis.component[deeper[valid]])
        frontier = below[~torch.isin(below, seen)]
        seen = torch.cat([seen, frontier])
    touched: list[list[int]] = [[] for _ in members]
    for pair in torch.unique(torch.cat(found)).tolist():
        touched[pair // n_groups].append(pair % n_groups)
    return touched


def analyse_channels(gm: fx.GraphModule) -> ChannelFacts:
    graph, env = propagate_labels(gm)
    analysis = graph.analyse()
    groups = build_groups(analysis)
    fixed = sum(1 for m in graph.members.values() if bool(analysis.fixed_component[analysis.component[m.labels]].all()))
    return ChannelFacts(analysis, {n.name: labels for n, labels in env.items()}, groups, fixed)


def reorder_domains(facts: ChannelFacts, units: torch.Tensor) -> torch.Tensor:
    """A domain id per unit: units held by exactly the same tensors, the same number of times, share one, so
    swapping two of them is a re-indexing every tensor can follow."""
    analysis = facts.analysis
    comp, factor_of = analysis.component, analysis.factor_of
    factors = torch.full_like(factor_of, -1)
    factored = torch.nonzero(factor_of[:, 0] >= 0).flatten()
    factors[comp[factored]] = factor_of[factored]
    arrays = {id(m.labels): m.labels for m in facts.graph.members.values()}
    for labels in facts.node_labels.values():
        for array in _flat_labels(labels):
            arrays.setdefault(id(array), array)
    generator = torch.Generator().manual_seed(0)
    signature = torch.zeros(analysis.n_labels, dtype=torch.long)
    for array in arrays.values():
        weight = torch.randint(1, 2**62, (1,), generator=generator)
        roots = comp[array]
        for _ in range(16):  # a derived channel counts for its factors (a head-dim for its head), at any depth
            signature.index_add_(0, roots, weight.expand(len(roots)))
            pairs = factors[roots]
            pairs = pairs[pairs[:, 0] >= 0]
            if not len(pairs):
                break
            roots = comp[pairs.flatten()]
    _, domain = torch.unique(signature[units], return_inverse=True)
    return domain
