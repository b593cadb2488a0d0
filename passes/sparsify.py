"""Sparsify: put an N:M or unstructured sparsity pattern on the weights of linear-like layers.

``Sparsify(pattern="2:4")`` keeps 2 of every 4 inputs of every eligible Linear, Conv and Hugging Face Conv1D
weight, along the input dimension with apex's layout rules (see :mod:`fxsparse.sparse.patterns`);
``transposable=True`` makes the masks N:M both ways; ``pattern="unstructured", sparsity=0.5`` removes half of
the entries per layer (``scope="local"``) or under one threshold for all layers (``scope="global"``). Which entries
stay is the criterion's choice (:data:`fxsparse.sparse.WEIGHT_CRITERIA`: "magnitude", and the calibration-aware
"wanda" and "sparsegpt", which take ``calibration=[example inputs, ...]``). A target the criterion cannot score
(for Wanda and SparseGPT: a transposed or 3-D convolution, or a convolution whose transposable blocks would span
kernel positions) gets a magnitude mask of the same pattern, first, and its report row and plan entry say
"magnitude" and why.

Shapes do not change: the new module has masked weights. It is verified against the *masked reference* (the
weights before this pass, or as the criterion updated them, multiplied by the masks), which checks that exactly the
masked entries changed and nothing else (a weight used twice is masked once, and stays one tensor). The report also
gives how far the outputs moved from the dense model's, which is the cost of the pattern, not an error.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from fxsparse.context import CompileContext
from fxsparse.errors import BadArgumentError, FxsparseError
from fxsparse.graph_utils import get_attr_value, set_attr_value
from fxsparse.copying import copy_sharing_tensors
from fxsparse.masks import apply_masks
from fxsparse.pass_manager import Pass
from fxsparse.sparse.criteria import Magnitude, resolve_criterion
from fxsparse.sparse.patterns import NM, parse_pattern
from fxsparse.sparse.targets import Eligibility, check_selectors, eligible, graph_targets, select
from fxsparse.verify import compare_outputs


def _layer_rows(targets, masks: dict[str, torch.Tensor], dense_module: torch.nn.Module, chosen_by: dict[str, str],
                notes: dict[str, str]) -> tuple[list[dict[str, Any]], float, float]:
    """A report row per weight (criterion, sparsity, fraction of its magnitude kept), and both over all of them."""
    rows, entries, kept_entries, magnitude, kept_magnitude = [], 0, 0, 0.0, 0.0
    for target in targets:
        keep, dense = masks[target.param], get_attr_value(dense_module, target.param).detach().abs()
        total, kept = dense.sum().item(), (dense * keep).sum().item()
        entries, kept_entries = entries + keep.numel(), kept_entries + int(keep.sum())
        magnitude, kept_magnitude = magnitude + total, kept_magnitude + kept
        rows.append({"weight": target.param, "layout": target.layout, "shape": "x".join(map(str, target.shape)),
                     "criterion": chosen_by[target.param], "sparsity": f"{1 - int(keep.sum()) / keep.numel():.3f}",
                     "magnitude kept": f"{kept / total:.3f}" if total else "n/a"})
        if target.param in notes:
            rows[-1]["note"] = notes[target.param]
    sparsity = 1 - kept_entries / entries if entries else 0.0
    return rows, sparsity, kept_magnitude / magnitude if magnitude else 1.0


def _tie(module: torch.nn.Module, targets) -> torch.nn.Module:
    """Every other name of a shared weight points at its one new tensor again (a shared weight stays shared)."""
    for target in targets:
        for alias in target.aliases:
            set_attr_value(module, alias, get_attr_value(module, target.param))
    return module


class Sparsify(Pass):
    """Masks of ``pattern`` on every eligible linear-like weight, chosen by ``criterion``."""

    name = "Sparsify"
    provides = ("sparsity",)
    rewrites = True
    preserves = ("shapes",)

    def __init__(
        self,
        pattern: str = "2:4",
        sparsity: float | None = None,
        criterion: Any = "magnitude",
        scope: str = "local",
        transposable: bool = False,
        include: Sequence[Any] = (),
        exclude: Sequence[Any] = (),
        eligible: Callable | None = None,
        calibration: Iterable | None = None,
    ):
        self.pattern = parse_pattern(pattern, sparsity, scope, transposable)
        self.criterion = resolve_criterion(criterion)
        self.criterion.check_pattern(self.pattern)
        self.include = [include] if isinstance(include, (str, type)) else list(include)
        self.exclude = [exclude] if isinstance(exclude, (str, type)) else list(exclude)
        check_selectors("include", self.include)
        check_selectors("exclude", self.exclude)
        if eligible is not None and not callable(eligible):
            raise BadArgumentError(f"eligible must be an Eligibility or a callable (target, pattern) -> reason, "
                                   f"not {eligible!r}")
        self.eligible = eligible or Eligibility()
        self.calibration = list(calibration) if calibration is not None else None
        if self.criterion.needs_calibration and not self.calibration:
            raise BadArgumentError(f"criterion={self.criterion.name!r} needs calibration=[example inputs, ...]")
        self._summary = ""

    def settings(self) -> dict[str, Any]:
        name = lambda entry: entry if isinstance(entry, str) else entry.__name__  # noqa: E731
        return {"pattern": self.pattern.name, "criterion": self.criterion.name,
                "include": [name(e) for e in self.include], "exclude": [name(e) for e in self.exclude]}

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        before = ctx.module
        found, shared = graph_targets(before)
        chosen, left_out = select(found, self.include, self.exclude)
        targets, unfit = eligible(chosen, self.pattern, self.eligible)
        working = copy_sharing_tensors(before)
        for target in targets:  # private copies: a criterion may update the kept weights in place
            weight = get_attr_value(working, target.param)
            set_attr_value(working, target.param, torch.nn.Parameter(weight.detach().clone(), weight.requires_grad))
        masks, chosen_by, notes = self._masks(working, targets)
        self._check(masks, targets)
        reference_source = working if self.criterion.updates_weights else before
        ctx.reference = _tie(apply_masks(reference_source, masks), targets)
        ctx.module = _tie(apply_masks(working, masks, in_place=True), targets)
        for target in targets:
            ctx.plan.record_mask(target.param, masks[target.param], pattern=self.pattern.name, layout=target.layout,
                                 criterion=chosen_by[target.param])
        rows, sparsity, kept = _layer_rows(targets, masks, before, chosen_by, notes)
        skipped = {**shared, **left_out, **unfit}
        rows += [{"weight": param, "sparsity": "-", "note": f"not sparsified: {why}"} for param, why in skipped.items()]
        drift = self._drift(before, ctx)
        by_magnitude = f" ({len(notes)} of them by magnitude)" if notes else ""
        self._summary = (f"{len(targets)} weights {self.pattern.name} by {self.criterion.name}{by_magnitude}: "
                         f"{sparsity:.1%} of "
                         f"their entries zero, {kept:.1%} of their magnitude kept; {len(skipped)} not sparsified; "
                         f"output change vs dense {drift:.2e} (relative)")
        return rows

    def _masks(self, working: torch.nn.Module, targets) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                                   dict[str, str]]:
        """The masks, which criterion chose each, and a note for each target the criterion could not score: those
        get magnitude masks, applied before the criterion runs (a calibrated one then sees them pruned)."""
        unscored = self.criterion.unsupported(working, targets, self.pattern)
        fallback = [target for target in targets if target.param in unscored]
        masks = Magnitude().compute_masks(working, fallback, self.pattern) if fallback else {}
        with torch.no_grad():
            for target in fallback:
                get_attr_value(working, target.param).mul_(masks[target.param])
        rest = [target for target in targets if target.param not in unscored]
        if rest:
            masks.update(self.criterion.compute_masks(working, rest, self.pattern, self.calibration))
        chosen_by = {target.param: "magnitude" if target.param in unscored else self.criterion.name
                     for target in targets}
        notes = {param: f"magnitude: {self.criterion.name} cannot score it ({why})" for param, why in unscored.items()}
        return masks, chosen_by, notes

    def _check(self, masks: dict[str, torch.Tensor], targets) -> None:
        """A criterion's masks must cover the targets, in their shapes, in the pattern (else it is a bug there)."""
        for target in targets:
            keep = masks.get(target.param)
            if keep is None or tuple(keep.shape) != target.shape or keep.dtype != torch.bool:
                raise FxsparseError(f"criterion {self.criterion.name!r} gave no bool mask of shape {target.shape} "
                                    f"for {target.param!r}")
            if isinstance(self.pattern, NM) and not self.pattern.holds(keep, target.layout):
                raise FxsparseError(f"criterion {self.criterion.name!r} gave {target.param!r} a mask that is not "
                                    f"{self.pattern.name}")

    @staticmethod
    def _drift(before: torch.nn.Module, ctx: CompileContext) -> float:
        with torch.no_grad():
            return compare_outputs(before(*ctx.args, **ctx.kwargs), ctx.module(*ctx.args, **ctx.kwargs))["max_rel"]

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return self._summary
