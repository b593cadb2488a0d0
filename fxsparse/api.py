"""The public entry points: compile, load."""
from __future__ import annotations

import difflib
import functools
import gc
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from .context import CompileContext
from .copying import unshare_parameters
from .errors import BadArgumentError, PlanMismatchError
from .graph_utils import iter_tensors
from .inplace import apply_result, replay_gathers
from .inputs import describe_inputs, inputs_from_description, normalize_example_inputs
from .lower import modules_to_lower
from .metrics import Costs, count_macs
from .pass_manager import Pass, PassManager
from .plan import Plan
from .report import Report
from .serialize import PLAN_FILE, REPORT_FILE, load_module, save_module
from .trace import Traced, prepare_model, trace_module
from .verify import check_tolerance, verify_equivalent

log = logging.getLogger("fxsparse")


@dataclass
class CompileResult:
    module: fx.GraphModule
    report: Report
    plan: Plan
    args: tuple
    kwargs: dict

    def save(self, path: str | Path) -> Path:
        """Write the compiled module, its plan and its report to one file that :func:`fxsparse.load` reads."""
        path = Path(path)
        extra = {PLAN_FILE: self.plan.to_json(), REPORT_FILE: self.report.to_json()}
        fmt = save_module(self.module, path, self.args, self.kwargs, extra)
        log.info("fxsparse: saved %s (%s)", path, fmt)
        return path


def resolve_passes(passes: Any) -> list[Pass]:
    """Pass objects from what the user wrote: instances, pass classes that need no arguments, or names of passes
    (``"Prune"`` or ``"prune"``) with default settings."""
    from fxsparse.passes import pass_class

    if isinstance(passes, (str, Pass, dict)) or not isinstance(passes, Iterable):
        raise BadArgumentError(f"passes must be a list of passes or pass names, e.g. ['prune', 'shrink'], "
                               f"not {type(passes).__name__}")
    resolved: list[Pass] = []
    for index, p in enumerate(list(passes)):
        if isinstance(p, Pass):
            resolved.append(p)
        elif isinstance(p, str):
            resolved.append(_build_pass(pass_class(p, f"passes[{index}]"), index))
        elif isinstance(p, type) and issubclass(p, Pass):
            resolved.append(_build_pass(p, index))
        else:
            raise BadArgumentError(f"passes[{index}] is {p!r}: give a pass object or a pass name")
    return resolved


def _build_pass(cls: type[Pass], index: int) -> Pass:
    """``cls()``, or a BadArgumentError naming the arguments it cannot do without."""
    required = [name for name, parameter in inspect.signature(cls).parameters.items()
                if parameter.default is parameter.empty and parameter.kind not in (parameter.VAR_POSITIONAL,
                                                                                      parameter.VAR_KEYWORD)]
    if required:
        arguments = ", ".join(f"{name}=..." for name in required)
        raise BadArgumentError(f"passes[{index}] is the class {cls.__name__}, which needs {', '.join(required)}: "
                               f"give an instance, {cls.__name__}({arguments})")
    return cls()


def _verifier(tolerance: float | str | None):
    def verify(ctx: CompileContext, p: Pass) -> dict[str, Any]:
        return verify_equivalent(ctx.reference, ctx.module, ctx.args, ctx.kwargs, tolerance=tolerance, what=p.name,
                                 known=ctx.reference_outputs)

    return verify


