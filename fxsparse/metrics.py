"""Model size and cost: parameters, bytes, and MACs counted by torch.utils.flop_counter on the meta device."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .meta import on_meta, to_meta
from .shapes import run_on_meta


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (a weight shared by two layers counts once)."""
    return sum(p.numel() for p in module.parameters())


def model_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def count_macs(module: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Multiply-accumulates of one forward pass (FLOPs / 2), or None where torch cannot count this model.

    Runs on meta tensors: a GraphModule through fxsparse.shapes' meta interpreter (device pins moved to meta, a
    repeated layer's ops dispatched once with the FLOPs the counter saw the first time added for the others), any
    other module as it is; what meta kernels cannot run goes on fake tensors. Neither touches real memory.
    """
    runners = ((_run_graph_on_meta,) if isinstance(module, fx.GraphModule) else ()) + (_run_on_meta, _run_on_fake)
    for runner in runners:
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.no_grad():
                unseen_flops = runner(module, args, kwargs, counter)
        except Exception:  # noqa: BLE001 - try the next runner; "n/a" in the report if none works
            continue
        return (counter.get_total_flops() + unseen_flops) // 2
    return None


def _run_graph_on_meta(module: fx.GraphModule, args: tuple, kwargs: dict, counter: FlopCounterMode) -> int:
    return run_on_meta(module, args, kwargs, counter=counter, keep_values=False)


def _run_on_meta(module: torch.nn.Module, args: tuple, kwargs: dict, counter: FlopCounterMode) -> int:
    with on_meta(module):
        module(*to_meta(args), **to_meta(kwargs))
    return 0


def _run_on_fake(module: torch.nn.Module, args: tuple, kwargs: dict, counter: FlopCounterMode) -> int:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    with mode:
        module(*[fake(a) for a in args], **{k: fake(v) for k, v in kwargs.items()})
    return 0


def shape_and_count_macs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """Give every node of ``gm`` its meta value (as :func:`fxsparse.shapes.propagate_shapes` does on meta) and
    count the MACs in the same run; raises where a meta kernel is missing."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unseen_flops = run_on_meta(gm, args, kwargs, counter=counter)
    return (counter.get_total_flops() + unseen_flops) // 2


LATER = object()  # Costs' MACs not counted yet


class Costs(Mapping):
    """A module's ``parameters``, ``bytes`` and ``macs``, read like a dict.

    MACs known already (counted while shaping the traced graph) are given; otherwise they are counted when first
    read, on the module held until then: a meta-device forward of ResNet-50 costs a tenth of a whole compile, and a
    compile's result is often used without its report being read. The module must then keep its architecture.
    """

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict, macs: Any = LATER):
        self._values: dict[str, Any] = {"parameters": count_parameters(module), "bytes": model_bytes(module)}
        self._pending = (module, args, kwargs) if macs is LATER else None
        if macs is not LATER:
            self._values["macs"] = macs  # None where torch cannot count this model

    def __getitem__(self, key: str) -> Any:
        if key == "macs" and self._pending is not None:
            self._values["macs"] = count_macs(*self._pending)
            self._pending = None
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(("parameters", "macs", "bytes"))

    def __len__(self) -> int:
        return 3
