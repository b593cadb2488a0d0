"""Masks that survive training, on torch's own hooks, until the user removes them.

``keeper = keep_masks(model, masks, optimizer)`` makes the pruned entries of every masked weight stay zero:

- a gradient hook on each masked parameter (``Tensor.register_hook``) zeroes the gradient of pruned entries, before
  it is accumulated (and, under DistributedDataParallel, before it is all-reduced);
- an optimizer step post-hook (``Optimizer.register_step_post_hook``) multiplies the masks into the weights after
  every step, whatever the optimizer does (momentum, Adam's moments, weight decay);
- the optimizer's per-parameter state (momentum buffers, Adam moments) is zeroed at pruned entries when the masks
  are attached or change, so nothing stored from dense training pushes a pruned weight.

``before_forward=True`` also re-applies the masks before every forward (PaddleSlim's way, for loops where no
optimizer is given). ``keeper.remove()`` takes every hook away. Nothing is renamed and no buffer is added, so the
model's ``state_dict()`` loads into a fresh dense model with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from fxsparse.errors import MaskError


class MaskKeeper:
    """Keeps ``{parameter name: bool keep-mask}`` on ``model``'s weights; see the module's docstring."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor],
                 optimizers: Iterable[torch.optim.Optimizer] = (), *, mask_gradients: bool = True,
                 before_forward: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise MaskError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        params = dict(model.named_parameters())
        self._entries: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            if name not in params:
                raise MaskError(f"mask names {name!r}, which is not a parameter of the model")
            if tuple(mask.shape) != tuple(params[name].shape):
                raise MaskError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                                f"{tuple(params[name].shape)}")
            keep = mask if mask.dtype == torch.bool else mask != 0
            self._entries.append((name, params[name], keep.to(params[name].device)))
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        if mask_gradients:
            for _, param, mask in self._entries:
                self._handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
        if before_forward:
            self._handles.append(model.register_forward_pre_hook(lambda module, args: self.apply()))
        self.apply()
        for optimizer in optimizers:
            self.attach(optimizer)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The optimizers whose steps keep the masks."""
        return tuple(self._optimizers)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: mask for name, _, mask in self._entries}

    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskKeeper":
        """Keep the masks through ``optimizer``'s steps too."""
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))
        self._zero_state(optimizer)
        return self

    def apply(self) -> None:
        """Multiply the masks into the weights now."""
        with torch.no_grad():
            for _, param, mask in self._entries:
                param.mul_(mask)

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace some or all masks (same shapes) and apply them; the hooks see the new ones."""
        own = self.masks
        for name, mask in masks.items():
            if name not in own:
                raise MaskError(f"mask names {name!r}, which this keeper does not hold")
            own[name].copy_(mask if mask.dtype == torch.bool else mask != 0)
        self.apply()
        for optimizer in self._optimizers:
            self._zero_state(optimizer)

    def _zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for _, param, mask in self._entries:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.mul_(mask)

    def remove(self) -> None:
        """Stop keeping the masks: every hook is removed; the weights stay as they are."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizers.clear()


def masks_from_zeros(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``{parameter: weight != 0}`` for ``names`` (default: every parameter with a zero entry)."""
    params = dict(model.named_parameters())
    chosen = list(names) if names is not None else [n for n, p in params.items() if bool((p == 0).any())]
    return {name: params[name].detach() != 0 for name in chosen}


def keep_masks(model: torch.nn.Module, masks: Any = None, optimizer: torch.optim.Optimizer | None = None,
               **options: Any) -> MaskKeeper:
    """Keep ``masks`` on ``model`` through training: ``{parameter: mask}``, a :class:`fxsparse.Plan` whose
    ``masks`` a Sparsify pass recorded, or None for the zeros the weights have now. See :class:`MaskKeeper`."""
    from fxsparse.plan import Plan

    if masks is None:
        masks = masks_from_zeros(model)
    elif isinstance(masks, Plan):
        masks = masks.sparsity_masks()
    return MaskKeeper(model, masks, [optimizer] if optimizer is not None else [], **options)
