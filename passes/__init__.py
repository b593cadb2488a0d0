"""The passes of fxsparse, one per file. Passes talk through facts on the context, never each other's internals."""
from fxsparse.passes.shape_inference import ShapeInference

# Default providers of the facts passes require: the pass manager inserts these when a pass needs one.
PROVIDERS = {
    "shapes": ShapeInference,
}

# Every pass by name, for `passes=["ShapeInference", ...]` and the CLI.
PASSES = {
    cls.name: cls
    for cls in (ShapeInference,)
}

__all__ = ["ShapeInference", "PROVIDERS", "PASSES"]
