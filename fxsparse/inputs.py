"""Normalising the example inputs a user passes: a tensor, a tuple of positional inputs, or a dict of keywords."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import BadArgumentError
from .graph_utils import iter_tensors


def normalize_example_inputs(example_inputs: Any, example_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` from the forms users write: ``x``, ``(x, y)``, ``{"input_ids": ids}``."""
    if example_inputs is None and not example_kwargs:
        raise BadArgumentError("example_inputs is required: pass a tensor, a tuple of tensors or a dict of keyword inputs")
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        overlap = set(example_inputs) & set(kwargs)
        if overlap:
            raise BadArgumentError(f"example_inputs and example_kwargs both give {sorted(overlap)}")
        kwargs.update(example_inputs)
        args = ()
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise BadArgumentError(
            f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, not {type(example_inputs).__name__}"
        )
    tensors = list(iter_tensors((args, kwargs)))
    if not tensors:
        raise BadArgumentError("example_inputs holds no tensor: the model must take at least one tensor input")
    _check_not_empty(args, kwargs)
    return args, kwargs


def _check_not_empty(args: tuple, kwargs: dict) -> None:
    """A BadArgumentError for an input tensor whose batch is empty: nothing could be measured or verified on it."""
    named = [(f"example_inputs[{i}]", v) for i, v in enumerate(args)] + [(f"example_inputs[{k!r}]", v)
                                                                          for k, v in kwargs.items()]
    for name, value in named:
        for tensor in iter_tensors(value):
            if tensor.dim() > 0 and tensor.shape[0] == 0:
                raise BadArgumentError(f"{name} has a batch of size 0 (shape {tuple(tensor.shape)}): give at least "
                                       "one example")


def inputs_like(args: tuple, kwargs: dict, generator: torch.Generator | None = None) -> tuple[tuple, dict]:
    """Fresh random inputs with the example inputs' shapes and dtypes (integer inputs keep their value range)."""

    def fresh(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, generator=generator).to(value.device)
        if value.dtype == torch.bool:
            return value.clone()
        high = int(value.max().item()) + 1 if value.numel() else 1
        low = int(value.min().item()) if value.numel() else 0
        if high - low <= 1:
            return value.clone()
        return torch.randint(low, high, value.shape, dtype=value.dtype, generator=generator).to(value.device)

    fresh_args, fresh_kwargs = pytree.tree_map(fresh, (tuple(args), dict(kwargs)))  # lists of images too
    return tuple(fresh_args), fresh_kwargs


def describe_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """A JSON-able record of the inputs' shapes and dtypes (non-tensor values as they are), for plans."""

    def spec(value):
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        return {"value": value}

    return {"args": [spec(a) for a in args], "kwargs": {k: spec(v) for k, v in kwargs.items()}}


def inputs_from_description(description: dict[str, Any]) -> tuple[tuple, dict]:
    """Inputs matching :func:`describe_inputs`' record: zeros of the recorded shapes and dtypes."""

    def make(spec):
        if "shape" in spec:
            return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        return spec["value"]

    if not description:
        raise BadArgumentError("the plan records no example inputs; pass example_inputs")
    return tuple(make(s) for s in description["args"]), {k: make(s) for k, s in description["kwargs"].items()}
