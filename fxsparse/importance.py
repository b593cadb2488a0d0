"""Importance criteria: how much each removable unit of channels matters.

A criterion scores every slice of every member tensor of a group (``member_scores``: one number per index of the
dimension), fxsparse adds those numbers up per unit (an attention head collects the rows of q, k and v and the
columns of the output projection that it decides), and the criterion turns the totals into scores (``reduce``),
optionally normalised within the group (``finalize``, as LAMP does). A plain callable ``fn(tensor, dim)`` returning
one score per index of ``dim`` is a criterion too.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .channels import SCALE, ChannelAnalysis
from .errors import BadArgumentError
from .graph_utils import get_attr_value


def per_index(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``values`` over every dim but ``dim``."""
    return values.detach().movedim(dim, 0).reshape(values.shape[dim], -1).sum(dim=1).float()


# Leading rows of a weight taken at a time by per_index_blockwise: 4 MiB of float32.
_BLOCK_ELEMENTS = 1 << 20


def per_index_blockwise(tensor: torch.Tensor, dim: int, elementwise: Callable[[torch.Tensor], torch.Tensor]
                        ) -> torch.Tensor:
    """``per_index(elementwise(tensor), dim)``, computed a block of leading rows at a time: a temporary the size of
    the weight costs more in fresh memory than the arithmetic does (10x on a 2048 x 5632 weight), and on a large
    model it would be one more weight's worth of peak memory."""
    tensor = tensor.detach()
    if tensor.dim() < 2 or not tensor.numel():
        return per_index(elementwise(tensor), dim)
    rows = max(1, _BLOCK_ELEMENTS // tensor[0].numel())
    parts = [per_index(elementwise(block), dim) for block in tensor.split(rows)]
    return torch.cat(parts) if dim == 0 else torch.stack(parts).sum(dim=0)


class Importance:
    name = "importance"
    needs_gradients = False

    def member_scores(self, tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, roles: set[str]) -> torch.Tensor | None:
        """One score per index of ``dim`` of this member, or None to leave the member out."""
        raise NotImplementedError

    def reduce(self, totals: torch.Tensor) -> torch.Tensor:
        return totals

    def finalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores of one group's units, made comparable across groups (global scope)."""
        mean = scores.mean()
        return scores / mean if mean > 0 else scores


class Magnitude(Importance):
    """L1 (p=1) or L2 (p=2) norm of every weight a unit would take with it."""

    def __init__(self, p: int = 2):
        self.p = p
        self.name = f"l{p}"

    def member_scores(self, tensor, dim, grad, roles):
        if dim == 0 and tensor.numel():  # rows: a norm kernel reads them in place, with no |w|^p temporary
            norms = torch.linalg.vector_norm(tensor.detach().reshape(len(tensor), -1), self.p, dim=1).float()
            return norms if self.p == 1 else norms.square()
        return per_index_blockwise(tensor, dim, torch.abs if self.p == 1 else torch.square)

    def reduce(self, totals):
        return totals if self.p == 1 else totals.sqrt()


class BNScale(Importance):
    """|gamma| of the BatchNorm (or other normalisation) scales in the group (Network Slimming); groups without
    one fall back to the L2 magnitude, so no group is scored all-zero."""

    name = "bn_scale"

    def __init__(self):
        self.fallback = Magnitude(2)

    def member_scores(self, tensor, dim, grad, roles):
        return per_index(tensor.abs(), dim) if SCALE in roles else None


class Taylor(Importance):
    """First-order Taylor expansion of the loss: |w * dL/dw|, summed per unit (Molchanov et al.).

    Needs calibration batches and a loss function (see ``Prune``)."""

    name = "taylor"
    needs_gradients = True

    def member_scores(self, tensor, dim, grad, roles):
        if grad is None:
            return None
        return per_index((tensor * grad).abs(), dim)


class LAMP(Magnitude):
    """Layer-adaptive magnitude pruning (Lee et al.): a unit's L2 score divided by the total of the scores at
    least as large in its group, which makes scores comparable across groups without a hand-tuned normaliser."""

    name = "lamp"

    def __init__(self):
        super().__init__(2)
        self.name = "lamp"

    def finalize(self, scores):
        squared = scores.pow(2)
        order = torch.argsort(squared)
        tail = torch.flip(torch.cumsum(torch.flip(squared[order], [0]), 0), [0])
        lamp = torch.empty_like(squared)
        lamp[order] = squared[order] / tail.clamp_min(1e-30)
        return lamp


class RandomImportance(Importance):
    """Uniform random scores (a baseline)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def member_scores(self, tensor, dim, grad, roles):
        return None

    def finalize(self, scores):
        return scores


class CallableImportance(Importance):
    """A user's ``fn(tensor, dim) -> scores per index of dim``."""

    def __init__(self, fn: Callable[[torch.Tensor, int], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def member_scores(self, tensor, dim, grad, roles):
        scores = torch.as_tensor(self.fn(tensor.detach(), dim)).float()
        if scores.shape != (tensor.shape[dim],):
            raise BadArgumentError(f"importance {self.name} returned shape {tuple(scores.shape)} for a tensor of "
                                   f"shape {tuple(tensor.shape)} along dim {dim}; expected ({tensor.shape[dim]},)")
        return scores


CRITERIA: dict[str, Callable[[], Importance]] = {
    "l1": lambda: Magnitude(1),
    "l2": lambda: Magnitude(2),
    "bn_scale": BNScale,
    "taylor": Taylor,
    "lamp": LAMP,
    "random": RandomImportance,
}


def resolve_importance(importance: Any) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        if importance not in CRITERIA:
            raise BadArgumentError(f"importance: unknown criterion {importance!r}; known: {sorted(CRITERIA)}")
        return CRITERIA[importance]()
    if callable(importance):
        return CallableImportance(importance)
    raise BadArgumentError(f"importance must be a criterion name, an Importance or a callable, not {importance!r}")


def _push(analysis: ChannelAnalysis, totals: torch.Tensor, labels: torch.Tensor, values: torch.Tensor) -> None:
    """Add ``values`` (one per label) to the units deciding each label: its component, and its factors'."""
    comp, factor_of = analysis.component, analysis.factor_of
    for _ in range(16):
        totals.index_add_(0, comp[labels], values)
        factors = factor_of[labels]
        has = factors[:, 0] >= 0
        if not bool(has.any()):
            return
        labels = torch.cat([factors[has, 0], factors[has, 1]])
        values = torch.cat([values[has], values[has]])


def unit_scores(analysis: ChannelAnalysis, module: torch.nn.Module, importance: Importance,
                grads: dict[str, torch.Tensor] | None = None, units: torch.Tensor | None = None) -> torch.Tensor:
    """Raw (reduced, not yet group-normalised) scores of ``units`` (component roots; default: the prunable units
    of ``analysis``), in that order."""
    units = analysis.units if units is None else units
    if isinstance(importance, RandomImportance):
        return torch.rand(len(units), generator=importance.generator)
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (labels, one score per label), per member
    by_fallback: list[tuple[torch.Tensor, torch.Tensor]] = []
    for member in analysis.graph.members.values():
        tensor = get_attr_value(module, member.target)
        if not isinstance(tensor, torch.nn.Parameter):
            continue  # running statistics and constants say nothing about importance
        grad = grads.get(member.target) if grads else None
        scores = importance.member_scores(tensor, member.dim, grad, member.roles)
        if scores is not None:
            scored.append((member.labels, scores))
        if isinstance(importance, BNScale):
            by_fallback.append((member.labels, importance.fallback.member_scores(tensor, member.dim, None, set())))
    scores = importance.reduce(_totals(analysis, scored)[units])
    if isinstance(importance, BNScale):  # units no normalisation scale covers are scored by magnitude
        uncovered = _totals(analysis, scored, count=True)[units] == 0
        scores = torch.where(uncovered, importance.fallback.reduce(_totals(analysis, by_fallback)[units]), scores)
    return scores


def _totals(analysis: ChannelAnalysis, scored: list[tuple[torch.Tensor, torch.Tensor]], count: bool = False
            ) -> torch.Tensor:
    """Per label, the sum of the scores (or with ``count``, the number of scores) pushed to it, all members at
    once: a push per member cost more than the scoring on a model of a few hundred tensors."""
    totals = torch.zeros(analysis.n_labels)
    if scored:
        labels = torch.cat([labels for labels, _ in scored])
        values = torch.cat([values.float() for _, values in scored])
        _push(analysis, totals, labels, torch.ones_like(values) if count else values)
    return totals
