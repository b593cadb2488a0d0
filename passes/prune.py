"""Prune: decide which units of channels to remove, by importance, and hand them to Shrink.

Options follow Torch-Pruning and msModelSlim: a ratio (fraction of units removed) per group (``scope="local"``)
or ranked across groups (``scope="global"``, each group capped so none is emptied), per-group overrides
(``ratios``), groups left alone (``ignore``), kept counts rounded (``round_to``), whole attention heads or not
(``prune_heads``), and iterative pruning (``steps``) that re-scores after each shrink.

The decision is turned into masks on the weights that produce the removed channels, and that masked model is the
reference Shrink reproduces exactly.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError
from fxsparse.importance import Importance, resolve_importance, unit_scores
from fxsparse.masks import apply_masks, masks_for_units
from fxsparse.pass_manager import Pass
from fxsparse.removal import Removal

KIND_OPTION = {"heads/groups": "prune_heads", "per-head dims": "prune_head_dims"}


def _check_ratio(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise BadArgumentError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _check_prefix(option: str, prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise BadArgumentError(f"{option}: {prefix!r} is not a parameter-name prefix (a str such as 'layer4')")
    return prefix


def _check_calibration(calibration: Any) -> list | None:
    """The calibration batches as a list of ``(inputs, targets)`` pairs; anything else is a BadArgumentError."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, str, dict)) or not isinstance(calibration, Iterable):
        raise BadArgumentError(f"calibration must be a list of (inputs, targets) pairs, "
                               f"not {type(calibration).__name__}")
    batches = list(calibration)
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise BadArgumentError(f"calibration[{index}] must be an (inputs, targets) pair, not "
                                   f"{type(batch).__name__}{length}")
    if not batches:
        raise BadArgumentError("calibration is empty: give at least one (inputs, targets) pair")
    return batches


