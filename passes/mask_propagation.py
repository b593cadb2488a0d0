"""MaskPropagation: from the masks users have to the channels that are structurally zero, by the rules alone.

Masks come as ``{parameter or module name: 0/1 tensor}`` (a full-shape mask, or a 1-D mask over output channels)
or in NNI's format ``{module: {"weight": mask, "bias": mask}}``. They are multiplied into a copy of the weights,
and that *masked model* becomes the reference every later rewrite must reproduce exactly.

A unit of channels is removable when, in every member of its group, it is provably zero:
forward, every weight that produces it has a zero slice there (its value no longer depends on the input: a bias
or a BatchNorm shift can still make it a constant, which Shrink folds into the consumers); or backward, every
weight that consumes it has a zero slice there (nothing reads it). Masks never come from running the model.
"""
from __future__ import annotations

from typing import Any

import torch

from fxsparse.channels import CONSUME, PRODUCE
from fxsparse.context import CompileContext
from fxsparse.graph_utils import get_attr_value
from fxsparse.masks import apply_masks, normalize_masks, zero_slices
from fxsparse.pass_manager import Pass
from fxsparse.removal import Removal


def removable_units(ctx: CompileContext, module: torch.nn.Module) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Units whose channels are zero in every member (forward or backward), and rows on the conflicts."""
    facts = ctx.facts["groups"]
    analysis = facts.analysis
    graph = facts.graph
    comp = analysis.component
    n = analysis.n_labels
    # per component: do all producers / consumers have a zero slice here? (True until a member says otherwise)
    all_prod_zero = torch.ones(n, dtype=torch.bool)
    all_cons_zero = torch.ones(n, dtype=torch.bool)
    has_prod = torch.zeros(n, dtype=torch.bool)
    has_cons = torch.zeros(n, dtype=torch.bool)
    any_zero = torch.zeros(n, dtype=torch.bool)
    seen = []
    for member in graph.members.values():
        roles = member.roles & {PRODUCE, CONSUME}
        if not roles:
            continue
        zero = zero_slices(get_attr_value(module, member.target), member.dim)
        roots = comp[member.labels]
        seen.append((member, roots, zero))
        any_zero[roots[zero]] = True
        if PRODUCE in roles:
            has_prod[roots] = True
            all_prod_zero.scatter_reduce_(0, roots, zero, reduce="amin")
        if CONSUME in roles:
            has_cons[roots] = True
            all_cons_zero.scatter_reduce_(0, roots, zero, reduce="amin")
    for labels in graph.unverifiable_producers:
        all_prod_zero[comp[labels]] = False
    for consumer in graph.consumers:
        if consumer.kind not in ("linear", "conv"):  # an activation reads it: never provably unused
            all_cons_zero[comp[consumer.labels]] = False
    forward = has_prod & all_prod_zero
    backward = has_cons & all_cons_zero
    allowed = forward | backward  # indexed by component root
    removable = allowed.clone()
    # a derived (factored) component goes when one of its factors does: a factor unit is removable only if every
    # derived component depending on it is allowed
    factored = torch.nonzero(analysis.factor_of[:, 0] >= 0).flatten()
    if len(factored):
        derived_ok = allowed[comp[factored]]
        for column in (0, 1):
            factor_roots = comp[analysis.factor_of[factored, column]]
            removable.scatter_reduce_(0, factor_roots, derived_ok, reduce="amin")
            any_zero[factor_roots[derived_ok]] = True
    units = analysis.units
    chosen = units[removable[units]]
    conflicts = set(units[any_zero[units] & ~removable[units]].tolist())
    blocker: dict[int, str] = {}
    for member, roots, zero in seen:
        for root in set(roots[~zero].tolist()) & conflicts - set(blocker):
            blocker[root] = f"{member.target}[{member.dim}]"
    rows = [{"unit": root, "resolution": "kept", "why": f"masked, but not zero in {blocker.get(root, 'a coupled member')}"}
            for root in sorted(conflicts)]
    return chosen, rows


class MaskPropagation(Pass):
    """Masks in, removable channels out (``ctx.facts["removal"]``); the masked model becomes the reference."""

    name = "MaskPropagation"
    requires = ("groups",)
    provides = ("removal",)

    def __init__(self, masks: dict[str, Any]):
        self.masks = masks

    def settings(self) -> dict[str, Any]:
        return {"masks": sorted(self.masks)}

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        masks = normalize_masks(self.masks, ctx.module)
        ctx.module = apply_masks(ctx.module, masks)
        units, conflicts = removable_units(ctx, ctx.module)
        ctx.facts["removal"] = Removal(units, "masks")
        self._stats = (len(masks), len(units), len(conflicts))
        rows = []
        for group in ctx.facts["groups"].groups:
            removed = int(torch.isin(group.units, units).sum())
            if removed:
                rows.append({"group": group.id, "kind": group.kind, "units": group.size, "removable": removed})
        return rows + conflicts

    def summary(self, rows: list[dict[str, Any]]) -> str:
        masks, units, conflicts = self._stats
        return f"{masks} masks -> {units} removable units; {conflicts} conflicts kept"
