"""fxsparse: a torch.fx compiler that makes PyTorch models smaller, sparser and cheaper to train."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import CompileResult, apply_plan, compile, expand_width, load, permute_channels, prune  # noqa: E402
from .errors import (  # noqa: E402
    BadArgumentError,
    FxsparseError,
    MaskError,
    MissingDependencyError,
    PassOrderError,
    PlanMismatchError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .plan import Plan  # noqa: E402
from .trace import Traced, trace  # noqa: E402
from .transfer import load_big_into_small  # noqa: E402
from . import passes  # noqa: E402  (the top-level passes/ folder, installed as fxsparse.passes)
from . import growth  # noqa: E402

__all__ = [
    "compile", "prune", "permute_channels", "expand_width", "apply_plan", "load", "trace", "load_big_into_small",
    "passes", "growth", "Plan", "Traced",
    "CompileResult", "FxsparseError", "BadArgumentError", "TraceError", "UnsupportedOpError", "PassOrderError",
    "MaskError", "MissingDependencyError", "PlanMismatchError", "VerificationError",
]
