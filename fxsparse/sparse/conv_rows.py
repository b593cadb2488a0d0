"""A convolution as a matrix product: the rows of its unfolded input (im2col), for the calibrated criteria.

A Conv1d/Conv2d computes, at every output position, ``W.x`` over one patch of its input: the C input channels at
its K kernel positions. Unfolding the input into one row per output position (of every example) turns the
convolution into ``rows @ matrix.T`` with ``matrix`` the weight as ``(out, K x C)``. Wanda's feature norms and
SparseGPT's Hessian ``2 X^T X / n`` are taken over those rows exactly as over a Linear layer's tokens. A grouped
convolution (``groups=g``) is g such products side by side: group i's outputs read only its C/g channels, so its
rows are the i-th of g equal column blocks (each ordered as below) and its matrix the i-th of g row blocks.

The columns are ordered kernel position first, input channel second (``weight.movedim(1, -1).flatten(1)``), so
M consecutive columns are M consecutive input channels at one kernel position: the groups the N:M "conv" layout
of :mod:`fxsparse.sparse.patterns` uses, and its transposable M x M blocks (M output channels x M input channels
at one kernel position) are the matrix's aligned M x M blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# at most this many entries of unfolded rows are materialised at once (float32: 16 MB); a larger batch is split
ROW_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, dilation and the (before, after) zero or ``mode`` padding of each spatial dimension."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str = "zeros"
    groups: int = 1

    @property
    def positions(self) -> int:
        return math.prod(self.kernel)

    def rows(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """The unfolded rows of ``inputs`` (``(batch, C, *spatial)`` or unbatched), ``(positions, K x C)`` each
        (for g groups: g blocks of ``K x C/g`` columns, one per group), a few examples at a time."""
        spatial = len(self.kernel)
        x = inputs.detach()
        if x.dim() == spatial + 1:
            x = x.unsqueeze(0)
        channels = x.shape[1]
        per_example = math.prod(_output_size(x.shape[2:], self)) * channels * self.positions
        step = max(1, ROW_CHUNK_ENTRIES // max(per_example, 1))
        for start in range(0, x.shape[0], step):
            yield self._unfold(x[start:start + step])

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        pads = [amount for before_after in reversed(self.padding) for amount in before_after]
        if any(pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        kernel, stride, dilation = self.kernel, self.stride, self.dilation
        if len(kernel) == 1:  # a 1-D convolution is a 2-D one of height 1
            x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        batch, channels = x.shape[:2]
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (batch, C x K, positions), C outermost
        groups = self.groups
        patches = patches.reshape(batch, groups, channels // groups, self.positions, -1).permute(0, 4, 1, 3, 2)
        return patches.reshape(-1, self.positions * channels)  # (batch x positions, groups x K x C/g)


def _output_size(spatial: torch.Size, geometry: ConvGeometry) -> list[int]:
    return [(size + before + after - dilation * (kernel - 1) - 1) // stride + 1
            for size, (before, after), kernel, stride, dilation
            in zip(spatial, geometry.padding, geometry.kernel, geometry.stride, geometry.dilation)]


def _per_dim(value, dims: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return tuple(int(v) for v in (values * dims if len(values) == 1 else values))


def geometry(kernel, stride, padding, dilation, padding_mode: str = "zeros", groups: int = 1) -> ConvGeometry:
    """A :class:`ConvGeometry` from a convolution's arguments, ``padding`` as ints, ``"valid"`` or ``"same"``
    (torch's "same" puts the odd pixel of an even total padding after)."""
    kernel = _per_dim(kernel, len(kernel))
    dims = len(kernel)
    stride, dilation = _per_dim(stride, dims), _per_dim(dilation, dims)
    if padding == "valid":
        pads = tuple((0, 0) for _ in kernel)
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = tuple((total // 2, total - total // 2) for total in totals)
    else:
        pads = tuple((p, p) for p in _per_dim(padding, dims))
    return ConvGeometry(kernel, stride, dilation, pads, padding_mode, int(groups))


def module_geometry(module: nn.Module) -> ConvGeometry | str:
    """The geometry of an ``nn.Conv1d``/``nn.Conv2d``, or why its input is not unfolded here."""
    if isinstance(module, nn.Conv3d) or not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return f"{type(module).__name__} inputs are not unfolded (Conv1d and Conv2d are)"
    return geometry(module.kernel_size, module.stride, module.padding, module.dilation, module.padding_mode,
                    module.groups)


_ATEN = torch.ops.aten
CONV_OPS = (_ATEN.conv1d.default, _ATEN.conv2d.default, _ATEN.conv1d.padding, _ATEN.conv2d.padding,
            _ATEN.convolution.default)


def op_geometry(op, arguments: dict, weight: torch.Tensor) -> ConvGeometry | str:
    """The geometry of an aten convolution from its arguments by name (defaults filled), or why not."""
    if weight.dim() not in (3, 4):
        return f"{weight.dim() - 2}-D convolution inputs are not unfolded (1-D and 2-D are)"
    if arguments.get("transposed", False):
        return "transposed convolution"
    return geometry(tuple(weight.shape[2:]), arguments.get("stride", 1), arguments.get("padding", 0),
                    arguments.get("dilation", 1), groups=arguments.get("groups", 1))
