"""ShapeInference: every node gets a storage-free ``meta['val']`` (see fxsparse.shapes).

Graphs fresh from torch.export already carry fake values and are reused as they are.
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
        if ctx.facts.get("export_values"):
            method = "export"  # torch.export left fake values on every node of the graph it just made
        else:
            method = propagate_shapes(ctx.module, ctx.args, ctx.kwargs)
        ctx.facts["shapes"] = method
        tensors = [n for n in ctx.module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self._summary = f"{len(tensors)} tensors shaped ({method})"
        return []

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
