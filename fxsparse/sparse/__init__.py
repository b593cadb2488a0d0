"""Weight sparsity: patterns (N:M, unstructured), criteria that choose the kept entries, masks kept through
training, one-shot calibration-aware pruning (Wanda, SparseGPT: :mod:`fxsparse.sparse.calibration`), and the
drop-in APIs of the tools users know (apex ASP in :mod:`fxsparse.asp`, PaddleSlim's pruners, msModelSlim's
SparseConfig/Compressor)."""
from .criteria import WEIGHT_CRITERIA, Magnitude, WeightCriterion, masks_from_scores
from .keep import MaskKeeper, keep_masks, masks_from_zeros
from .msmodelslim import Compressor, SparseConfig
from .paddleslim import GMPUnstructuredPruner, UnstructuredPruner
from .patterns import NM, Unstructured, block_patterns, parse_pattern
from .targets import Eligibility, WeightTarget

__all__ = [
    "WEIGHT_CRITERIA", "WeightCriterion", "Magnitude", "masks_from_scores", "MaskKeeper", "keep_masks",
    "masks_from_zeros", "UnstructuredPruner", "GMPUnstructuredPruner", "NM", "Unstructured", "block_patterns", "parse_pattern", "Eligibility", "WeightTarget",
    "SparseConfig", "Compressor",
]
