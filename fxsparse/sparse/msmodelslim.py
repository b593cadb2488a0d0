"""msModelSlim's weight-sparsity API (``msmodelslim.pytorch.sparse.sparse_tools``), on fxsparse's one-shot engine.

As msModelSlim documents it::

    sparse_config = SparseConfig(method="magnitude", sparse_ratio=0.5)
    prune_compressor = Compressor(model, sparse_config)
    prune_compressor.compress(dataset=[torch.randn(64, D_in)])

``method="magnitude"`` zeroes the smallest |W| of every Linear layer; ``"hessian"`` (closed source in msModelSlim,
described as Hessian-based) is SparseGPT here. msModelSlim's ``"par"``/``"par_v2"`` are not published and refused.
``progressive=True`` raises the ratio in ``PROGRESSIVE_STEPS`` equal steps, recalibrating on the model pruned by the
step before. ``uniform=False`` gives each layer its own ratio from a sensitivity measured on the calibration data:
the relative output error ``tr(dW H dW^T) / tr(W H W^T)`` (H = X^T X of the layer's inputs) the layer would suffer if
pruned alone by magnitude at ``sparse_ratio``; within each block, layers are moved up to ``NONUNIFORM_SPREAD`` below
(most sensitive) or above (least sensitive) the target, keeping the block's pruned-weight count at the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadArgumentError
from .calibration import (
    calibrate_blocks, magnitude_prune, sparsegpt_prune,
)
from .sparsegpt import HessianStatistics
from .calibration_targets import LinearTarget

PROGRESSIVE_STEPS = 4
NONUNIFORM_SPREAD = 0.1
_METHODS = {"magnitude": magnitude_prune, "hessian": sparsegpt_prune}


@dataclass
class SparseConfig:
    """msModelSlim's ``SparseConfig(mode='sparse', method='magnitude', sparse_ratio=0.5, progressive=False,
    uniform=True)``."""

    mode: str = "sparse"
    method: str = "magnitude"
    sparse_ratio: float = 0.5
    progressive: bool = False
    uniform: bool = True

    def __post_init__(self):
        if self.mode != "sparse":
            raise BadArgumentError(f"SparseConfig mode must be 'sparse', not {self.mode!r}")
        if self.method in ("par", "par_v2"):
            raise BadArgumentError(f"SparseConfig method {self.method!r} is msModelSlim's unpublished algorithm; "
                                   "use 'magnitude' or 'hessian'")
        if self.method not in _METHODS:
            raise BadArgumentError(f"SparseConfig method must be 'magnitude' or 'hessian', not {self.method!r}")
        ratio = self.sparse_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise BadArgumentError(f"SparseConfig sparse_ratio must be in (0, 1), not {ratio!r}")
        for flag in ("progressive", "uniform"):
            if not isinstance(getattr(self, flag), bool):
                raise BadArgumentError(f"SparseConfig {flag} must be True or False")


class Compressor:
    """msModelSlim's ``Compressor(model, cfg)``: ``compress(dataset)`` sparsifies ``model``'s Linear layers in place
    (inside its repeated transformer blocks when it has them). After it, ``masks`` holds every keep-mask and
    ``layer_ratios`` the ratio each layer got."""

    def __init__(self, model: nn.Module, cfg: SparseConfig = None):
        if not isinstance(model, nn.Module):
            raise BadArgumentError(f"Compressor model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(cfg, SparseConfig):
            raise BadArgumentError("Compressor cfg must be a SparseConfig")
        self.model, self.cfg = model, cfg
        self.masks: dict[str, torch.Tensor] = {}
        self.layer_ratios: dict[str, float] = {}

    def compress(self, dataset: list, progress: bool = False) -> nn.Module:
        if not isinstance(dataset, (list, tuple)) or not dataset:
            raise BadArgumentError("compress dataset must be a non-empty list of model inputs")
        steps = PROGRESSIVE_STEPS if self.cfg.progressive else 1
        for step in range(1, steps + 1):
            ratio = self.cfg.sparse_ratio * step / steps
            self.masks = calibrate_blocks(self.model, list(dataset), self._statistics, self._block_pruner(ratio),
                                          progress=progress, validate=_some_linear)
        return self.model

    def _statistics(self, target: LinearTarget):
        needs_data = (self.cfg.method == "hessian" or not self.cfg.uniform) and target.conv is None
        return HessianStatistics(target.in_features) if needs_data else None

    def _block_pruner(self, ratio: float):
        prune = _METHODS[self.cfg.method]

        def prune_block(_name, targets, stats):
            targets = [t for t in targets if t.conv is None]  # msModelSlim sparsifies Linear layers only
            ratios = {t.name: ratio for t in targets}
            if not self.cfg.uniform:
                ratios = nonuniform_ratios(targets, stats, ratio)
            masks = {}
            for target in targets:
                weight, keep = prune(target.matrix(), stats[target.name], ratios[target.name])
                target.write(weight)
                masks[target.name] = target.layout(keep)
                self.layer_ratios[target.name] = ratios[target.name]
            return masks

        return prune_block


def magnitude_sensitivity(weight: torch.Tensor, statistics: HessianStatistics, ratio: float) -> float:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)`` of pruning ``weight`` alone by magnitude at ``ratio``."""
    hessian = statistics.hessian().to(torch.float64)
    dense = weight.to(torch.float64)
    delta = dense - magnitude_prune(dense, None, ratio)[0]
    return float(((delta @ hessian) * delta).sum() / ((dense @ hessian) * dense).sum().clamp_min(1e-30))


def nonuniform_ratios(targets: list[LinearTarget], stats: dict, ratio: float) -> dict[str, float]:
    """Per-layer ratios around ``ratio``: less for sensitive layers, more for robust ones, same pruned count."""
    sensitivity = torch.tensor([magnitude_sensitivity(t.matrix(), stats[t.name], ratio) for t in targets])
    sizes = torch.tensor([float(t.parameter.numel()) for t in targets])
    spread = sensitivity.max() - sensitivity.min()
    if len(targets) < 2 or spread <= 0:
        return {t.name: ratio for t in targets}
    offsets = NONUNIFORM_SPREAD * (sensitivity.mean() - sensitivity) / spread
    offsets -= (offsets * sizes).sum() / sizes.sum()
    ratios = (ratio + offsets).clamp(0.0, 0.99)
    return {t.name: float(r) for t, r in zip(targets, ratios)}


def _some_linear(targets: list[LinearTarget]) -> None:
    """msModelSlim's sparse tool sparsifies Linear layers only: a model with none is an error, not a no-op."""
    if all(t.conv is not None for t in targets):
        raise BadArgumentError("Compressor sparsifies Linear layers, as msModelSlim's sparse tool does, and the model "
                               "has only convolutions; sparsify those with passes.Sparsify(criterion=...)")
