"""Small helpers about torch.fx graphs that several passes share."""
from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    Export graphs take flattened pytree leaves; symbolic graphs take the forward signature's parameters.
    """
    codegen = gm.graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    if pytree_info is not None and pytree_info.in_spec is not None:
        leaves, _ = pytree.tree_flatten((args, kwargs))
        return leaves
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def tensor_value(node: fx.Node) -> torch.Tensor | None:
    """The (meta or fake) tensor shape inference left on ``node``, or None for non-tensor nodes."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    value = tensor_value(node)
    return tuple(int(s) for s in value.shape) if value is not None else None


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` target names (a parameter, buffer, tensor constant or submodule)."""
    owner = gm
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, last)


def set_attr_value(gm: torch.nn.Module, target: str, value: Any) -> None:
    owner = gm
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Parameter) or last in owner._parameters:
        owner._parameters.pop(last, None)
        owner.register_parameter(last, value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value))
    elif last in owner._buffers:
        owner._buffers[last] = value
    else:
        setattr(owner, last, value)


def tensor_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter and buffer, by tensor identity: tied weights have several."""
    names: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    for name, tensor in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    return names


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf
