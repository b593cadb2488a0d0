"""Frontends: turn an nn.Module into a torch.fx GraphModule.

``symbolic`` runs torch.fx.symbolic_trace and keeps every nn.Module leaf as a ``call_module`` node, which lets the
rewriting passes swap in smaller modules of the same class. ``export`` runs torch.export (non-strict) and yields a
graph of aten ops with parameters as ``get_attr`` nodes; it takes models symbolic tracing cannot (Hugging Face
transformers, data-dependent Python). ``auto`` tries symbolic first, then export, and records why it fell back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from .errors import BadArgumentError, TraceError
from .inputs import normalize_example_inputs

FRONTENDS = ("auto", "symbolic", "export")


@dataclass
class Traced:
    """A traced model: the graph, the frontend that produced it, the inputs it was traced with."""

    module: fx.GraphModule
    frontend: str
    args: tuple
    kwargs: dict
    notes: list[str] = field(default_factory=list)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _LeafTracer(fx.Tracer):
    """symbolic_trace's tracer, with extra module classes or names the user wants kept whole."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _trace_symbolic(model: torch.nn.Module, leaf_modules, concrete_args) -> fx.GraphModule:
    tracer = _LeafTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=concrete_args)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _trace_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    return program.module()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line}"[:300]


def prepare_model(model: Any) -> torch.nn.Module:
    """A private eval-mode copy of ``model``: fxsparse never changes the user's module unless asked to."""
    if not isinstance(model, torch.nn.Module):
        raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    return copy.deepcopy(model).eval()


def trace_module(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    frontend: str = "auto",
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict | None = None,
) -> Traced:
    """Trace ``model`` itself (no copy) with already-normalised inputs."""
    if frontend not in FRONTENDS:
        raise BadArgumentError(f"frontend must be one of {FRONTENDS}, not {frontend!r}")
    failures: list[str] = []
    if frontend in ("auto", "symbolic"):
        try:
            gm = _trace_symbolic(model, leaf_modules, concrete_args)
            return Traced(gm, "symbolic", args, kwargs)
        except Exception as error:  # noqa: BLE001 - any tracing failure is reported, then export is tried
            failures.append(f"symbolic: {_first_line(error)}")
    if frontend in ("auto", "export"):
        try:
            gm = _trace_export(model, args, kwargs)
            return Traced(gm, "export", args, kwargs, notes=[f"fell back to export ({f})" for f in failures])
        except Exception as error:  # noqa: BLE001
            failures.append(f"export: {_first_line(error)}")
    hint = (
        "What to try: frontend='export' for models with Python control flow (Hugging Face models need it); "
        "leaf_modules=[SomeModule] to keep an untraceable submodule whole; concrete_args={...} to fix a "
        "non-tensor argument; or wrap the model in a Module whose forward takes and returns tensors only."
    )
    raise TraceError(f"could not trace {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n" + hint)


def trace(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    frontend: str = "auto",
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict | None = None,
) -> Traced:
    """Trace a private eval-mode copy of ``model``; ``Traced.frontend`` says which frontend ran."""
    prepared = prepare_model(model)
    args, kwargs = normalize_example_inputs(example_inputs, example_kwargs)
    return trace_module(prepared, args, kwargs, frontend, leaf_modules, concrete_args)
