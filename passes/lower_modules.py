"""LowerModules: modules the op-rule table cannot see into (nn.MultiheadAttention) rewritten as ops it can, so that
the channels inside them, attention heads and head dims, can be pruned (see fxsparse.lower).

``compile`` runs it first when a symbolic graph calls such a module, unless ``inplace=True`` or
``lower_modules=False``: a lowered module no longer maps onto the user's own module tree. It is a rewrite like any
other, so the lowered graph is verified against the traced one. The plan lists the lowered modules in
``plan.extra["lowered"]``.
"""
from __future__ import annotations

from typing import Any

from fxsparse.context import CompileContext
from fxsparse.lower import PARTS, lower_modules
from fxsparse.copying import copy_sharing_tensors
from fxsparse.pass_manager import Pass


class LowerModules(Pass):
    name = "LowerModules"
    requires = ("shapes",)  # the conditions read input ranks and mask dtypes
    rewrites = True

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        module = copy_sharing_tensors(ctx.module)  # node values are copied with the graph
        records = lower_modules(module)
        ctx.module = module
        lowered = [record.module for record in records if record.lowered]
        if lowered:
            ctx.plan.extra.setdefault("lowered", []).extend(lowered)
        kinds = ", ".join(sorted({record.kind for record in records}))
        self._summary = f"lowered {len(lowered)} of {len(records)} {kinds}"
        return [{"module": record.module, "kind": record.kind,
                 "result": f"lowered into {', '.join(PARTS)}" if record.lowered else f"kept whole: {record.why_not}"}
                for record in records]

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
