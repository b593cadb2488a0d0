"""ExpandWidth: make a model wider without changing what it computes (Net2Net's idea, with LEMON's split).

Every unit of every group that can be repeated (fxsparse.analysis, REPEAT) becomes several copies through the one
index-map rewrite (fxsparse.rewrite.reindex): the layers that *make* the channel get identical copies of its rows,
and the layers that *read* it get copies of its columns scaled by each copy's share, the shares of one unit summing
to one. So every sum over the copies equals the old sum over the unit, and the output is unchanged at the moment of
growth. With ``split="lemon"`` the shares are unequal (drawn in [0.25, 0.75], then normalised), so the copies get
different gradients from the first step and drift apart; with ``split="even"`` they stay interchangeable until
something else breaks the symmetry.

Heads grow as whole heads (their per-head dims come along), GQA key/value groups with their query heads, conv groups
and depthwise convolutions keep their kind, an embedding's width grows with the residual it feeds.

A LayerNorm or RMSNorm over a width (``graph.uniform``) lets it grow only when every channel of it gets the same
number of copies. Its statistics are averages over the channels: the mean ``sum(x) / C`` becomes
``k * sum(x) / (k * C)`` when each value appears ``k`` times, and the variance (an average of ``(x - mean)**2``) the
same, so the normalised values are the old ones, each ``k`` times. A group with a width that no equal repeat reaches
(a target that is no multiple of it) is left alone, and the report says so.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from fxsparse.analysis import ChannelFacts, Group, analyse_channels
from fxsparse.channels import REPEAT
from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError
from fxsparse.index_map import IndexMap
from fxsparse.copying import copy_sharing_tensors
from fxsparse.pass_manager import Pass
from fxsparse.rewrite import reindex
from fxsparse.shapes import propagate_shapes
from fxsparse.trace import prepare_model, trace_module

KINDS = ("channels", "heads/groups", "per-head dims")
SPLITS = ("lemon", "even")
LEMON_RANGE = (0.25, 0.75)


def _prefixes(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise BadArgumentError(f"{name} must be parameter-name prefixes (strings), got {value!r}")
    return list(value)


def copies_per_unit(n_units: int, target: int) -> torch.Tensor:
    """How many copies each of ``n_units`` units gets so that they total ``target``: as equal as possible, the
    extra copies spread evenly over the group."""
    base, extra = divmod(target, n_units)
    copies = torch.full((n_units,), base, dtype=torch.long)
    if extra:
        copies[(torch.arange(extra) * n_units) // extra] += 1
    return copies


def shares(copies: torch.Tensor, split: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Each unit's copies' shares of what it contributes downstream (summing to one)."""
    out = []
    for k in copies.tolist():
        if split == "even" or k == 1:
            out.append(torch.full((k,), 1.0 / k, dtype=torch.float64))
        else:
            low, high = LEMON_RANGE
            draw = low + (high - low) * torch.rand(k, generator=generator, dtype=torch.float64)
            out.append(draw / draw.sum())
    return [s.float() for s in out]


