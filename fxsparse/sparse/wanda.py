"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

A weight's score is ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of the input feature it multiplies,
taken over every calibration token. Weights compete only within their output row (unstructured) or within their
group of M consecutive inputs of a row (N:M), and the kept weights are not updated. The reference implementation
is github.com/locuslab/wanda (``lib/prune.py: prune_wanda``, ``lib/layerwrapper.py``).

Beyond the reference: a transposable N:M mask is the exhaustive M x M block search of
:mod:`fxsparse.sparse.patterns` run on the Wanda scores instead of ``|W|``; and a single threshold over all layers
(global unstructured sparsity) compares :func:`per_row_scores`. The reference only compares weights within an
output row or within a layer (``image_classifiers/prune_utils.py: compute_mask``, granularity "row" or "layer").
"""
from __future__ import annotations

import torch

from .patterns import NM


class WandaStatistics:
    """Accumulates the squared L2 norm of every input feature of one Linear-like layer over calibration tokens."""

    def __init__(self, in_features: int):
        self.squared_norms = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add a batch of the layer's inputs, of shape ``(..., in_features)``."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.squared_norms += rows.square().sum(0).cpu()
        self.tokens += rows.shape[0]


def wanda_scores(weight: torch.Tensor, statistics: WandaStatistics) -> torch.Tensor:
    """``|W| * ||X_j||_2`` for a weight matrix of shape ``(out_features, in_features)``."""
    column_norms = statistics.squared_norms.sqrt().to(weight.device, torch.float32)
    return weight.detach().abs().float() * column_norms.reshape(1, -1)


def per_row_scores(weight: torch.Tensor, statistics: WandaStatistics) -> torch.Tensor:
    """``|W_ij| * RMS(X_j)``: the root-mean-square change of output i per calibration row (token, or output
    position of a convolution) if ``W_ij`` is removed. Unlike ``||X_j||``, which grows with the number of rows a
    layer sees (a convolution early in a network sees many more output positions than one late in it), this is
    the same quantity in every layer, so one threshold over all layers compares like with like."""
    return wanda_scores(weight, statistics) / max(statistics.tokens, 1) ** 0.5


def keep_lowest_pruned_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A keep-mask that prunes the ``floor(in_features * sparsity)`` lowest scores of every output row
    (ties broken by position, as the reference's stable sort does)."""
    pruned_per_row = int(scores.shape[1] * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :pruned_per_row], False)
    return keep


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A keep-mask that keeps the ``n`` highest scores of every group of ``m`` consecutive inputs of a row."""
    rows, columns = scores.shape
    groups = scores.reshape(rows, columns // m, m)
    kept = torch.topk(groups, n, dim=2, largest=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True)
    return keep.reshape(rows, columns)


def wanda_prune(weight: torch.Tensor, statistics: WandaStatistics, sparsity: float,
                n_of_m: tuple[int, int] | None = None, transposable: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a ``(out_features, in_features)`` weight matrix; returns ``(pruned weight, keep-mask)``.

    ``n_of_m=(n, m)`` keeps n of every m consecutive inputs (``sparsity`` is then ignored), and with
    ``transposable=True`` also n of every m consecutive rows of a column, in aligned m x m blocks; otherwise every
    row loses ``floor(in_features * sparsity)`` weights."""
    scores = wanda_scores(weight, statistics)
    if n_of_m and transposable:
        keep = NM(*n_of_m, transposable=True).keep_mask(scores, "linear")
    elif n_of_m:
        keep = keep_n_of_m(scores, *n_of_m)
    else:
        keep = keep_lowest_pruned_per_row(scores, sparsity)
    return weight * keep, keep
