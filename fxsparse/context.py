"""The state a pipeline of passes works on: the graph, the inputs it was traced with, the facts passes left."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .plan import Plan


@dataclass
class CompileContext:
    """Shared by every pass of one compile.

    ``facts`` holds analysis results by name ("shapes", "groups", "removal"...). A pass that rewrites the graph
    drops the facts it invalidates, and the pass manager recomputes those a later pass requires.
    """

    module: fx.GraphModule
    frontend: str
    args: tuple
    kwargs: dict
    plan: Plan = field(default_factory=Plan)
    facts: dict[str, Any] = field(default_factory=dict)
    # The module as it was before the rewrite in progress: the reference a verification step compares against.
    reference: fx.GraphModule | None = None
    verify: bool = True
    # The reference's outputs on verification's trial inputs (fxsparse.verify.trial_inputs), by trial index, where
    # a rewriting pass ran the reference on them anyway (Shrink measures residues so): verification reuses them.
    reference_outputs: dict[int, Any] = field(default_factory=dict)
    # Multiply-accumulates of one forward of the traced model (None: not counted): what a pass can weigh the cost
    # of running the model by.
    traced_macs: int | None = None
