"""Growing models: depth expansion that preserves the function, and the growth trainer (msModelSlim's
``sparse_model_width`` / ``sparse_model_depth``)."""
from .blocks import Block, BlockRun, find_block_runs
from .identity import IdentityRecipe, NotGrowableError, analyse_block
from .insert import Copy, rearrange_children
from .layout import apply_growth
from .optim import Derivation, remap_optimizer
from .trainer import DepthGrower, Grower, GrowthTrainer, WidthGrower, sparse_model_depth, sparse_model_width

__all__ = [
    "Block", "BlockRun", "find_block_runs", "IdentityRecipe", "NotGrowableError", "analyse_block", "Copy",
    "rearrange_children", "apply_growth", "Derivation", "remap_optimizer", "Grower", "DepthGrower", "WidthGrower",
    "GrowthTrainer", "sparse_model_depth", "sparse_model_width",
]
