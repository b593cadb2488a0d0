"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", 2023).

Per Linear-like layer: the Hessian of the layer-wise reconstruction error, ``H = 2 X^T X / n`` over the calibration
tokens, is damped by ``percdamp`` times its mean diagonal; the upper Cholesky factor of ``H^-1`` then drives an
Optimal Brain Surgeon sweep over the input columns, block by block (``blocksize`` columns): within a block each
column's pruned weights are zeroed and their error is spread over the block's remaining columns, and at the end of
the block the accumulated error updates every later column at once. The unstructured mask is chosen per block
(adaptive mask selection, score ``w^2 / [H^-1]_jj^2``); N:M masks are chosen per group of M columns as the sweep
reaches it. The reference implementation is github.com/IST-DASLab/sparsegpt (``sparsegpt.py: fasterprune``).

A transposable N:M mask (N:M along the rows and the columns of every aligned M x M block) cannot be chosen group by
group as the sweep goes, since a block spans M rows that the sweep updates together. It is chosen once, up front,
from the same saliency ``w^2 / [H^-1]_jj^2`` on the weights before any update (the exhaustive block search of
:mod:`fxsparse.sparse.patterns`), and the OBS sweep then runs with that fixed mask: the kept weights still absorb the
pruned ones' error, which is where SparseGPT's advantage over a magnitude mask comes from.

One deliberate difference: the reference prunes every score ``<=`` the threshold at index ``int(numel * sparsity)``
of a block, which removes one weight too many (more on ties); here each block prunes exactly its share, so a layer
ends with exactly ``round(numel * sparsity)`` zeros.
"""
from __future__ import annotations

import torch

from .patterns import NM


class HessianStatistics:
    """Accumulates ``H = 2 X^T X / n`` for one Linear-like layer (n = calibration tokens seen)."""

    def __init__(self, in_features: int):
        self.sum_outer = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add a batch of the layer's inputs, of shape ``(..., in_features)``."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64).cpu()
        self.sum_outer += rows.T @ rows
        self.tokens += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 / max(self.tokens, 1)) * self.sum_outer


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped ``H^-1``."""
    damped = hessian.clone()
    damped.diagonal().add_(percdamp * damped.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    return torch.linalg.cholesky(inverse, upper=True)


def _pruned_count_per_block(rows: int, columns: int, blocksize: int, sparsity: float) -> list[int]:
    """How many weights each column block prunes so the layer ends at exactly round(rows*columns*sparsity)."""
    edges = list(range(0, columns, blocksize)) + [columns]
    totals = [round(rows * edge * sparsity) for edge in edges]
    return [after - before for before, after in zip(totals, totals[1:])]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, statistics: HessianStatistics, sparsity: float,
                    n_of_m: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, transposable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a ``(out_features, in_features)`` weight matrix with the OBS update of the kept weights.

    Returns ``(updated weight, keep-mask)``. ``n_of_m=(n, m)`` keeps n of every m consecutive inputs (``sparsity``
    is then ignored; ``blocksize`` must be a multiple of m); ``transposable=True`` makes it n of m both ways, with
    the mask fixed up front (see the module's docstring)."""
    dtype = weight.dtype
    work = weight.detach().to(torch.float64).clone()
    hessian = statistics.hessian().to(work.device)
    dead = hessian.diagonal() == 0  # inputs that were always zero: their weights never mattered
    hessian[dead, dead] = 1
    work[:, dead] = 0
    hinv = _upper_cholesky_of_inverse(hessian, percdamp)
    rows, columns = work.shape
    pruned = torch.zeros_like(work, dtype=torch.bool)
    counts = _pruned_count_per_block(rows, columns, blocksize, sparsity)
    fixed = None
    if n_of_m is not None and transposable:
        saliency = work.square() / hinv.diagonal().reshape(1, -1).square()
        fixed = ~NM(*n_of_m, transposable=True).keep_mask(saliency, "linear")

    for block, start in enumerate(range(0, columns, blocksize)):
        end = min(start + blocksize, columns)
        block_weight = work[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        block_errors = torch.zeros_like(block_weight)
        block_pruned = torch.zeros(block_weight.shape, dtype=torch.bool, device=work.device)
        if fixed is not None:
            block_pruned = fixed[:, start:end].clone()
        elif n_of_m is None and counts[block]:
            scores = block_weight.square() / block_hinv.diagonal().reshape(1, -1).square()
            lowest = torch.topk(scores.flatten(), counts[block], largest=False).indices
            block_pruned.view(-1)[lowest] = True
        for column in range(end - start):
            if fixed is None and n_of_m is not None and column % n_of_m[1] == 0:
                n, m = n_of_m
                group = slice(column, column + m)
                scores = block_weight[:, group].square() / block_hinv.diagonal()[group].reshape(1, -1).square()
                lowest = torch.topk(scores, m - n, dim=1, largest=False).indices
                block_pruned[:, group] = block_pruned[:, group].scatter(1, lowest, True)
            original = block_weight[:, column]
            quantized = original.masked_fill(block_pruned[:, column], 0)
            error = (original - quantized) / block_hinv[column, column]
            block_weight[:, column:] -= error.unsqueeze(1) @ block_hinv[column, column:].unsqueeze(0)
            block_weight[:, column] = quantized
            block_errors[:, column] = error
        work[:, start:end] = block_weight
        pruned[:, start:end] = block_pruned
        work[:, end:] -= block_errors @ hinv[start:end, end:]
    return work.to(dtype), ~pruned
