"""Model size and cost: parameters, bytes, and MACs counted by torch.utils.flop_counter on the meta device."""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (a weight shared by two layers counts once)."""
    return sum(p.numel() for p in module.parameters())


def model_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


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


def count_macs(module: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Multiply-accumulates of one forward pass (FLOPs / 2), or None where torch cannot count this model.

    Runs on meta tensors first (fast); graphs that pin a device (torch.export writes ``aten.to(device='cpu')``)
    run on fake tensors instead. Neither touches real memory.
    """
    for runner in (_run_on_meta, _run_on_fake):
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.no_grad():
                runner(module, args, kwargs)
        except Exception:  # noqa: BLE001 - try the next runner; "n/a" in the report if none works
            continue
        return counter.get_total_flops() // 2
    return None


def _run_on_meta(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    with on_meta(module):
        module(*to_meta(args), **to_meta(kwargs))


def _run_on_fake(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    with mode:
        module(*[fake(a) for a in args], **{k: fake(v) for k, v in kwargs.items()})


def describe(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, int | None]:
    return {
        "parameters": count_parameters(module),
        "macs": count_macs(module, args, kwargs),
        "bytes": model_bytes(module),
    }
