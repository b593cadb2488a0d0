"""Built-in demo models: small, dependency-free, random weights, and both trace with ``torch.fx.symbolic_trace``.

``BUILTIN_MODELS[name] = (factory, example_inputs_fn)``: ``factory(**options)`` builds the model with fresh random
weights (seed the global RNG for reproducible weights); ``example_inputs_fn(batch_size=2)`` returns an input tensor.

* ``resnet``: a small ResNet-style CNN. A conv/BN/ReLU stem, residual blocks (identity shortcut, and a strided block
  whose shortcut is a 1x1 conv + BN downsample), a two-branch block whose branches are concatenated on the channel
  dimension, global average pooling and a linear head.
* ``transformer``: a small ViT-style transformer. A patch embedding (strided conv), a learned position embedding,
  pre-norm blocks of multi-head self-attention (``nn.Linear`` q/k/v/o, view/transpose/matmul/softmax, or
  ``F.scaled_dot_product_attention`` with ``use_sdpa=True``) and an MLP, with residuals; LayerNorm, mean pooling
  over tokens and a linear head.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadArgumentError

# --------------------------------------------------------------------------------------------------- the CNN


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers and a residual; a 1x1 conv/BN downsample where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ConcatBlock(nn.Module):
    """Two branches (1x1 and 3x3 conv/BN/ReLU) concatenated on channels, then a 1x1 conv/BN that mixes them."""

    def __init__(self, channels: int, branch_channels: int):
        super().__init__()
        self.branch1 = nn.Sequential(
            nn.Conv2d(channels, branch_channels, 1, bias=False), nn.BatchNorm2d(branch_channels), nn.ReLU()
        )
        self.branch3 = nn.Sequential(
            nn.Conv2d(channels, branch_channels, 3, padding=1, bias=False), nn.BatchNorm2d(branch_channels), nn.ReLU()
        )
        self.mix = nn.Conv2d(2 * branch_channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        return self.relu(self.bn(self.mix(branches)) + x)


class SmallResNet(nn.Module):
    """stem -> block -> concat block -> strided blocks with downsample -> global pool -> linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if len(widths) < 2:
            raise BadArgumentError(f"widths must list at least two stage widths, not {widths!r}")
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        stages: list[nn.Module] = [BasicBlock(w0, w0), ConcatBlock(w0, w0 // 2)]
        for previous, width in zip(widths, widths[1:]):
            stages += [BasicBlock(previous, width, stride=2), BasicBlock(width, width)]
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> SmallResNet:
    return SmallResNet(widths=widths, num_classes=num_classes)


def resnet_example_inputs(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32)


# --------------------------------------------------------------------------------------------------- the transformer


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections."""

    def __init__(self, dim: int, heads: int, use_sdpa: bool = False):
        super().__init__()
        if dim % heads:
            raise BadArgumentError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.use_sdpa = use_sdpa
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor, batch, tokens) -> torch.Tensor:
        return x.view(batch, tokens, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.size(0), x.size(1)
        q = self._split_heads(self.q_proj(x), batch, tokens)
        k = self._split_heads(self.k_proj(x), batch, tokens)
        v = self._split_heads(self.v_proj(x), batch, tokens)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, use_sdpa: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallTransformer(nn.Module):
    """Patch embedding -> position embedding -> transformer blocks -> LayerNorm -> mean over tokens -> head."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        use_sdpa: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise BadArgumentError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, use_sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x).mean(dim=1))


def small_transformer(
    dim: int = 64, depth: int = 2, heads: int = 4, num_classes: int = 10, use_sdpa: bool = False
) -> SmallTransformer:
    return SmallTransformer(dim=dim, depth=depth, heads=heads, num_classes=num_classes, use_sdpa=use_sdpa)


def transformer_example_inputs(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32)


# --------------------------------------------------------------------------------------------------- the registry

BUILTIN_MODELS: dict[str, tuple[Callable[..., nn.Module], Callable[..., torch.Tensor]]] = {
    "resnet": (small_resnet, resnet_example_inputs),
    "transformer": (small_transformer, transformer_example_inputs),
}


def build(name: str, batch_size: int = 2, **options) -> tuple[nn.Module, torch.Tensor]:
    """A built-in model (random weights, eval mode) and an example input for it."""
    if name not in BUILTIN_MODELS:
        raise BadArgumentError(f"model {name!r} is not a built-in model; built-in models: {sorted(BUILTIN_MODELS)}")
    factory, example_inputs = BUILTIN_MODELS[name]
    return factory(**options).eval(), example_inputs(batch_size)


__all__ = [
    "BUILTIN_MODELS", "build", "SmallResNet", "SmallTransformer", "small_resnet", "small_transformer",
    "resnet_example_inputs", "transformer_example_inputs",
]
