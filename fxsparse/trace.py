"""Frontends: turn an nn.Module into a torch.fx GraphModule.

``symbolic`` runs torch.fx.symbolic_trace and keeps every nn.Module leaf as a ``call_module`` node, which lets the
rewriting passes swap in smaller modules of the same class. ``export`` runs torch.export (non-strict) and yields a
graph of aten ops with parameters as ``get_attr`` nodes; it takes models symbolic tracing cannot (Hugging Face
transformers, data-dependent Python). ``auto`` tries symbolic first, then export, and records why it fell back.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from .copying import copy_sharing_tensors, unshare_parameters
from .errors import BadArgumentError, TraceError
from .inputs import normalize_example_inputs
from .metrics import shape_and_count_macs
from .shapes import propagate_shapes

FRONTENDS = ("auto", "symbolic", "export")


@dataclass
class Traced:
    """A traced model: the graph, the frontend that produced it, the inputs it was traced with."""

    module: fx.GraphModule
    frontend: str
    args: tuple
    kwargs: dict
    notes: list[str] = field(default_factory=list)
    shapes: str = ""  # how every node already carries its value ("export", "meta", "fake"), "" if none does
    macs: int | None = None  # counted while shaping the nodes on meta, or None

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
    gm = fx.GraphModule(tracer.root, graph, name)
    if concrete_args:
        _default_to_concrete_values(gm, model, concrete_args)
    return gm


def _default_to_concrete_values(gm: fx.GraphModule, model: torch.nn.Module, concrete_args: dict) -> None:
    """symbolic_trace keeps a concrete argument as a placeholder with the forward's *original* default and asserts
    it equals the concrete value, so a call that leaves it out fails. Make the concrete value the default."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(parameters):
        return
    changed = False
    for parameter, node in zip(parameters, placeholders):
        value = concrete_args.get(parameter.name, inspect.Parameter.empty)
        if value is None or isinstance(value, (bool, int, float, str)):
            node.args = (value,)
            changed = True
    if changed:
        gm.recompile()


def _trace_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    # A failed torch.export prints the partial graph to stderr; the TraceError says what failed in one line, so
    # that print is dropped. What a successful export writes is passed on.
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    sys.stderr.write(captured.getvalue())
    return program.module()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line}"[:300]


