"""The passes of fxsparse, one per file. Passes talk through facts on the context, never each other's internals."""
import difflib
import re

from fxsparse.errors import BadArgumentError
from fxsparse.passes.channel_permutation import ChannelPermutation
from fxsparse.passes.dependency_groups import DependencyGroups
from fxsparse.passes.expand_depth import ExpandDepth
from fxsparse.passes.expand_width import ExpandWidth
from fxsparse.passes.lower_modules import LowerModules
from fxsparse.passes.mask_propagation import MaskPropagation
from fxsparse.passes.prune import Prune
from fxsparse.passes.shape_inference import ShapeInference
from fxsparse.passes.shrink import Shrink
from fxsparse.passes.sparse_kernels import SparseKernels
from fxsparse.passes.sparsify import Sparsify

# Default providers of the facts passes require: the pass manager inserts these when a pass needs one.
PROVIDERS = {
    "shapes": ShapeInference,
    "groups": DependencyGroups,
}

# Every pass by name, for `passes=["ShapeInference", ...]` and the CLI.
PASSES = {cls.name: cls for cls in (ShapeInference, DependencyGroups, LowerModules, MaskPropagation, Prune, Shrink,
                                    ChannelPermutation, Sparsify, SparseKernels, ExpandDepth, ExpandWidth)}


def snake_case(name: str) -> str:
    """``"ShapeInference"`` -> ``"shape_inference"``: the form users type."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# The snake_case names users type ("prune", "shape_inference"), each to its pass's registered name.
PASS_ALIASES = {snake_case(name): name for name in PASSES}


def pass_class(name: str, where: str = "passes"):
    """The pass class a name stands for: its class name (``"Prune"``) or snake_case (``"prune"``); an unknown
    name is a BadArgumentError naming ``where`` and the closest known names."""
    canonical = name if name in PASSES else PASS_ALIASES.get(name)
    if canonical is None:
        close = difflib.get_close_matches(name, [*PASSES, *PASS_ALIASES], n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise BadArgumentError(f"{where}: unknown pass {name!r}; {hint}known passes: {', '.join(sorted(PASSES))} "
                               f"(or {', '.join(sorted(PASS_ALIASES))})")
    return PASSES[canonical]


__all__ = [
    "ShapeInference", "DependencyGroups", "ChannelPermutation", "LowerModules", "MaskPropagation", "Prune", "Shrink",
    "Sparsify", "SparseKernels", "ExpandDepth", "ExpandWidth", "PROVIDERS", "PASSES", "PASS_ALIASES", "pass_class",
    "snake_case",
]
