"""Weight criteria: which entries of each target weight a pattern keeps.

A criterion is a :class:`WeightCriterion` subclass registered by name (``WEIGHT_CRITERIA["wanda"] = Wanda``, then
``Sparsify(criterion="wanda")``) with one method::

    compute_masks(module, targets, pattern, calibration) -> {parameter name: bool keep-mask}

``module`` is the compile's private module (a GraphModule) whose target weights are private copies too: a
criterion may update kept weights in place there (SparseGPT's reconstruction does), and that is what the masks are
then applied to. ``targets`` are :class:`~fxsparse.sparse.targets.WeightTarget` (parameter name and layout),
``pattern`` an :class:`~fxsparse.sparse.patterns.NM` or :class:`~fxsparse.sparse.patterns.Unstructured`, and
``calibration`` a list of example inputs (as ``compile`` takes them), or None. ``needs_calibration`` tells the pass
to refuse a missing one before any work; ``updates_weights`` says the criterion changes kept weights (the pass then
verifies against the updated weights, masked, instead of the weights before it). Most criteria only score entries; :func:`masks_from_scores` turns scores
into masks of the pattern (per layer, or over all layers for global unstructured sparsity).

Two optional methods: ``check_pattern(pattern)`` refuses a pattern the criterion cannot choose (a one-line
``BadArgumentError``, raised when the pass is built), and ``unsupported(module, targets, pattern) -> {parameter:
why}`` names the targets it cannot score (a 3-D convolution for the calibrated criteria); the pass gives those
magnitude masks and says so in its report.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from fxsparse.errors import BadArgumentError
from fxsparse.graph_utils import get_attr_value

from .patterns import NM, Pattern
from .targets import WeightTarget


def masks_from_scores(scores: dict[str, torch.Tensor], targets: list[WeightTarget], pattern: Pattern
                      ) -> dict[str, torch.Tensor]:
    """The keep-masks of ``pattern`` with the largest scores, ``{parameter: bool mask}``."""
    if isinstance(pattern, NM):
        return {t.param: pattern.keep_mask(scores[t.param], t.layout) for t in targets}
    return pattern.keep_masks({t.param: scores[t.param] for t in targets})


class WeightCriterion:
    """Base of the criteria; see the module's docstring for the contract."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False

    def compute_masks(self, module: torch.nn.Module, targets: list[WeightTarget], pattern: Pattern,
                      calibration: list[Any] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise a one-line BadArgumentError if this criterion cannot choose masks of ``pattern``."""

    def unsupported(self, module: torch.nn.Module, targets: list[WeightTarget], pattern: Pattern) -> dict[str, str]:
        """``{parameter: why}`` for the targets this criterion cannot score in ``module`` with ``pattern``."""
        return {}


class Magnitude(WeightCriterion):
    """Keep the entries of largest absolute value (apex's ASP, PaddleSlim, every baseline)."""

    name = "magnitude"

    def compute_masks(self, module, targets, pattern, calibration=None):
        scores = {t.param: get_attr_value(module, t.param).detach().abs() for t in targets}
        return masks_from_scores(scores, targets, pattern)


WEIGHT_CRITERIA: dict[str, type[WeightCriterion]] = {"magnitude": Magnitude}


def resolve_criterion(criterion: str | WeightCriterion) -> WeightCriterion:
    if isinstance(criterion, WeightCriterion):
        return criterion
    if isinstance(criterion, str) and criterion in WEIGHT_CRITERIA:
        return WEIGHT_CRITERIA[criterion]()
    raise BadArgumentError(f"criterion must be one of {sorted(WEIGHT_CRITERIA)} or a WeightCriterion, "
                           f"not {criterion!r}")
