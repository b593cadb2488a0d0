"""One exception family for everything fxsparse refuses to do.

Every message names the argument, node, module or parameter behind the problem, so a user can act on one line.
"""


class FxsparseError(Exception):
    """Base class of every error fxsparse raises on purpose."""


class BadArgumentError(FxsparseError, ValueError):
    """An argument of a public call is wrong (unknown pass, wrong inputs, a model that is not a module...)."""


class TraceError(FxsparseError):
    """No frontend could turn the model into a graph."""


class UnsupportedOpError(FxsparseError):
    """An op has no rule where one is indispensable (most unsupported ops are barriers, not errors)."""


class PassOrderError(FxsparseError):
    """A pass pipeline cannot be run in the order given."""


class MaskError(BadArgumentError):
    """A mask names an unknown parameter or module, or has the wrong shape."""


class PlanMismatchError(FxsparseError):
    """A plan does not fit the model it is applied to."""


class VerificationError(FxsparseError):
    """A rewritten model does not compute what the model before the rewrite computed."""


class MissingDependencyError(FxsparseError, ImportError):
    """An optional dependency a feature needs is not installed (the message says which extra to install)."""