def _collector_paused(function: Callable) -> Callable:
    """Run ``function`` with Python's cyclic garbage collector paused, and collect the young generation once after.

    A compile makes tens of thousands of short-lived objects (graph nodes, module copies); the automatic collections
    they trigger now and then scan every object the process holds, torch's own included, which cost up to a third
    of a ResNet-50 compile. Everything made while paused stays in the young generation, so one collection of it at
    the end frees the compile's cyclic garbage (discarded graph modules and their tensors) in a few milliseconds.
    """
    @functools.wraps(function)
    def paused(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()
            gc.collect(0)

    return paused


@_collector_paused
def compile(  # noqa: A001 - the name users expect, as in torch.compile
    model: torch.nn.Module,
    example_inputs: Any = None,
    passes: Sequence[Any] = (),
    *,
    example_kwargs: dict | None = None,
    frontend: str = "auto",
    verify: bool = True,
    tolerance: float | str | None = "auto",
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict | None = None,
    inplace: bool = False,
    lower_modules: bool = True,
) -> CompileResult:
    """Trace ``model`` and run ``passes`` over it.

    Every pass that rewrites the model is followed, when ``verify`` is on, by a comparison of the rewritten module
    with its reference on random inputs shaped like ``example_inputs``; a relative difference above ``tolerance``
    raises :class:`~fxsparse.errors.VerificationError` (``"auto"``: 1e-4, or what the output dtype's precision
    allows for float16 and bfloat16 models, see :func:`fxsparse.verify.tolerance_for`). The user's model is never
    modified, unless ``inplace``: then its own modules are resized to compute what ``result.module`` computes
    (same classes and attribute names, so its training loop, ``generate()`` and ``save_pretrained()`` keep
    working); if that fails the model is left as it was, buffers included.

    ``lower_modules``: first rewrite the modules the op-rule table cannot see into (nn.MultiheadAttention) as ops it
    can, so that the attention heads inside them can be pruned (see :mod:`fxsparse.lower`). A lowered module no longer
    maps onto the user's own module tree, so ``inplace=True`` keeps them whole, and a plan that prunes inside one
    fits the compiled module only.
    """
    from fxsparse.passes import PROVIDERS

    pass_list = resolve_passes(passes)
    check_tolerance(tolerance)
    args, kwargs = normalize_example_inputs(example_inputs, example_kwargs)
    _check_values_available(model, args, kwargs, pass_list)
    prepared = prepare_model(model)
    traced = trace_module(prepared, args, kwargs, frontend, leaf_modules, concrete_args)
    ctx = CompileContext(traced.module, traced.frontend, args, kwargs, verify=verify)
    ctx.plan.model = type(model).__name__
    ctx.plan.frontend = traced.frontend
    own = set(model.state_dict())  # not the tensors tracing makes (torch.tensor(2.0) in a forward)
    ctx.plan.shapes_before = {n: list(t.shape) for n, t in traced.module.state_dict().items() if n in own}
    ctx.plan.inputs = describe_inputs(args, kwargs)
    if traced.shapes:
        ctx.facts["traced_shapes"] = traced.shapes
    macs = traced.macs if traced.macs is not None else count_macs(traced.module, args, kwargs)
    before = Costs(traced.module, args, kwargs, macs=macs)  # counted now, before any pass changes the module
    ctx.traced_macs = macs
    lowering, notes = _lowering(traced, lower_modules, inplace)
    manager = PassManager(lowering + pass_list, PROVIDERS, _verifier(tolerance) if verify else None)
    records = manager.run(ctx, progress=lambda name: log.info("fxsparse: %s", name))
    for record_pass in manager.passes:
        ctx.plan.record_pass(record_pass.name, record_pass.settings())
    ctx.plan.shapes_after = _planned_shapes(ctx.module, own, ctx.plan)
    if not inplace:  # in place, the model takes the compiled module's tensors, those it shares included
        unshare_parameters(ctx.module, model)
    after = Costs(ctx.module, args, kwargs)
    report = Report(type(model).__name__, traced.frontend, before, after, records, traced.notes + notes)
    result = CompileResult(ctx.module, report, ctx.plan, args, kwargs)
    if inplace:
        apply_result(model, result.module, result.plan, args, kwargs, tolerance)
    return result


def _planned_shapes(module: torch.nn.Module, own: set[str], plan: Plan) -> dict[str, list[int]]:
    """Shapes of the compiled module's tensors that a fresh model has or gets from the plan: the model's own, and
    those a pass made and recorded (a folded bias, the parts of a lowered module); not the constants tracing made."""
    made = {record["name"] for record in plan.folds}
    lowered = tuple(f"{path}." for path in plan.extra.get("lowered", []))
    return {n: list(t.shape) for n, t in module.state_dict().items()
            if n in own or n in made or n.rpartition(".")[0] in made or (lowered and n.startswith(lowered))}


def _check_values_available(model: Any, args: tuple, kwargs: dict, pass_list: list[Pass]) -> None:
    """A BadArgumentError when a pass must read values the meta device does not hold (analyses need only shapes)."""
    wanting = [p.name for p in pass_list if p.needs_values or p.rewrites]
    if not wanting:
        return
    if any(t.device.type == "meta" for t in iter_tensors((args, kwargs))):
        where = "example_inputs are"
    elif isinstance(model, torch.nn.Module) and any(t.device.type == "meta"
                                                    for t in (*model.parameters(), *model.buffers())):
        where = "the model's parameters are"
    else:
        return
    raise BadArgumentError(f"{where} on the meta device, which holds shapes but no values: {', '.join(wanting)} "
                           "must read values; build the model on a real device (shape inference and "
                           "dependency_groups run on meta)")


def _lowering(traced: Traced, lower_modules: bool, inplace: bool) -> tuple[list[Pass], list[str]]:
    """LowerModules, to run first, when the traced graph calls modules it lowers; else a note on why they stay
    whole (an export graph calls no modules: torch.export has already taken them apart)."""
    from fxsparse.passes import LowerModules

    count = len(modules_to_lower(traced.module))
    if not count:
        return [], []
    if lower_modules and not inplace:
        return [LowerModules()], []
    why = "inplace=True resizes the model's own modules" if inplace else "lower_modules=False"
    return [], [f"{count} nn.MultiheadAttention kept whole ({why}): the attention heads inside are not pruned"]


def prune(model: torch.nn.Module, example_inputs: Any = None, keep: float = 0.8, **options: Any) -> CompileResult:
    """Structured pruning in one call, keeping ``keep`` of each group's channels (msModelSlim's convention).

    ``options`` go to :class:`fxsparse.passes.Prune` (importance, scope, ratios, ignore, round_to, prune_heads,
    steps, calibration, loss_fn) and to :func:`compile` (example_kwargs, frontend, verify, inplace...).
    """
    from fxsparse.passes import Prune, Shrink

    if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise BadArgumentError(f"keep must be a fraction in (0, 1], got {keep!r}")
    compile_options = {k: options.pop(k) for k in list(options) if k in _COMPILE_OPTIONS}
    prune_options = [name for name in inspect.signature(Prune).parameters if name not in ("ratio", "step")]
    for name in options:
        if name == "ratio":
            raise BadArgumentError("fxsparse.prune() takes keep, the fraction of channels kept (keep = 1 - ratio), "
                                   "not ratio")
        if name not in prune_options:
            close = difflib.get_close_matches(name, [*prune_options, *_COMPILE_OPTIONS], n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise BadArgumentError(f"fxsparse.prune() got an unknown option {name!r}; {hint}it takes keep, "
                                   f"{', '.join(prune_options)} and compile's {', '.join(_COMPILE_OPTIONS)}")
    return compile(model, example_inputs, [Prune(ratio=1.0 - keep, **options), Shrink()], **compile_options)


_COMPILE_OPTIONS = ("example_kwargs", "frontend", "verify", "tolerance", "leaf_modules", "concrete_args", "inplace",
                    "lower_modules")


def plan_masks(plan: Plan) -> dict[str, torch.Tensor]:
    """Masks that keep exactly the plan's indices of every recorded tensor (rows and columns alike)."""
    masks = {}
    for name, dims in plan.kept.items():
        shape = plan.shapes_before[name]
        mask = torch.ones(shape, dtype=torch.bool)
        for dim, kept in dims.items():
            alive = torch.zeros(shape[dim], dtype=torch.bool)
            alive[kept] = True
            view = [1] * len(shape)
            view[dim] = shape[dim]
            mask &= alive.reshape(view)
        masks[name] = mask
    return masks


def apply_plan(model: torch.nn.Module, plan: Plan | str | Path, example_inputs: Any = None,
               example_kwargs: dict | None = None) -> torch.nn.Module:
    """Give a fresh instance of the planned model the plan's architecture, in place (msModelSlim's
    prune_by_desc), so a pruned, permuted or grown checkpoint loads into it; returns ``model``.

    A plan that removes channels is replayed through masks and Shrink; one that reorders or repeats them (channel
    permutation, width growth) by applying its recorded gathers and scales to the model's own tensors, then checked
    against the model as it was (the function is unchanged).

    The plan is checked first (:meth:`Plan.validate`): an index out of range, repeated or out of order, a count
    that disagrees with ``shapes_after``, or a parameter the plan expects but the model lacks, or of another
    shape, is a :class:`PlanMismatchError` naming it, before the model is touched. The model's own weights are kept at the plan's indices.
    """
    from fxsparse.passes import MaskPropagation, Shrink

    if not isinstance(plan, Plan):
        if not isinstance(plan, (str, Path)):
            raise BadArgumentError(f"plan must be a fxsparse.Plan or a path to a plan file, not {type(plan).__name__}")
        plan = Plan.load(plan)
    if not isinstance(model, torch.nn.Module):
        raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    plan.validate(model)
    if example_inputs is None and example_kwargs is None:
        args, kwargs = inputs_from_description(plan.inputs)
    else:
        args, kwargs = normalize_example_inputs(example_inputs, example_kwargs)
    weight_masks = _weight_masks_for(model, plan)  # checked before anything changes
    early = plan.masks_before_shrink()
    params = dict(model.named_parameters())
    dense = {name: params[name].detach().clone() for name in early}
    try:
        _multiply(params, plan.sparsity_masks(final=False), early)
        if plan.is_permutation_or_growth:  # a reorder or a repeat keeps the function: replay the gathers
            replay_gathers(model, plan, args, kwargs)
        elif plan.is_structural or not plan.masks:
            masks = {name: mask for name, mask in plan_masks(plan).items() if name in params}
            result = compile(model, args, [MaskPropagation(masks), Shrink()], example_kwargs=kwargs,
                             frontend=plan.frontend or "auto", lower_modules=False)
            apply_result(model, result.module, plan, args, kwargs)
    except Exception:
        with torch.no_grad():
            for name, value in dense.items():
                params[name].copy_(value)
        raise
    _multiply(dict(model.named_parameters()), weight_masks, set(weight_masks) - early)
    return model


def _multiply(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], names: set[str]) -> None:
    with torch.no_grad():
        for name in names:
            params[name].mul_(masks[name])


def _weight_masks_for(model: torch.nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """The plan's weight-sparsity masks, each checked against the model's parameter (PlanMismatchError)."""
    params = dict(model.named_parameters())
    masks = plan.sparsity_masks()
    for name, keep in masks.items():
        if name not in params:
            raise PlanMismatchError(f"the plan masks {name!r}, which is not a parameter of the model")
        if list(keep.shape) != plan.shapes_after.get(name, list(keep.shape)):
            raise PlanMismatchError(f"the plan's mask for {name!r} has shape {list(keep.shape)}, the planned "
                                    f"parameter {plan.shapes_after[name]}")
    return masks


def permute_channels(model: torch.nn.Module, example_inputs: Any = None, pattern: str = "2:4",
                     optimizers: Sequence[torch.optim.Optimizer] = (), *, example_kwargs: dict | None = None,
                     companions: dict[str, list[torch.Tensor]] | None = None, **options: Any) -> CompileResult:
    """Reorder ``model``'s channels in place so that ``pattern`` (N:M) sparsity keeps more magnitude, without
    changing what it computes (verified). The same Parameter objects are written, so ``optimizers`` keep working,
    and their state (momentum, Adam's moments) is reordered with the weights, as is every tensor in
    ``companions[param name]``. ``options`` go to :class:`fxsparse.passes.ChannelPermutation` (consumers, seed,
    kicks). Returns the compile result (its report and plan say what moved)."""
    from fxsparse.passes import ChannelPermutation

    from .inplace import permute_in_place

    result = compile(model, example_inputs, [ChannelPermutation(pattern, **options)], example_kwargs=example_kwargs,
                     lower_modules=False)
    permute_in_place(model, result.plan, tuple(optimizers), companions)
    return result


def load(path: str | Path) -> torch.nn.Module:
    """Load a module saved by ``CompileResult.save``; its plan is at ``module.fxsparse_plan`` when present."""
    module, extra = load_module(path)
    if PLAN_FILE in extra:
        module.fxsparse_plan = Plan.from_dict(extra[PLAN_FILE])
    return module


def expand_width(model: torch.nn.Module, example_inputs: Any = None, factor: float | None = 2,
                 optimizer: torch.optim.Optimizer | None = None, **options: Any) -> CompileResult:
    """Grow ``model`` in place with :class:`fxsparse.passes.ExpandWidth` (same function, wider), and keep
    ``optimizer`` working on it.

    ``options`` go to ExpandWidth (kinds, include, exclude, split, seed, like) and to :func:`compile`
    (example_kwargs, frontend, verify, tolerance...). With an optimizer, every parameter replaced by a wider one is
    swapped in its parameter group, and its state is gathered by the same index maps as the weight: a copy's
    momentum / Adam first moment is scaled by the copy's share where the weight was (a consumer's columns), the
    second moment by the share squared, so an SGD step moves the copies by their shares of the original step and
    their sum moves as the original would; step counts and learning rates stay.
    """
    from fxsparse.growth.optim import remap_optimizer
    from fxsparse.passes import ExpandWidth

    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise BadArgumentError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    compile_options = {k: options.pop(k) for k in list(options) if k in _COMPILE_OPTIONS}
    compile_options["inplace"] = True
    expand = ExpandWidth(factor=factor, **options)
    before = dict(model.named_parameters())
    result = compile(model, example_inputs, [expand], **compile_options)
    if optimizer is not None:
        remap_optimizer(optimizer, width_derivations(model, before, result.plan), model.parameters())
    return result


def width_derivations(model: torch.nn.Module, before: dict[str, torch.nn.Parameter], plan: Plan) -> dict:
    """How each parameter a width growth (or a cut) replaced was made from the old one, from the plan's gathers
    and scales (for remap_optimizer)."""
    from fxsparse.growth.optim import Derivation

    derivations = {}
    for name, new in model.named_parameters():
        old = before.get(name)
        if old is None or new is old:
            continue  # a replaced tensor the plan did not re-index (a bias a cut's folding changed) keeps its state
        gather = tuple((dim, torch.tensor(kept, dtype=torch.long)) for dim, kept in plan.kept.get(name, {}).items())
        scales = tuple((dim, torch.tensor(scale)) for dim, scale in plan.scales.get(name, {}).items())
        derivations[new] = Derivation(old, old, 1.0, gather, scales)
    return derivations
