"""The weights the one-shot engine prunes: Linear-like layers (layouts as :mod:`fxsparse.sparse.targets` finds
them), each with its parameter, so the engine can read and write it as an ``(out, in)`` matrix."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .targets import layout_of_module


@dataclass
class LinearTarget:
    """One Linear-like weight: its full parameter name, the parameter, whether it is stored ``(in, out)`` (Conv1D,
    ``x @ W`` in a graph) rather than ``(out, in)``, and the module that applies it (None in a graph)."""

    name: str
    parameter: torch.Tensor
    transposed: bool
    module: nn.Module | None = None

    @property
    def in_features(self) -> int:
        return self.parameter.shape[0 if self.transposed else 1]

    def matrix(self) -> torch.Tensor:
        """The weight as ``(out_features, in_features)`` (a copy)."""
        weight = self.parameter.detach()
        return (weight.T if self.transposed else weight).clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Write an ``(out, in)`` matrix back into the weight, in place."""
        self.parameter.data.copy_(matrix.T if self.transposed else matrix)

    def layout(self, mask: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` mask in the weight's own layout."""
        return (mask.T if self.transposed else mask).contiguous()


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None, only: set[str] | None) -> bool:
    """Whether a weight name passes the ``only`` set and the ``include``/``exclude`` globs."""
    if only is not None and name not in only:
        return False
    if include is not None and not any(fnmatch.fnmatchcase(name, glob) for glob in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, glob) for glob in exclude)


def linear_targets(root: nn.Module, prefix: str, include: Iterable[str] | None, exclude: Iterable[str] | None,
                   only: set[str] | None = None) -> list[LinearTarget]:
    """The Linear/Conv1D layers under ``root`` whose weight name (``prefix`` + local name + ``.weight``) is
    selected by ``include``/``exclude``/``only``."""
    found = []
    for local, module in root.named_modules():
        layout = layout_of_module(module)
        if layout in ("linear", "in_out"):
            name = ".".join(part for part in (prefix, local, "weight") if part)
            if selected(name, include, exclude, only):
                found.append(LinearTarget(name, module.weight, layout == "in_out", module))
    return found
