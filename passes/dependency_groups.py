"""DependencyGroups: which channels must be removed together, from the op-rule table alone.

The analysis itself is core (fxsparse.analysis), shared by every structural pass; this pass runs it, leaves the
facts in ``ctx.facts["groups"]`` and reports the groups and the barriers.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from fxsparse.analysis import ChannelFacts, Group, analyse_channels  # noqa: F401 - re-exported for users
from fxsparse.context import CompileContext
from fxsparse.pass_manager import Pass


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
        text = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else ""
        return f"{len(facts.groups)} prunable groups{text}; {len(facts.graph.barriers)} barriers"
