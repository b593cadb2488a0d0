"""Keeping the user's optimizer working across a growth: same object, same parameter groups (so learning rates a
scheduler wrote stay), the state of surviving parameters kept, and the state of new parameters derived from the
parameters they were made from (gathered and scaled as the weights were: momentum and Adam moments of a copied
block, the columns of a repeated channel)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import BadArgumentError

# state entries that hold squared gradients: they are carried with the square of the weight's scale (a zeroed copy
# starts from zero moments, first and second)
SQUARED_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


@dataclass
class Derivation:
    """How a new parameter was made: ``source``'s values (None: fresh), indexed by ``gather`` (``(dim, index)``
    pairs, in order) and multiplied by ``scale``. It joins the parameter group that holds ``like``."""

    source: torch.nn.Parameter | None
    like: torch.nn.Parameter
    scale: float = 1.0
    gather: tuple[tuple[int, torch.Tensor], ...] = ()
    # per-index factors along a dim after the gather (width growth: a consumer's copy of a channel scaled by its share)
    scales: tuple[tuple[int, torch.Tensor], ...] = ()


def _derived_state(state: dict, derivation: Derivation) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and derivation.source is not None and value.shape == derivation.source.shape:
            for dim, index in derivation.gather:
                value = value.index_select(dim, index.to(value.device))
            squared = key in SQUARED_STATE
            factor = derivation.scale ** 2 if squared else derivation.scale
            value = (value * factor).clone() if factor != 1.0 else value.clone()
            for dim, scale in derivation.scales:
                view = [1] * value.dim()
                view[dim] = len(scale)
                scale = scale.to(value.device, value.dtype).reshape(view)
                value = value * (scale * scale if squared else scale)
            out[key] = value
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def remap_optimizer(optimizer: torch.optim.Optimizer, derivations: dict[torch.nn.Parameter, Derivation],
                    alive: Iterable[torch.nn.Parameter]) -> None:
    """Update ``optimizer`` in place after a model changed its parameters.

    Parameters not in ``alive`` (nor new) leave their groups and their state is dropped; each new parameter of
    ``derivations`` joins the group of its ``like`` parameter, with the state of its ``source`` transformed like
    its values. The group dicts themselves (learning rate, momentum...) are the same objects, so an LR scheduler
    attached to the optimizer continues where it was.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BadArgumentError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    keep = {id(p) for p in alive} | {id(p) for p in derivations}
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for new, derivation in derivations.items():
        if id(derivation.like) not in group_of:
            raise BadArgumentError(f"a new parameter of shape {tuple(new.shape)} derives from a parameter the "
                                   "optimizer does not hold")
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep and p not in derivations]
    for new, derivation in derivations.items():
        group_of[id(derivation.like)]["params"].append(new)
        if derivation.source is not None and derivation.source in optimizer.state:
            optimizer.state[new] = _derived_state(optimizer.state[derivation.source], derivation)
    for param in list(optimizer.state):
        if id(param) not in keep:
            del optimizer.state[param]
