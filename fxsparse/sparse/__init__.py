"""Weight-level sparsity: one-shot calibration-aware pruning and msModelSlim's API."""
from .msmodelslim import Compressor, SparseConfig

__all__ = ["SparseConfig", "Compressor"]
