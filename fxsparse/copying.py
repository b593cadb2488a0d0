"""Copies of a module's structure that share its tensors, and undoing the sharing at the end of a compile."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree

from .graph_utils import get_attr_value, set_attr_value, tensor_names


def copy_sharing_tensors(module: torch.nn.Module, buffers: bool = True) -> torch.nn.Module:
    """A deep copy of ``module``'s structure (submodules, graph, attributes) that shares the original's tensors.

    Passes treat tensors as values: a pass that changes a weight puts a new tensor in its place (masking, slicing,
    folding a constant into a bias) and never writes into one. So a copy needs no copies of the weights it does
    not change, which on a large model are most of the cost of a copy (fresh memory is slow to fault in).
    ``buffers=False`` copies the buffers and plain tensor attributes, and shares the parameters only: for a copy of
    a user's model, whose forward may update its own buffers (running statistics, counters) in place.
    """
    memo: dict[int, Any] = {}
    for tensor in (_tensors_held(module) if buffers else module.parameters()):
        memo[id(tensor)] = tensor
    _copy_plain_modules(module, memo)
    return copy.deepcopy(module, memo)


def _copy_plain_modules(module: torch.nn.Module, memo: dict[int, Any]) -> None:
    """Put a copy of every plain submodule of ``module`` in ``memo``, children before their parents, so that
    ``copy.deepcopy(module, memo)`` only has the rest to do (the graph module, modules with a copy protocol of
    their own).

    A plain module is copied as deepcopy would (a new instance with a deep copy of its ``__dict__``), without
    deepcopy's generic dispatch for each of the dozen hook dicts every module holds, mostly empty: on a ResNet-50
    that dispatch was three quarters of a copy's time.
    """
    for sub in _children_first(module, set()):
        if id(sub) in memo or not _is_plain(type(sub)):
            continue
        state = sub.__getstate__()
        if isinstance(state, dict):
            twin = type(sub).__new__(type(sub))
            memo[id(sub)] = twin
            twin.__setstate__({key: _copy_value(value, memo) for key, value in state.items()})


def _children_first(module: torch.nn.Module, seen: set[int]) -> Iterator[torch.nn.Module]:
    for child in module._modules.values():
        if child is not None and id(child) not in seen:
            seen.add(id(child))
            yield from _children_first(child, seen)
            yield child


def _is_plain(cls: type) -> bool:
    """Whether deepcopy copies instances of ``cls`` by the state protocol: ``cls.__new__(cls)``, then
    ``__setstate__`` with a deep copy of ``__getstate__()``."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and not hasattr(cls, "__getnewargs_ex__")
            and not hasattr(cls, "__getnewargs__") and not hasattr(cls, "__slots__"))


_ATOMIC = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, answered at once for values that need no copy or are an empty dict."""
    if isinstance(value, _ATOMIC):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if type(value) is tuple and all(isinstance(v, _ATOMIC) for v in value):
        return value
    if type(value) in (dict, OrderedDict) and all(id(v) in memo for v in value.values()):
        return type(value)((key, memo[id(v)]) for key, v in value.items())
    return copy.deepcopy(value, memo)


def unshare_parameters(module: torch.nn.Module, other: torch.nn.Module) -> int:
    """Give ``module`` its own copy of every parameter whose memory it still shares with ``other`` (the same tensor
    or a view of one; tied ones stay tied), so that training one never moves the other; returns how many tensors
    were copied."""
    theirs = {p.untyped_storage().data_ptr() for p in other.parameters()}
    copied = 0
    with torch.no_grad():
        for names in tensor_names(module).values():
            shared = get_attr_value(module, names[0])
            if shared.untyped_storage().data_ptr() not in theirs:
                continue
            own = shared.detach().clone()
            if isinstance(shared, torch.nn.Parameter):
                own = torch.nn.Parameter(own, requires_grad=shared.requires_grad)
            for name in names:
                set_attr_value(module, name, own)
            copied += 1
    return copied


def _tensors_held(module: torch.nn.Module):
    """Parameters, buffers and plain tensor attributes of every submodule, and the values graphs keep on nodes."""
    for sub in module.modules():
        yield from sub._parameters.values()
        yield from sub._buffers.values()
        yield from (v for v in vars(sub).values() if isinstance(v, torch.Tensor))
        graph = vars(sub).get("_graph")
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                yield from (v for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor))