class Prune(Pass):
    """Remove ``ratio`` of the channels (units) of each prunable group, least important first."""

    name = "Prune"
    requires = ("groups",)
    provides = ("removal",)
    needs_values = True

    def __init__(
        self,
        ratio: float = 0.5,
        importance: str | Importance | Callable = "l2",
        scope: str = "local",
        ratios: dict[str, float] | None = None,
        ignore: Sequence[str] = (),
        round_to: int | None = None,
        prune_heads: bool = True,
        prune_head_dims: bool = False,
        steps: int = 1,
        max_group_ratio: float = 0.9,
        calibration: Iterable | None = None,
        loss_fn: Callable | None = None,
        step: int | None = None,
    ):
        self.ratio = _check_ratio("ratio", ratio)
        self.importance = resolve_importance(importance)
        if scope not in ("local", "global"):
            raise BadArgumentError(f"scope must be 'local' or 'global', not {scope!r}")
        self.scope = scope
        if ratios is not None and not isinstance(ratios, dict):
            raise BadArgumentError(f"ratios must be a dict of parameter-name prefix -> ratio, e.g. "
                                   f"{{'layer4': 0.7}}, not {type(ratios).__name__} {ratios!r}")
        self.ratios = {_check_prefix("ratios", k): _check_ratio(f"ratios[{k!r}]", v) for k, v in (ratios or {}).items()}
        if isinstance(ignore, str):
            ignore = [ignore]
        if not isinstance(ignore, (list, tuple, set)):
            raise BadArgumentError(f"ignore must be a list of parameter-name prefixes, e.g. ['fc'], "
                                   f"not {type(ignore).__name__} {ignore!r}")
        self.ignore = [_check_prefix("ignore", prefix) for prefix in ignore]
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise BadArgumentError(f"round_to must be a positive int, got {round_to!r}")
        self.round_to = round_to
        self.prune_heads, self.prune_head_dims = bool(prune_heads), bool(prune_head_dims)
        if not isinstance(steps, int) or steps < 1:
            raise BadArgumentError(f"steps must be a positive int, got {steps!r}")
        self.steps = steps
        self.max_group_ratio = _check_ratio("max_group_ratio", max_group_ratio)
        self.calibration = _check_calibration(calibration)
        if loss_fn is not None and not callable(loss_fn):
            raise BadArgumentError(f"loss_fn must be a callable loss_fn(outputs, targets), not {loss_fn!r}")
        self.loss_fn = loss_fn
        if self.importance.needs_gradients and (self.calibration is None or loss_fn is None):
            raise BadArgumentError(
                f"importance={self.importance.name!r} needs calibration=[(inputs, targets), ...] and "
                f"loss_fn=lambda outputs, targets: ... to compute gradients")
        self.step = step  # internal: this pass is step k of `steps`

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "importance": self.importance.name, "scope": self.scope, "ratios": self.ratios,
                "ignore": self.ignore, "round_to": self.round_to, "prune_heads": self.prune_heads,
                "prune_head_dims": self.prune_head_dims, "steps": self.steps, "step": self.step,
                "max_group_ratio": self.max_group_ratio}

    def expand(self) -> list[Pass]:
        """``steps=K`` becomes K prune steps, each followed by a shrink (the last one's is the user's)."""
        if self.steps == 1 or self.step is not None:
            return [self]
        from fxsparse.passes import PASSES  # the public registry, not Shrink's internals

        expanded: list[Pass] = []
        for k in range(1, self.steps + 1):
            step = Prune.__new__(Prune)
            step.__dict__.update(self.__dict__)
            step.step = k
            expanded.append(step)
            if k < self.steps:
                expanded.append(PASSES["Shrink"]())
        return expanded

    # -- the decision -----------------------------------------------------------------------------------------
    def _group_ratio(self, group) -> float | None:
        """The ratio for ``group``, or None when the group is left alone."""
        names = [t for t, _ in group.members]
        if any(name.startswith(prefix) for prefix in self.ignore for name in names):
            return None
        option = KIND_OPTION.get(group.kind)
        if option is not None and not getattr(self, option):
            return None
        for prefix, ratio in self.ratios.items():
            if any(t.startswith(prefix) for t, _ in group.producers):
                return ratio
        return self.ratio

    def _original_units(self, ctx: CompileContext, group) -> int:
        """How many units this group had before the first prune step (steps shrink the model in between).

        Read from a member the traced model already had: its producers first, then any other (the q, k and v
        projections of a lowered nn.MultiheadAttention are made by the compile, its output projection is not)."""
        shapes = ctx.facts["groups"].graph.member_shapes
        for target, dim in group.producers + group.members:
            before, now = ctx.plan.shapes_before.get(target), shapes.get(target)
            if before is not None and now is not None and now[dim] != 0:
                return round(group.size * before[dim] / now[dim])
        return group.size

    def _removal_count(self, ctx: CompileContext, group, ratio: float) -> int:
        k, steps = (self.step or 1), self.steps
        original = self._original_units(ctx, group)
        kept = original * (1.0 - ratio * k / steps)
        kept = math.ceil(kept - 1e-9)
        if self.round_to and group.kind == "channels":
            kept = max(self.round_to, math.ceil(kept / self.round_to) * self.round_to)
        kept = max(kept, 1, math.ceil(group.size * (1.0 - self.max_group_ratio)))
        return max(0, group.size - kept)

    def _gradients(self, ctx: CompileContext) -> dict[str, torch.Tensor] | None:
        if not self.importance.needs_gradients:
            return None
        module = ctx.module
        module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for batch in self.calibration:
                inputs, targets = batch
                if isinstance(inputs, dict):
                    outputs = module(**inputs)
                else:
                    outputs = module(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
                self.loss_fn(outputs, targets).backward()
        grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return grads

    def _check_prefixes_known(self, ctx: CompileContext) -> None:
        """Every prefix in ``ratios`` and ``ignore`` must start some parameter's name: a misspelt one would
        otherwise change nothing, silently."""
        names = list(ctx.module.state_dict())
        for option, prefixes in (("ratios", list(self.ratios)), ("ignore", self.ignore)):
            for prefix in prefixes:
                if any(name.startswith(prefix) for name in names):
                    continue
                candidates = sorted({".".join(name.split(".")[:k]) for name in names
                                     for k in range(1, name.count(".") + 2)})
                close = difflib.get_close_matches(prefix, candidates, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise BadArgumentError(f"{option}: no parameter of the model starts with {prefix!r}{hint}")

    def decide(self, ctx: CompileContext) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        self._check_prefixes_known(ctx)
        facts = ctx.facts["groups"]
        analysis = facts.analysis
        scores = unit_scores(analysis, ctx.module, self.importance, self._gradients(ctx))
        position = {int(u): i for i, u in enumerate(analysis.units.tolist())}
        plans = []  # (group, ratio, unit scores)
        for group in facts.groups:
            ratio = self._group_ratio(group)
            if ratio is None or ratio == 0.0:
                continue
            index = torch.tensor([position[int(u)] for u in group.units.tolist()], dtype=torch.long)
            plans.append((group, ratio, scores[index]))
        chosen = self._choose_global(ctx, plans) if self.scope == "global" else self._choose_local(ctx, plans)
        rows = []
        removed = []
        for group, units in chosen:
            removed.append(units)
            rows.append({"group": group.id, "kind": group.kind, "units": group.size, "removed": len(units),
                         "producers": ", ".join(f"{t}[{d}]" for t, d in group.producers[:2])
                         + (" ..." if len(group.producers) > 2 else "")})
        units = torch.cat(removed) if removed else torch.empty(0, dtype=torch.long)
        return units, rows

    def _choose_local(self, ctx, plans):
        chosen = []
        for group, ratio, scores in plans:
            count = self._removal_count(ctx, group, ratio)
            if count:
                chosen.append((group, group.units[torch.argsort(scores)[:count]]))
        return chosen

    def _choose_global(self, ctx, plans):
        """Rank every candidate unit by its group-normalised score; remove the lowest until ``ratio`` of all units
        are gone, taking from no group more than ``max_group_ratio`` (and never its last unit)."""
        if not plans:
            return []
        normalised = [self.importance.finalize(scores) for _, _, scores in plans]
        flat = torch.cat(normalised)
        owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(normalised)])
        total = sum(self._removal_count(ctx, group, ratio) for group, ratio, _ in plans)
        caps = [max(0, min(group.size - 1, math.floor(group.size * self.max_group_ratio))) for group, _, _ in plans]
        taken = [0] * len(plans)
        picks: list[list[int]] = [[] for _ in plans]
        for flat_index in torch.argsort(flat).tolist():
            if sum(taken) >= total:
                break
            i = int(owner[flat_index])
            if taken[i] >= caps[i]:
                continue
            offset = flat_index - sum(len(s) for s in normalised[:i])
            picks[i].append(offset)
            taken[i] += 1
        return [(plans[i][0], plans[i][0].units[torch.tensor(p, dtype=torch.long)]) for i, p in enumerate(picks) if p]

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        units, rows = self.decide(ctx)
        # in place: the compile's private module gets masked tensors in place of its own (the user's are never
        # written), and no rewrite is in progress whose reference it would be
        masks = masks_for_units(ctx.facts["groups"].analysis, units, broadcast=True)
        ctx.module = apply_masks(ctx.module, masks, in_place=True)
        ctx.facts["removal"] = Removal(units, f"Prune({self.importance.name}, {self.scope})")
        step = f" (step {self.step}/{self.steps})" if self.steps > 1 else ""
        self._summary = f"{len(units)} units chosen in {len(rows)} groups by {self.importance.name}{step}"
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
