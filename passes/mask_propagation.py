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
from fxsparse.masks import apply_masks, check_mask_values, normalize_masks, zero_slices
from fxsparse.pass_manager import Pass
from fxsparse.removal import Removal


def removable_units(ctx: CompileContext, module: torch.nn.Module,
                    masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Units whose channels are zero in every member (forward or backward), and rows on the conflicts.

    Judged per unit over every label whose fate it decides (for a head: the rows of q, k and v of that head, the
    columns of the output projection), so a unit goes only when everything that goes with it is provably zero.
    A slice of a masked weight is zero where its mask is; a weight without a mask is read only at the channels
    some mask zeroes (the others cannot go anyway), which spares scanning a large model's unmasked weights.
    """
    facts = ctx.facts["groups"]
    analysis = facts.analysis
    graph = facts.graph
    comp = analysis.component
    n = analysis.n_labels
    flags = {key: torch.zeros(n, dtype=torch.bool) for key in
             ("has_prod", "bad_prod", "has_cons", "bad_cons", "any_zero")}
    members = [m for m in graph.members.values() if m.roles & {PRODUCE, CONSUME}]
    masked_zero = [zero_slices(masks[m.target], m.dim) if m.target in masks else None for m in members]
    for member, zero in zip(members, masked_zero):
        if zero is not None:
            flags["any_zero"][comp[member.labels][zero]] = True
    seen = []
    for member, zero in zip(members, masked_zero):
        roles = member.roles & {PRODUCE, CONSUME}
        roots = comp[member.labels]
        if zero is None:
            zero = _zero_where(get_attr_value(module, member.target), member.dim, flags["any_zero"][roots])
        seen.append((member, roots, zero))
        for role, has, bad in ((PRODUCE, "has_prod", "bad_prod"), (CONSUME, "has_cons", "bad_cons")):
            if role in roles:
                flags[has][roots] = True
                flags[bad][roots[~zero]] = True
    for labels in graph.unverifiable_producers:
        flags["bad_prod"][comp[labels]] = True
    for consumer in graph.consumers:
        if consumer.kind not in ("linear", "conv"):  # an activation reads it: never provably unused
            flags["bad_cons"][comp[consumer.labels]] = True
    per_unit = {key: analysis.dependents(flag) for key, flag in flags.items()}
    forward = per_unit["has_prod"] & ~per_unit["bad_prod"]
    backward = per_unit["has_cons"] & ~per_unit["bad_cons"]
    removable = forward | backward
    units = analysis.units
    chosen = units[removable]
    conflicts = units[per_unit["any_zero"] & ~removable]
    return chosen, _conflict_rows(conflicts, seen, analysis, facts.groups)


def _conflict_rows(conflicts: torch.Tensor, seen, analysis, groups) -> list[dict[str, Any]]:
    """One row per masked unit that stays: its group and index there (a channel, or a head), the first member that
    still produces it (so it is not zero going forward) and the first that still reads it (so it is not unused
    going backward)."""
    conflicting, ordered = analysis.flag(conflicts), sorted(conflicts.tolist())
    owners = _conflict_owners(ordered, conflicting, analysis)
    owned = analysis.flag(list(owners))
    blockers: dict[str, dict[int, str]] = {"produces": {}, "reads": {}}
    for member, roots, zero in seen:
        alive = roots[~zero]
        components = set(alive[owned[alive]].tolist())
        for verb, role in (("produces", PRODUCE), ("reads", CONSUME)):
            if role in member.roles and components:
                text, found = f"{member.target}[{member.dim}] still {verb} it", blockers[verb]
                for component in components:
                    for unit in owners[component]:
                        found.setdefault(unit, text)
    where = {}  # conflicting unit -> (its group, its index in the group)
    for group in groups:
        for index in torch.nonzero(conflicting[group.units]).flatten().tolist():
            where[int(group.units[index])] = (group.id, index)
    rows = []
    for unit in ordered:
        group_id, index = where.get(unit, ("-", unit))
        why = " and ".join(b[unit] for b in blockers.values() if unit in b) or "a coupled member is not zero there"
        rows.append({"group": group_id, "index": index, "resolution": "kept", "why": f"masked, but {why}"})
    return rows


def _conflict_owners(conflicts: list[int], conflicting: torch.Tensor, analysis) -> dict[int, list[int]]:
    """component -> the conflicting units whose fate it shares: its own, and for a derived component (a head's
    dimension, a factored label) the units of its factors, as ChannelAnalysis.dependents decides them."""
    owners: dict[int, list[int]] = {unit: [unit] for unit in conflicts}
    if not conflicts:
        return owners
    factored = torch.nonzero(analysis.factor_of[:, 0] >= 0).flatten()
    derived = analysis.component[factored]
    for column in (0, 1):
        units = analysis.component[analysis.factor_of[factored, column]]
        hit = conflicting[units]
        for component, unit in zip(derived[hit].tolist(), units[hit].tolist()):
            if unit not in owners.setdefault(component, []):
                owners[component].append(unit)
    return owners


def _zero_where(weight: torch.Tensor, dim: int, candidates: torch.Tensor) -> torch.Tensor:
    """Per index of ``dim``: is ``weight``'s slice zero? Read only where ``candidates``; elsewhere False."""
    zero = torch.zeros(len(candidates), dtype=torch.bool)
    if bool(candidates.any()):
        index = torch.nonzero(candidates).flatten()
        zero[index] = zero_slices(weight.index_select(dim, index), dim)
    return zero


class MaskPropagation(Pass):
    """Masks in, removable channels out (``ctx.facts["removal"]``); the masked model becomes the reference."""

    name = "MaskPropagation"
    requires = ("groups",)
    provides = ("removal",)
    needs_values = True

    def __init__(self, masks: dict[str, Any]):
        check_mask_values(masks)
        self.masks = masks

    def settings(self) -> dict[str, Any]:
        return {"masks": sorted(self.masks)}

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        masks = normalize_masks(self.masks, ctx.module)
        ctx.module = apply_masks(ctx.module, masks, in_place=True)  # the compile's own graph, not the user's model
        units, conflicts = removable_units(ctx, ctx.module, masks)
        ctx.facts["removal"] = Removal(units, "masks")
        self._stats = (len(masks), len(units), len(conflicts))
        removable = ctx.facts["groups"].analysis.flag(units)
        rows = []
        for group in ctx.facts["groups"].groups:
            removed = int(removable[group.units].sum())
            if removed:
                rows.append({"group": group.id, "kind": group.kind, "units": group.size, "removable": removed})
        return rows + conflicts

    def summary(self, rows: list[dict[str, Any]]) -> str:
        masks, units, conflicts = self._stats
        return f"{masks} masks -> {units} removable units; {conflicts} conflicts kept"
