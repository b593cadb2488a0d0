"""Where copies go, how a growth is written in the plan, and replaying it on a fresh instance."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import PlanMismatchError
from .identity import IdentityRecipe
from .insert import Copy, Layout, rearrange_children


def spread(indices: list[int], copies: int, placement: str) -> list[int]:
    """The block each of ``copies`` new blocks follows: spread evenly over ``indices`` ("interleave", each block at
    most once until all have one), or all after the last ("stack")."""
    if placement == "stack":
        return [indices[-1]] * copies
    count = len(indices)
    return sorted(indices[min(count - 1, int((i + 0.5) * count / copies))] if copies <= count else
                  indices[i % count] for i in range(copies))


def layout_record(container: str, children: int, layout: Layout) -> dict[str, Any]:
    """A growth as JSON: the container, how many children it had, and its new children in order."""
    entries = [{"copy_of": e.source, "recipe": e.recipe.to_dict() if e.recipe else None} if isinstance(e, Copy)
               else e for e in layout]
    return {"kind": "depth", "container": container, "children": children, "layout": entries}


def layout_from_record(record: dict[str, Any]) -> Layout:
    return [Copy(e["copy_of"], IdentityRecipe.from_dict(e["recipe"]) if e["recipe"] else None)
            if isinstance(e, dict) else int(e) for e in record["layout"]]


def apply_growth(model: torch.nn.Module, records: list[dict[str, Any]] | Any) -> torch.nn.Module:
    """Give ``model`` (a fresh instance of the planned model) the blocks the plan's growth inserted, in place, so a
    grown checkpoint loads into it; ``records`` is a Plan or its ``extra["growth"]`` list. Returns ``model``."""
    if hasattr(records, "extra"):
        records = records.extra.get("growth", [])
    for record in records:
        if record["kind"] != "depth":
            continue
        container = record["container"]
        try:
            parent = model.get_submodule(container) if container else model
        except AttributeError:
            raise PlanMismatchError(f"the plan grows {container!r}, which the model does not have") from None
        if len(parent._modules) != record["children"]:
            raise PlanMismatchError(f"the plan grows {container!r} from {record['children']} blocks, the model's has "
                                    f"{len(parent._modules)}")
        rearrange_children(model, container, layout_from_record(record))
    return model
