"""Meta tensors: the shape and dtype of a value, or of a module's weights, without storage."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.utils.stateless import _reparametrize_module


def to_meta(value):
    """A meta tensor (no storage) with ``value``'s shape and dtype; non-tensors pass through, containers recurse."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def on_meta(module: torch.nn.Module):
    """Temporarily swap every parameter and buffer of ``module`` for a meta tensor of the same shape."""
    state = {name: to_meta(t) for name, t in module.named_parameters(remove_duplicate=False)}
    state.update({name: to_meta(t) for name, t in module.named_buffers(remove_duplicate=False)})
    with _reparametrize_module(module, state, tie_weights=True):
        yield module
