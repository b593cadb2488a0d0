"""Masks: the forms users write them in, applying them to weights, and masks for a decision on units."""
from __future__ import annotations

import copy
import difflib
from typing import Any

import torch

from .channels import PRODUCE, ChannelAnalysis
from .errors import MaskError
from .graph_utils import get_attr_value, set_attr_value


def normalize_masks(masks: dict[str, Any], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask of the parameter's full shape}``; raises MaskError naming a bad entry."""
    if not isinstance(masks, dict):
        raise MaskError(f"masks must be a dict of name -> mask, not {type(masks).__name__}")
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if isinstance(mask, dict):  # NNI: {module: {"weight": mask, "bias": mask}}
            for pname, sub in mask.items():
                if sub is not None:
                    out.update(normalize_masks({f"{name}.{pname}": sub}, module))
            continue
        target = name
        if name not in params and name in modules and isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            target = f"{name}.weight"
        if target not in params:
            close = difflib.get_close_matches(name, list(params) + list(modules), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise MaskError(f"mask names {name!r}, which is neither a parameter nor a module of the model{hint}")
        weight = params[target]
        mask = torch.as_tensor(mask)
        if mask.shape == weight.shape:
            full = mask != 0
        elif mask.dim() == 1 and weight.dim() >= 1 and mask.shape[0] == weight.shape[0]:
            full = (mask != 0).reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
        else:
            raise MaskError(
                f"mask for {target!r} has shape {tuple(mask.shape)}; expected the parameter's shape "
                f"{tuple(weight.shape)} or a 1-D mask of {weight.shape[0]} output channels")
        out[target] = full if target not in out else out[target] & full
    return out


def apply_masks(module: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module`` with each mask multiplied into its parameter (nothing else changes)."""
    masked = copy.deepcopy(module)
    with torch.no_grad():
        for target, mask in masks.items():
            weight = get_attr_value(masked, target)
            set_attr_value(masked, target, torch.nn.Parameter(weight * mask.to(weight.dtype), weight.requires_grad))
    return masked


def zero_slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Per index of ``dim``: is the whole slice zero?"""
    moved = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return (moved == 0).all(dim=1)


def masks_for_units(analysis: ChannelAnalysis, units: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks that zero every producing weight slice of the channels ``units`` remove: the masked model of a
    structural decision."""
    keep = analysis.keep_labels(units)
    masks: dict[str, torch.Tensor] = {}
    for member in analysis.graph.members.values():
        if PRODUCE not in member.roles:
            continue
        alive = keep[member.labels]
        if bool(alive.all()):
            continue
        shape = analysis.graph.member_shapes[member.target]
        mask = masks.get(member.target, torch.ones(shape, dtype=torch.bool))
        view = [1] * len(shape)
        view[member.dim] = len(alive)
        masks[member.target] = mask & alive.reshape(view)
    return masks
