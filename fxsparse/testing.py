"""Helpers for checking that a rewrite is exact, shared by the tests and the benchmarks (and useful to a user who
checks fxsparse on their own model): constants made non-trivial, and random structured masks.

    model = randomize_constants(model.eval())
    masks = random_unit_masks(channel_facts(model, example))
    fxsparse.compile(model, example, passes=[MaskPropagation(masks), Shrink()])   # verified against the masked model
"""
from __future__ import annotations

import torch

from .analysis import reorder_domains
from .channels import REORDER
from .index_map import IndexMap
from .masks import masks_for_units, random_units
from .shapes import propagate_shapes
from .trace import trace

_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LayerNorm,
          torch.nn.GroupNorm)


def randomize_constants(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics, normalisation scales and biases, so that removed channels carry constants and
    their folding is exercised; parameters initialised to (nearly) zero, like ViT's head or ConvNeXt's layer scale,
    become random too (a zero head makes every output 0, and a comparison of outputs could not fail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
                module.weight.normal_(1.0, 0.2, generator=generator)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2, generator=generator)
            elif param.numel() and param.abs().max() < 1e-4:
                param.normal_(0.0, 0.1, generator=generator)
    return model


def channel_facts(model: torch.nn.Module, example, frontend: str = "auto", **trace_options):
    """What DependencyGroups finds in ``model``: groups, units, barriers (see fxsparse.passes.dependency_groups)."""
    from fxsparse.analysis import analyse_channels

    traced = trace(model, example, frontend=frontend, **trace_options)
    if not traced.shapes:  # tracing left no values on the nodes
        propagate_shapes(traced.module, traced.args, traced.kwargs)
    return analyse_channels(traced.module)


def random_unit_masks(facts, fraction: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks removing ``fraction`` of the units of every group, at random (what a structured pruner decides)."""
    units = random_units(facts.groups, fraction, torch.Generator().manual_seed(seed))
    return masks_for_units(facts.analysis, units)


def random_reorder(facts, seed: int = 0):
    """A random permutation of every group of reorderable units, within each domain (see
    fxsparse.analysis.reorder_domains): an IndexMap that must change no output, for checking the rewrite."""
    generator = torch.Generator().manual_seed(seed)
    groups = facts.groups_for(REORDER)
    units = torch.cat([g.units for g in groups]) if groups else torch.empty(0, dtype=torch.long)
    domains = reorder_domains(facts, units)
    slots, sources = [], []
    for domain in torch.unique(domains):
        members = units[domains == domain]
        slots.append(members)
        sources.append(members[torch.randperm(len(members), generator=generator)])
    if not slots:
        return IndexMap.identity(facts.analysis)
    return IndexMap.permutation(facts.analysis, torch.cat(slots), torch.cat(sources))
