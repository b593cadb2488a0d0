"""ShapeInference: every node gets a storage-free ``meta['val']`` (see fxsparse.shapes).

Graphs fresh from tracing already carry values (torch.export's, or those of the symbolic trace's input check,
see fxsparse.trace) and are reused as they are.
"""
from __future__ import annotations

from typing import Any

import torch

from fxsparse.context import CompileContext
from fxsparse.pass_manager import Pass
from fxsparse.shapes import propagate_shapes


class ShapeInference(Pass):
    name = "ShapeInference"
    provides = ("shapes",)

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        # Tracing left values on every node (torch.export's own, or the symbolic trace's input check); any
        # rewrite since then has dropped this fact.
        method = ctx.facts.get("traced_shapes") or propagate_shapes(ctx.module, ctx.args, ctx.kwargs)
        ctx.facts["shapes"] = method
        tensors = [n for n in ctx.module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self._summary = f"{len(tensors)} tensors shaped ({method})"
        return []

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
