"""The decision structural passes hand to Shrink: which units (see fxsparse.channels) are removed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Removal:
    """Units to remove, and where the decision came from (for the report and the plan)."""

    units: torch.Tensor  # component roots
    source: str
    notes: list[str] = field(default_factory=list)
