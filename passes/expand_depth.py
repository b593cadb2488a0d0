"""ExpandDepth: insert copies of repeated blocks that compute the identity at the moment of growth.

Runs of same-structure blocks are found on the graph (fxsparse.growth.blocks, networkx); each copy takes the
weights of the block it follows (a useful start) with its residual branches silenced (fxsparse.growth.identity),
so the grown model computes what the model before it did, and then trains: the zeroed projections get gradients
from the first step. ``placement="interleave"`` puts the copies after the blocks they copy, spread evenly over the
run; ``"stack"`` puts them all after the run's last block. A run whose blocks have no residual stream is reported
and left as it was. The plan records every copy (``plan.extra["growth"]``), and ``fxsparse.growth.apply_growth``
replays it on a fresh instance, so the grown weights load into it.
"""
from __future__ import annotations

from typing import Any, Sequence

from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError
from fxsparse.growth.blocks import blocks_of, child_path, find_block_runs
from fxsparse.growth.identity import NotGrowableError, analyse_block
from fxsparse.growth.insert import Copy, numbered_children, rearrange_children, rewire_graph
from fxsparse.growth.layout import layout_record, spread
from fxsparse.copying import copy_sharing_tensors
from fxsparse.pass_manager import Pass

PLACEMENTS = ("interleave", "stack")


class ExpandDepth(Pass):
    """Grow every run of ``L`` repeated blocks to ``round(L * factor)`` blocks, function-preserving."""

    name = "ExpandDepth"
    requires = ("shapes",)
    rewrites = True

    def __init__(self, factor: float = 2.0, placement: str = "interleave", containers: Sequence[str] | None = None,
                 min_run: int = 2):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1.0:
            raise BadArgumentError(f"factor must be a number above 1, got {factor!r}")
        if placement not in PLACEMENTS:
            raise BadArgumentError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
        if isinstance(containers, str):
            containers = [containers]
        if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 1:
            raise BadArgumentError(f"min_run must be a positive int, got {min_run!r}")
        self.factor, self.placement, self.min_run = float(factor), placement, min_run
        self.containers = list(containers) if containers is not None else None

    def settings(self) -> dict[str, Any]:
        return {"factor": self.factor, "placement": self.placement, "containers": self.containers,
                "min_run": self.min_run}

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        gm = copy_sharing_tensors(ctx.module)
        runs = find_block_runs(gm, self.min_run)
        if self.containers is not None:
            unknown = sorted(set(self.containers) - {run.container for run in runs})
            if unknown:
                found = sorted({run.container for run in runs})
                raise BadArgumentError(f"containers: no run of repeated blocks in {unknown}; runs were found in {found}")
            runs = [run for run in runs if run.container in self.containers]
        blocks = blocks_of(gm)
        rows: list[dict[str, Any]] = []
        for container, stem in dict.fromkeys((run.container, run.stem) for run in runs):
            children = sorted(numbered_children(gm.get_submodule(container), container)[1])
            copies_after: dict[int, list[Copy]] = {}
            analysed: dict[int, Any] = {}
            for run in (r for r in runs if (r.container, r.stem) == (container, stem)):
                row = {"container": container or "(model)", "run": f"{run.indices[0]}..{run.indices[-1]}",
                       "blocks": len(run.indices)}
                count = max(len(run.indices) + 1, round(len(run.indices) * self.factor))
                hosts = spread(run.indices, count - len(run.indices), self.placement)
                try:
                    for index in set(hosts):
                        analysed[index] = analyse_block(gm, blocks[run.paths()[run.indices.index(index)]])
                except NotGrowableError as error:
                    rows.append({**row, "after": len(run.indices), "kind": "", "zeroed": "",
                                 "status": f"not changed: {error}"})
                    continue
                recipe = analysed[hosts[0]].recipe
                for index in hosts:
                    copies_after.setdefault(index, []).append(Copy(index, recipe))
                rows.append({**row, "after": count, "kind": "post-norm" if recipe.post_norm else "pre-norm",
                             "zeroed": ", ".join(recipe.zero), "status": "grown"})
            if not copies_after:
                continue
            layout = [entry for index in children for entry in [index, *copies_after.get(index, [])]]
            rearrange_children(gm, container, layout)
            rewire_graph(gm, container, stem, layout, {i: blocks[child_path(container, stem, i)] for i in analysed},
                         {i: a.stream_input for i, a in analysed.items()})
            ctx.plan.extra.setdefault("growth", []).append(layout_record(container, len(children), layout))
        ctx.module = gm
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        grown = [r for r in rows if r["status"] == "grown"]
        added = sum(r["after"] - r["blocks"] for r in grown)
        return f"{len(grown)} of {len(rows)} runs grown, {added} blocks added ({self.placement})"
