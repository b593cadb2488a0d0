"""Taking values out of a model while it runs: items of its output, module outputs, graph node values.

- **Outputs.** :func:`pick` takes item ``index`` of a tensor (index 0 is the tensor itself), a tuple or list, a dict
  or a Hugging Face ModelOutput (its items in order, the ones that are None left out, as ``to_tuple()`` gives them;
  a string index is a key).
- **Modules.** :class:`ModuleCapture` puts a forward hook on each named module and keeps every output the module
  gives during one forward, so a module called several times can be picked by call index. The hooks record only while
  the distillation forward runs, so a student handed back by ``get_student_model()`` carries no captured tensors.
- **Graph nodes.** :class:`GraphCapture` traces the model (``fxsparse.trace``'s frontends; a ``torch.fx.GraphModule``,
  such as a compiled ``result.module``, is used as it is) and runs a copy of its graph that also returns the named
  nodes' values. The copy shares the model's parameters, so training through it trains the model.
"""
from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..graph_utils import get_attr_value, placeholder_values, set_attr_value
from ..trace import trace_module
from .config import DistillConfigError


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with {len(value)} item(s) {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def pick(value: Any, index: int | str, where: str) -> torch.Tensor:
    """Item ``index`` of ``value`` (see the module docstring); DistillConfigError naming ``where`` if there is none."""
    if isinstance(value, torch.Tensor):
        items: list = [value]
    elif isinstance(value, Mapping):
        if isinstance(index, str):
            if index not in value or value[index] is None:
                raise DistillConfigError(f"{where}: no key {index!r} in {_describe(value)}")
            return value[index]
        items = [v for v in value.values() if v is not None]
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise DistillConfigError(f"{where}: cannot take item {index!r} of {_describe(value)}")
    if isinstance(index, str):
        raise DistillConfigError(f"{where}: {index!r} is a key, but the value is {_describe(value)}")
    if index >= len(items):
        raise DistillConfigError(f"{where}: index {index} is out of range for {_describe(value)}")
    item = items[index]
    if not isinstance(item, torch.Tensor):
        raise DistillConfigError(f"{where}: item {index} is {_describe(item)}, not a tensor")
    return item


def find_module(model: torch.nn.Module, name: str, where: str) -> torch.nn.Module:
    """The submodule ``name`` of ``model``; DistillConfigError with the closest names if there is none."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise DistillConfigError(f"{where}: {type(model).__name__} has no module {name!r}{hint}")


class ModuleCapture:
    """Forward hooks on named modules of one model; ``outputs[name]`` lists the module's outputs in call order."""

    def __init__(self, model: torch.nn.Module, names: dict[str, str], side: str):
        """``names``: module name -> the config field that named it (for error messages)."""
        self.side = side
        self.recording = False
        self.outputs: dict[str, list[Any]] = defaultdict(list)
        self.handles = []
        modules = {name: find_module(model, name, where) for name, where in names.items()}  # all found, or no hook
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            if self.recording:
                self.outputs[name].append(output)

        return record

    @contextmanager
    def record(self):
        """Record the outputs of one forward; the previous forward's are dropped."""
        self.outputs.clear()
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def value(self, name: str, call: int | None, where: str) -> Any:
        calls = self.outputs.get(name, [])
        if not calls:
            raise DistillConfigError(
                f"{where}: the {self.side}'s module {name!r} did not run in the forward (in a torch.fx GraphModule "
                "only leaf modules are called: name a leaf module, or a graph node with a *_node key)")
        if call is None:
            if len(calls) > 1:
                raise DistillConfigError(f"{where}: the {self.side}'s module {name!r} ran {len(calls)} times in one "
                                         f"forward; pick one call with the *_call_idx key (0 to {len(calls) - 1})")
            return calls[0]
        if call >= len(calls):
            raise DistillConfigError(f"{where}: call index {call} is out of range: the {self.side}'s module "
                                     f"{name!r} ran {len(calls)} time(s) in one forward")
        return calls[call]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class GraphCapture(torch.nn.Module):
    """A model's traced graph, run with the values of some of its nodes returned too.

    Calling it returns ``(the model's output, {node name: value})``. A graph from ``torch.export`` takes its inputs
    flattened and fixes their shapes: such a capture runs at the example inputs' shapes only.
    """

    def __init__(self, model: torch.nn.Module, nodes: dict[str, str], args: tuple, kwargs: dict, side: str):
        """``nodes``: node name -> the config field that named it (for error messages)."""
        super().__init__()
        traced = model if isinstance(model, fx.GraphModule) else trace_module(model, args, kwargs).module
        _share_tensors(traced, model, side)
        by_name = {node.name: node for node in traced.graph.nodes}
        for name, where in nodes.items():
            if name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise DistillConfigError(f"{where}: the {side}'s traced graph has no node {name!r}{hint}")
        self.names = list(nodes)
        self.node_targets = {name: (by_name[name].op, by_name[name].target) for name in nodes}
        self.flat_inputs = getattr(traced.graph._codegen, "pytree_info", None) is not None
        self.out_spec = traced.graph._codegen.pytree_info.out_spec if self.flat_inputs else None
        self.traced = traced
        graph = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        output = graph.graph_copy(traced.graph, copies)
        graph.output((output, tuple(copies[by_name[name]] for name in self.names)))
        self.graph_module = fx.GraphModule(traced, graph)

    def forward(self, *args, **kwargs):
        output, values = self.graph_module(*placeholder_values(self.traced, args, kwargs))
        if self.out_spec is not None:
            output = pytree.tree_unflatten(list(output), self.out_spec)
        return output, dict(zip(self.names, values))


def _share_tensors(traced: fx.GraphModule, model: torch.nn.Module, side: str) -> None:
    """Make every parameter and buffer of ``traced`` the model's own tensor of that name, so that training through
    the graph trains the model; DistillConfigError if the graph holds a parameter the model has none of."""
    if traced is model:
        return
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in [*traced.named_parameters(remove_duplicate=False),
                         *traced.named_buffers(remove_duplicate=False)]:
        if name not in own:
            if isinstance(tensor, torch.nn.Parameter):
                raise DistillConfigError(f"the {side}'s traced graph has a parameter {name!r} the {side} has none "
                                         "of; capture its values by module name instead")
            continue
        if get_attr_value(traced, name) is not own[name]:
            set_attr_value(traced, name, own[name])
