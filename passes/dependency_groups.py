"""DependencyGroups: which channels must be removed together, from the op-rule table alone.

Labels flow through the graph in topological order, each node's rule saying how (fxsparse.rules); the channel
algebra (fxsparse.channels) then joins them into removable units and groups. A node without a rule, or whose rule
cannot follow it, is a barrier: its channels are fixed and the report names it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxsparse.channels import PRODUCE, ChannelAnalysis, ChannelGraph
from fxsparse.context import CompileContext
from fxsparse.pass_manager import Pass
from fxsparse.rules import rule_for
from fxsparse.rules.base import RuleContext, _flat_labels, op_name, opaque_like


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
    """What DependencyGroups leaves in ``ctx.facts["groups"]``."""

    analysis: ChannelAnalysis
    node_labels: dict[str, Any]
    groups: list[Group]
    fixed_members: int

    @property
    def graph(self) -> ChannelGraph:
        return self.analysis.graph


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


def _group_kind(analysis: ChannelAnalysis, space_ids: set[int]) -> str:
    kinds = {analysis.graph.spaces[s].kind for s in space_ids}
    if "outer" in kinds:
        return "heads/groups"
    if "inner" in kinds:
        return "per-head dims"
    return "channels"


def build_groups(analysis: ChannelAnalysis) -> list[Group]:
    graph = analysis.graph
    space_of = torch.empty(analysis.n_labels, dtype=torch.long)
    for index, space in enumerate(graph.spaces):
        space_of[space.start: space.start + space.size] = index
    by_group: dict[int, list[int]] = defaultdict(list)
    for unit, group in zip(analysis.units.tolist(), analysis.unit_group.tolist()):
        by_group[group].append(unit)
    spaces_by_group: dict[int, set[int]] = defaultdict(set)
    for index, group in enumerate(analysis.space_group.tolist()):
        spaces_by_group[group].add(index)
    # which groups each member touches: its own labels' group, and for factored labels their factors' groups
    member_groups: dict[int, list[tuple[str, int]]] = defaultdict(list)
    producer_groups: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for member in graph.members.values():
        labels = member.labels
        touched = set(analysis.space_group[space_of[labels]].tolist())
        factored = analysis.factor_of[labels]
        factored = factored[factored[:, 0] >= 0]
        if len(factored):
            touched |= set(analysis.space_group[space_of[factored.flatten()]].tolist())
        for g in touched:
            if g in by_group:
                member_groups[g].append((member.target, member.dim))
                if PRODUCE in member.roles:
                    producer_groups[g].append((member.target, member.dim))
    groups = []
    for gid, (group, units) in enumerate(sorted(by_group.items(), key=lambda kv: min(kv[1]))):
        groups.append(Group(gid, _group_kind(analysis, spaces_by_group[group]), torch.tensor(units),
                            member_groups[group], producer_groups[group]))
    return groups


def analyse_channels(gm: fx.GraphModule) -> ChannelFacts:
    graph, env = propagate_labels(gm)
    analysis = graph.analyse()
    groups = build_groups(analysis)
    fixed = sum(1 for m in graph.members.values() if bool(analysis.fixed_component[analysis.component[m.labels]].all()))
    return ChannelFacts(analysis, {n.name: labels for n, labels in env.items()}, groups, fixed)


class DependencyGroups(Pass):
    """Groups of channels that must be removed together, and the barriers that stop pruning."""

    name = "DependencyGroups"
    requires = ("shapes",)
    provides = ("groups",)

    def __init__(self, show: int = 20):
        self.show = show

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        facts = analyse_channels(ctx.module)
        ctx.facts["groups"] = facts
        self._facts = facts
        rows = []
        for group in sorted(facts.groups, key=lambda g: -g.size):
            names = [f"{t}[{d}]" for t, d in group.members]
            rows.append({
                "group": group.id,
                "kind": group.kind,
                "units": group.size,
                "members": len(names),
                "producers": ", ".join(f"{t}[{d}]" for t, d in group.producers[:3])
                + (" ..." if len(group.producers) > 3 else ""),
            })
        for barrier in facts.graph.barriers:
            rows.append({"group": "barrier", "kind": barrier.op, "units": 0, "members": 0,
                         "producers": f"{barrier.node}: {barrier.reason}"})
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        facts = self._facts
        kinds = Counter(g.kind for g in facts.groups)
        text = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no"
        return f"{len(facts.groups)} prunable groups ({text}); {len(facts.graph.barriers)} barriers"