class ExpandWidth(Pass):
    """Repeat every unit of every expandable group ``factor`` times, keeping the model's function.

    ``factor``: copies per unit (an int, or a float >= 1: the group's new width is ``round(units * factor)``,
    copies spread as evenly as possible). ``like``: a module of the same architecture at the widths to grow to (for
    instance the model before it was cut): each group grows to its width there, never beyond ``units * factor``
    (``factor=None``: no cap), never shrinks. ``kinds``: which group kinds grow ("channels", "heads/groups",
    "per-head dims"). ``include`` / ``exclude``: parameter-name prefixes; a group grows when one of its tensors
    matches ``include`` (default: every group) and none matches ``exclude``. ``split``: "lemon" (unequal shares, the
    copies diverge when trained) or "even"; ``seed`` makes the shares reproducible.
    """

    name = "ExpandWidth"
    requires = ("groups",)
    rewrites = True

    def __init__(self, factor: float | None = 2, kinds: Sequence[str] = ("channels", "heads/groups"),
                 include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                 split: str = "lemon", seed: int = 0, like: torch.nn.Module | None = None):
        if factor is None and like is None:
            raise BadArgumentError("factor=None needs like= (the module whose widths to grow to)")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
            raise BadArgumentError(f"factor must be a number >= 1 (copies per unit), got {factor!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise BadArgumentError(f"kinds: unknown group kind {unknown[0]!r}; known kinds: {list(KINDS)}")
        if split not in SPLITS:
            raise BadArgumentError(f"split must be one of {list(SPLITS)}, not {split!r}")
        if like is not None and not isinstance(like, torch.nn.Module):
            raise BadArgumentError(f"like must be an nn.Module, not {type(like).__name__}")
        self.factor, self.kinds, self.split, self.seed, self.like = factor, kinds, split, seed, like
        self.include, self.exclude = _prefixes(include, "include"), _prefixes(exclude, "exclude")

    def settings(self) -> dict[str, Any]:
        return {"factor": self.factor, "kinds": list(self.kinds), "include": self.include, "exclude": self.exclude,
                "split": self.split, "seed": self.seed, "like": type(self.like).__name__ if self.like else None}

    # -- which groups, how wide ----------------------------------------------------------------------------------
    def _skip_reason(self, group: Group) -> str | None:
        names = [t for t, _ in group.members]
        if group.kind not in self.kinds:
            return f"kept: kind {group.kind!r} not in kinds"
        if self.include is not None and not any(n.startswith(p) for n in names for p in self.include):
            return "kept: no tensor matches include"
        if self.exclude is not None and any(n.startswith(p) for n in names for p in self.exclude):
            return "kept: a tensor matches exclude"
        return None

    def _reference_widths(self, ctx: CompileContext) -> dict[tuple, list[int]]:
        """Unit counts of ``like``'s repeatable groups, by (kind, the tensor dims the group holds), in graph order."""
        traced = trace_module(prepare_model(self.like), ctx.args, ctx.kwargs, ctx.frontend, (), None)
        propagate_shapes(traced.module, ctx.args, ctx.kwargs)
        widths: dict[tuple, list[int]] = defaultdict(list)
        for group in analyse_channels(traced.module).groups_for(REPEAT):
            widths[_group_key(group)].append(group.size)
        return widths

    def _targets(self, ctx: CompileContext, groups: list[Group]) -> dict[int, int | str]:
        """New width of each group (or why it is left alone)."""
        reference = self._reference_widths(ctx) if self.like is not None else None
        targets: dict[int, int | str] = {}
        for group in groups:
            reason = self._skip_reason(group)
            if reason is not None:
                targets[group.id] = reason
                continue
            cap = round(group.size * self.factor) if self.factor is not None else None
            if reference is not None:
                sizes = reference.get(_group_key(group))
                if not sizes:
                    targets[group.id] = "kept: no group holding the same tensors in like"
                    continue
                target = sizes.pop(0) if cap is None else min(cap, sizes.pop(0))
            else:
                target = cap
            targets[group.id] = target if target > group.size else "kept: already as wide as asked"
        return targets

    # -- the pass ----------------------------------------------------------------------------------------------
    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        facts: ChannelFacts = ctx.facts["groups"]
        analysis = facts.analysis
        groups = facts.groups_for(REPEAT)
        targets = self._targets(ctx, groups)
        group_of_unit = {u: g.id for g in groups for u in g.units.tolist()}
        copies = {g.id: copies_per_unit(g.size, t) for g in groups if isinstance(t := targets[g.id], int)}
        for group_id, reason in self._uniform_conflicts(analysis, groups, copies, group_of_unit).items():
            copies.pop(group_id)
            targets[group_id] = reason
        rows = [{"group": g.id, "kind": g.kind, "units": f"{g.size} -> {int(copies[g.id].sum())}"
                 if g.id in copies else str(g.size), "tensors": len(g.members),
                 "result": f"grown x{int(copies[g.id].sum()) / g.size:g}" if g.id in copies else targets[g.id]}
                for g in groups]
        grown = [g for g in groups if g.id in copies]
        if grown:
            generator = torch.Generator().manual_seed(self.seed)
            units = torch.cat([g.units for g in grown])
            counts = torch.cat([copies[g.id] for g in grown])
            index_map = IndexMap.repeat(analysis, units, counts, shares(counts, self.split, generator))
            ctx.module, _ = reindex(ctx.module, facts, index_map, ctx.args, ctx.kwargs, ctx.plan)
        else:  # nothing to grow: still a new module, as the pass manager requires of a rewrite
            ctx.module = copy_sharing_tensors(ctx.module)
        before = sum(g.size for g in grown)
        after = sum(int(copies[g.id].sum()) for g in grown)
        self._summary = (f"{len(grown)} of {len(groups)} repeatable groups grown, {before} -> {after} units"
                         if groups else "no group of channels can be repeated")
        return rows

    @staticmethod
    def _uniform_conflicts(analysis, groups: list[Group], copies: dict[int, torch.Tensor],
                           group_of_unit: dict[int, int]) -> dict[int, str]:
        """Groups that would repeat the channels of a LayerNorm/RMSNorm unequally, and why they must stay."""
        comp = analysis.component
        count_of = {u: int(k) for g in groups if g.id in copies for u, k in zip(g.units.tolist(),
                                                                                   copies[g.id].tolist())}
        conflicts: dict[int, str] = {}
        for labels in analysis.graph.uniform:
            roots = torch.unique(comp[labels])
            factored = analysis.factor_of[labels]
            factored = factored[factored[:, 0] >= 0]
            roots = torch.unique(torch.cat([roots, comp[factored.flatten()]]))
            touched = {group_of_unit[r] for r in roots.tolist() if r in group_of_unit}
            touched = {g for g in touched if g in copies}
            if not touched:
                continue
            plain = roots[~analysis.derived_component[roots]].tolist()
            counts = {count_of.get(r, 1) for r in plain}
            if len(counts) > 1:
                for g in touched:
                    conflicts[g] = ("kept: a LayerNorm/RMSNorm over these channels needs every one repeated alike "
                                    "(a target that is a multiple of the width, and no fixed channel in it)")
        return conflicts

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")


def _group_key(group: Group) -> tuple:
    return group.kind, frozenset(group.members)