def _shapes(args: tuple, kwargs: dict) -> str:
    describe = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
    parts = [str(describe(a)) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def check_signature(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """BadArgumentError unless ``model.forward`` accepts ``(*args, **kwargs)``."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to check here
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise BadArgumentError(
            f"example_inputs ({_shapes(args, kwargs)}) do not fit {type(model).__name__}.forward{signature}: {error}"
        ) from None


def check_inputs_run(gm: fx.GraphModule, name: str, args: tuple, kwargs: dict) -> tuple[str, int | None]:
    """BadArgumentError when the traced model cannot run on the example inputs (a wrong shape, dtype...).

    The check is shape inference itself (meta tensors, then fake tensors: no real memory), whose values stay on the
    nodes for ShapeInference to reuse; only when it fails is the model run for real, and only if that fails too are
    the inputs blamed. (Symbolic tracing never runs the model, so without this check wrong inputs would surface
    later, in the middle of some pass.) Returns how the nodes were shaped ("meta" or "fake", or "" when only the
    real run worked) and, when on meta, the MACs counted in the same run. ``gm.forward`` is called rather than
    ``gm`` because GraphModule.__call__ prints a traceback to stderr on every failure.
    """
    try:
        return "meta", shape_and_count_macs(gm, args, kwargs)
    except Exception:  # noqa: BLE001 - a meta kernel is missing: fake tensors run more
        pass
    try:
        return propagate_shapes(gm, args, kwargs), None
    except Exception:  # noqa: BLE001 - some ops have neither a meta nor a fake kernel: only a real run can tell
        pass
    try:
        with torch.no_grad():
            gm.forward(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise BadArgumentError(
            f"example_inputs ({_shapes(args, kwargs)}): the traced {name} fails on them with {_first_line(error)}; "
            "check their shapes and dtypes (and, for a symbolic trace, concrete_args for non-tensor arguments)"
        ) from None
    return "", None


@contextlib.contextmanager
def cache_disabled(model: torch.nn.Module):
    """Run ``model`` the way it is pruned: without a Hugging Face key/value cache.

    A model built from a default config (``use_cache=True``) returns a ``DynamicCache`` that torch.export cannot
    take as an output, and that no pruning pass uses. Inside this context ``model.config.use_cache`` is False; it
    is restored on the way out. Yields a note for the report when it changed anything, else None.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield None
        return
    config.use_cache = False
    try:
        yield ("traced without the key/value cache (config.use_cache=False on fxsparse's copy), as models are "
               "pruned: the compiled module returns no past_key_values")
    finally:
        config.use_cache = True


def prepare_model(model: Any) -> torch.nn.Module:
    """A private eval-mode copy of ``model``: fxsparse never changes the user's module unless asked to.

    The copy shares the model's parameters (passes put new tensors in place of those they change, never write into
    one), so it costs no memory for the weights; its buffers are its own, since a forward may update them. A
    compile gives its result its own copy of what is still shared at the end (``unshare_parameters``)."""
    if not isinstance(model, torch.nn.Module):
        raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    return copy_sharing_tensors(model, buffers=False).eval()


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
    check_signature(model, args, kwargs)
    with cache_disabled(model) as cache_note:
        traced, failures = _trace_with_frontends(model, args, kwargs, frontend, leaf_modules, concrete_args)
    if traced is not None:
        traced.notes += [cache_note] if cache_note else []
        return traced
    whole_fails_symbolic = frontend != "export" or not _traces_symbolically(model, leaf_modules, concrete_args)
    raise TraceError(f"could not trace {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n" + _HINT
                     + (_submodule_hint(model) if whole_fails_symbolic else ""))


def _traces_symbolically(model: torch.nn.Module, leaf_modules=(), concrete_args=None) -> bool:
    try:
        _trace_symbolic(model, leaf_modules, concrete_args)
    except Exception:  # noqa: BLE001 - it does not: that is all this asks
        return False
    return True


def _submodule_hint(model: torch.nn.Module, tries: int = 4) -> str:
    """Where a model does not trace whole (a detector taking a list of images, data-dependent heads), a part of it
    often does: name the largest child that traces symbolically (of the ``tries`` largest; tracing runs nothing),
    to be compiled in place inside the model."""
    total = sum(p.numel() for p in model.parameters())
    children = sorted(((sum(p.numel() for p in child.parameters()), name, child)
                       for name, child in model.named_children()), key=lambda item: -item[0])
    for count, name, child in children[:tries]:
        if not count:
            break
        if not _traces_symbolically(child):
            continue
        return (f"\nOr prune a part that traces, in place inside the model: fxsparse.compile(model.{name}, "
                f"its_inputs, passes, inplace=True) (model.{name} holds {count / total:.0%} of the parameters; "
                "see 'Models that do not trace whole' in the README)")
    return ""


def _trace_with_frontends(model, args, kwargs, frontend, leaf_modules,
                          concrete_args) -> tuple[Traced | None, list[str]]:
    """The first frontend that traces ``model``, or None and why each failed."""
    failures: list[str] = []
    if frontend in ("auto", "symbolic"):
        try:
            gm = _trace_symbolic(model, leaf_modules, concrete_args)
        except Exception as error:  # noqa: BLE001 - any tracing failure is reported, then export is tried
            failures.append(f"symbolic: {_first_line(error)}")
        else:
            shapes, macs = check_inputs_run(gm, type(model).__name__, args, kwargs)
            return Traced(gm, "symbolic", args, kwargs, shapes=shapes, macs=macs), failures
    if frontend in ("auto", "export"):
        try:
            gm = _trace_export(model, args, kwargs)
            notes = [f"fell back to export ({f})" for f in failures]
            return Traced(gm, "export", args, kwargs, notes=notes, shapes="export"), failures
        except Exception as error:  # noqa: BLE001
            failures.append(f"export: {_first_line(error)}")
    return None, failures


_HINT = (
        "What to try: frontend='export' for models with Python control flow (Hugging Face models need it); "
        "leaf_modules=[SomeModule] to keep an untraceable submodule whole; concrete_args={...} to fix a "
        "non-tensor argument; or wrap the model in a Module whose forward takes and returns tensors only."
)


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
    traced = trace_module(prepared, args, kwargs, frontend, leaf_modules, concrete_args)
    unshare_parameters(traced.module, model)
    return traced
