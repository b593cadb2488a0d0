"""The passes of fxsparse, one per file. Passes talk through facts on the context, never each other's internals."""
from fxsparse.passes.channel_permutation import ChannelPermutation
from fxsparse.passes.dependency_groups import DependencyGroups
from fxsparse.passes.expand_depth import ExpandDepth
from fxsparse.passes.lower_modules import LowerModules
from fxsparse.passes.mask_propagation import MaskPropagation
from fxsparse.passes.prune import Prune
from fxsparse.passes.shape_inference import ShapeInference
from fxsparse.passes.shrink import Shrink
from fxsparse.passes.sparsify import Sparsify

# Default providers of the facts passes require: the pass manager inserts these when a pass needs one.
PROVIDERS = {
    "shapes": ShapeInference,
    "groups": DependencyGroups,
}

# Every pass by name, for `passes=["ShapeInference", ...]` and the CLI.
PASSES = {cls.name: cls for cls in (ShapeInference, DependencyGroups, Prune, Shrink, ChannelPermutation, Sparsify,
                                    ExpandDepth)}

__all__ = [
    "ShapeInference", "DependencyGroups", "ChannelPermutation", "LowerModules", "MaskPropagation", "Prune", "Shrink",
    "Sparsify", "ExpandDepth", "PROVIDERS", "PASSES",
]
