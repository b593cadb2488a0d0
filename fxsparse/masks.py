"""Masks: the forms users write them in, applying them to weights, and masks for a decision on units."""
from __future__ import annotations

import difflib
import math
from typing import Any

import torch

from .channels import PRODUCE, ChannelAnalysis
from .copying import copy_sharing_tensors
from .errors import MaskError
from .graph_utils import get_attr_value, set_attr_value, tensor_names


def normalize_masks(masks: dict[str, Any], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask of the parameter's full shape}``; raises MaskError naming a bad entry."""
    check_mask_values(masks)
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, mask in _flat_entries(masks):
        target = _mask_target(name, params, modules)
        full = _full_mask(target, mask, params[target])
        out[target] = full if target not in out else out[target] & full
    return out


def check_mask_values(masks: Any) -> None:
    """MaskError unless ``masks`` is a dict whose masks hold only 0 and 1 (or True and False): a 0.5 is neither
    keep nor remove. Needs no model, so a pass can check at construction, before anything runs."""
    if not isinstance(masks, dict):
        raise MaskError(f"masks must be a dict of name -> mask, not {type(masks).__name__}")
    for name, mask in _flat_entries(masks):
        try:
            values = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError):
            raise MaskError(f"mask for {name!r} is a {type(mask).__name__}, not a tensor of 0 and 1") from None
        if values.dtype != torch.bool and not bool(((values == 0) | (values == 1)).all()):
            odd = values[(values != 0) & (values != 1)].flatten()[0].item()
            raise MaskError(f"mask for {name!r} holds {odd!r}: a mask holds only 0 (remove) and 1 (keep)")


def _flat_entries(masks: dict[str, Any]):
    """(name, mask) pairs, with NNI's ``{module: {"weight": mask, "bias": mask}}`` entries flattened."""
    for name, mask in masks.items():
        if isinstance(mask, dict):
            yield from ((f"{name}.{pname}", sub) for pname, sub in mask.items() if sub is not None)
        else:
            yield name, mask


def _mask_target(name: str, params: dict, modules: dict) -> str:
    """The parameter a mask entry names: itself, or a module's weight."""
    if name in params:
        return name
    if name in modules and isinstance(getattr(modules[name], "weight", None), torch.Tensor):
        return f"{name}.weight"
    close = difflib.get_close_matches(name, list(params) + list(modules), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise MaskError(f"mask names {name!r}, which is neither a parameter nor a module of the model{hint}")


def _full_mask(target: str, mask: Any, weight: torch.Tensor) -> torch.Tensor:
    """A bool mask of ``weight``'s shape from a full-shape mask or a 1-D mask over output channels."""
    mask = torch.as_tensor(mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    if mask.shape == weight.shape:
        return keep
    if mask.dim() == 1 and weight.dim() >= 1 and mask.shape[0] == weight.shape[0]:
        return keep.reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
    raise MaskError(
        f"mask for {target!r} has shape {tuple(mask.shape)}; expected the parameter's shape "
        f"{tuple(weight.shape)} or a 1-D mask of {weight.shape[0]} output channels")


def apply_masks(module: torch.nn.Module, masks: dict[str, torch.Tensor], in_place: bool = False) -> torch.nn.Module:
    """``module`` with each mask multiplied into its parameter, nothing else changed (a mask may be of the
    parameter's shape or broadcast to it).

    The masked parameters get new tensors; by default on a copy of ``module`` (which shares the other tensors), and
    with ``in_place`` on ``module`` itself, for a caller that owns it (a compile's private graph). A tensor reachable
    under several names (tied weights) stays one tensor: every name gets the masked one, and masks given under
    several of its names are all applied.
    """
    masked = module if in_place else copy_sharing_tensors(module)
    names = tensor_names(masked)
    by_tensor: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, mask in masks.items():
        weight = get_attr_value(masked, target)
        previous = by_tensor.get(id(weight))
        by_tensor[id(weight)] = (weight, mask if previous is None else previous[1] & mask)
    with torch.no_grad():
        for key, (weight, mask) in by_tensor.items():
            zeroed = torch.nn.Parameter(torch.where(mask, weight, 0), weight.requires_grad)
            for name in names.get(key, []):
                set_attr_value(masked, name, zeroed)
    return masked


def zero_slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Per index of ``dim``: is the whole slice zero?

    Reduces without copying: the tensor is viewed as (outer, dim, inner), the contiguous inner run first.
    """
    tensor = tensor.detach()
    grid = tensor.reshape(math.prod(tensor.shape[:dim]), tensor.shape[dim], -1)
    if tensor.dtype != torch.bool:
        grid = grid.ne(0)
    return ~grid.any(dim=2).any(dim=0)


def masks_for_units(analysis: ChannelAnalysis, units: torch.Tensor,
                    broadcast: bool = False) -> dict[str, torch.Tensor]:
    """Masks that zero every producing weight slice of the channels ``units`` remove: the masked model of a
    structural decision. ``broadcast``: a mask keeps size 1 in the dims it does not mask (what ``apply_masks``
    takes), rather than the parameter's full shape, which on a large model is a bool tensor per weight."""
    keep = analysis.keep_labels(units)
    masks: dict[str, torch.Tensor] = {}
    for member in analysis.graph.members.values():
        if PRODUCE not in member.roles:
            continue
        alive = keep[member.labels]
        if bool(alive.all()):
            continue
        shape = analysis.graph.member_shapes[member.target]
        view = [1] * len(shape)
        view[member.dim] = len(alive)
        mask = alive.reshape(view)
        if member.target in masks:
            mask = masks[member.target] & mask
        masks[member.target] = mask if broadcast else mask.expand(shape).clone()
    return masks


def random_units(groups, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``fraction`` of the units of every group (rounded down), drawn at random: a structural decision with no
    preference, for checking that a model shrinks exactly (``masks_for_units`` turns it into masks)."""
    chosen = [group.units[torch.randperm(group.size, generator=generator)[: int(group.size * fraction)]]
              for group in groups]
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
