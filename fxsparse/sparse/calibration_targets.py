"""The weights the one-shot engine prunes: Linear-like layers (layouts as :mod:`fxsparse.sparse.targets` finds
them) and Conv1d/Conv2d (a linear map of their unfolded input, see :mod:`.conv_rows`), each with its parameter, so
the engine can read and write it as an ``(out, in)`` matrix and turn its inputs into rows."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from .conv_rows import ConvGeometry, module_geometry
from .targets import layout_of_module


@dataclass
class LinearTarget:
    """One Linear-like weight: its full parameter name, the parameter, whether it is stored ``(in, out)`` (Conv1D,
    ``x @ W`` in a graph) rather than ``(out, in)``, the module that applies it (None in a graph), and for a
    convolution its geometry (its matrix is then ``(out, K x C)``, kernel position first, see :mod:`.conv_rows`)."""

    name: str
    parameter: torch.Tensor
    transposed: bool
    module: nn.Module | None = None
    conv: ConvGeometry | None = None

    @property
    def in_features(self) -> int:
        if self.conv is not None:
            return self.parameter[0].numel()
        return self.parameter.shape[0 if self.transposed else 1]

    @property
    def groups(self) -> int:
        """A grouped convolution's groups: its matrix is that many row blocks, each multiplying its own block of
        ``in_features`` columns of the rows (1 for everything else)."""
        return self.conv.groups if self.conv is not None else 1

    @property
    def group_width(self) -> int:
        """How many consecutive matrix columns an N:M group may span: the input channels of a convolution (its
        groups run along C at one kernel position), every input of a Linear."""
        return self.parameter.shape[1] if self.conv is not None else self.in_features

    def matrix(self) -> torch.Tensor:
        """The weight as ``(out_features, in_features)`` (a copy)."""
        weight = self.parameter.detach()
        if self.conv is not None:
            return weight.movedim(1, -1).reshape(weight.shape[0], -1).clone()
        return (weight.T if self.transposed else weight).clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Write an ``(out, in)`` matrix back into the weight, in place."""
        self.parameter.data.copy_(self.layout(matrix))

    def layout(self, mask: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` matrix (a mask, scores or weights) in the weight's own layout."""
        if self.conv is not None:
            out, channels, *kernel = self.parameter.shape
            return mask.reshape(out, *kernel, channels).movedim(-1, 1).contiguous()
        return (mask.T if self.transposed else mask).contiguous()

    def input_rows(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """The layer's input as rows of ``groups x in_features`` matching :meth:`matrix`'s columns, in chunks (a
        convolution's unfolded patches; a Linear's tokens as they are)."""
        if self.conv is not None:
            yield from self.conv.rows(inputs)
        else:
            yield inputs


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None, only: set[str] | None) -> bool:
    """Whether a weight name passes the ``only`` set and the ``include``/``exclude`` globs."""
    if only is not None and name not in only:
        return False
    if include is not None and not any(fnmatch.fnmatchcase(name, glob) for glob in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, glob) for glob in exclude)


def linear_targets(root: nn.Module, prefix: str, include: Iterable[str] | None, exclude: Iterable[str] | None,
                   only: set[str] | None = None) -> list[LinearTarget]:
    """The Linear/Conv1D/Conv1d/Conv2d layers under ``root`` whose weight name (``prefix`` + local name +
    ``.weight``) is selected by ``include``/``exclude``/``only``."""
    found = []
    for local, module in root.named_modules():
        target = module_target(".".join(part for part in (prefix, local, "weight") if part), module)
        if isinstance(target, LinearTarget) and selected(target.name, include, exclude, only):
            found.append(target)
    return found


def module_target(name: str, module: nn.Module) -> LinearTarget | str | None:
    """The target for ``module``'s weight, why it is not one (a 3-D convolution), or None when the module is not
    linear-like at all."""
    layout = layout_of_module(module)
    if layout in ("linear", "in_out"):
        return LinearTarget(name, module.weight, layout == "in_out", module)
    if layout == "conv":
        conv = module_geometry(module)
        return conv if isinstance(conv, str) else LinearTarget(name, module.weight, False, module, conv)
    return None
