"""Small modules fxsparse inserts into rewritten graphs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class PaddedConstantCorrection(nn.Module):
    """What removed, spatially constant input channels contributed to a zero-padded convolution.

    Inside the image such a channel adds a constant to each output channel, which a bias can hold; at the borders
    the zero padding cuts some kernel taps off, so the contribution varies. This module recomputes it exactly, at
    any resolution, as the convolution of a single all-ones channel with the folded kernel
    ``sum_c W[:, c] * value_c``: one input channel, so it costs little next to the convolution it corrects.
    """

    def __init__(self, weight: torch.Tensor, stride, padding, dilation):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.spatial = weight.dim() - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sizes read one by one (no unpacking), so that symbolic tracing can follow this forward too
        size = [1, 1] + [x.shape[-k] for k in range(self.spatial, 0, -1)]
        ones = torch.ones(size, dtype=x.dtype, device=x.device)
        return _CONV[self.spatial](ones, self.weight, None, self.stride, self.padding, self.dilation)


class _BorderCorrected:
    """A convolution that adds what its border corrections (its PaddedConstantCorrection children) compute.

    This is how a correction lives inside the layer it corrects when a model is pruned in place: the layer keeps
    its path, its class's interface (it *is* an ``nn.Conv2d``), its parameter names (``weight``, ``bias``, and
    ``border_correction.weight`` beside them), so the model saves, copies, trains and compiles again like any other.
    Tracing goes through this forward (it is no torch leaf): the graph holds the convolution, each correction's
    call and the add, which the op rules already know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        for correction in self.children():
            out = out + correction(x)
        return out


class BorderCorrectedConv1d(_BorderCorrected, nn.Conv1d):
    """An nn.Conv1d with border corrections (see _BorderCorrected)."""


class BorderCorrectedConv2d(_BorderCorrected, nn.Conv2d):
    """An nn.Conv2d with border corrections (see _BorderCorrected)."""


class BorderCorrectedConv3d(_BorderCorrected, nn.Conv3d):
    """An nn.Conv3d with border corrections (see _BorderCorrected)."""


_CORRECTED = {nn.Conv1d: BorderCorrectedConv1d, nn.Conv2d: BorderCorrectedConv2d, nn.Conv3d: BorderCorrectedConv3d}


def with_border_correction(conv: nn.Module, name: str, correction: PaddedConstantCorrection) -> nn.Module | None:
    """Give ``conv`` (an nn.Conv1d/2d/3d, or one already corrected) ``correction`` as its child ``name``, in place:
    the same object becomes its BorderCorrectedConv subclass, so whoever holds it (an optimizer, a hook, the
    user's own reference) keeps holding the model's layer. Returns it; None when ``conv`` is not a convolution
    this can correct (a subclass with its own forward, a module calling a functional convolution)."""
    if not isinstance(conv, _BorderCorrected):
        cls = _CORRECTED.get(type(conv))
        if cls is None:
            return None
        conv.__class__ = cls
    conv.add_module(name, correction)
    return conv


class DotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a module, so that its attention dropout follows ``train()``/``eval()``
    as nn.MultiheadAttention's does (a functional call would have its dropout frozen into the graph)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale)


class LoweredMultiheadAttention(nn.Module):
    """What an nn.MultiheadAttention becomes once lowered (fxsparse.lower): its q, k and v projections as
    ``q_proj``, ``k_proj``, ``v_proj`` (nn.Linear), its attention as ``attention`` and its own ``out_proj``. The
    graph calls each part; this container has no forward of its own."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, attention: DotProductAttention,
                 out_proj: nn.Linear):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        self.attention, self.out_proj = attention, out_proj
