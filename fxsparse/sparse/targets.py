"""Which weights a sparsity pattern can go on, and how each is laid out (see :mod:`fxsparse.sparse.patterns`).

Linear-like layers are found in an eager module by class (``module_targets``, what ASP and the training-time
pruners use), and in a traced graph by what uses each parameter (``graph_targets``): a ``call_module`` of a Linear,
Conv or Hugging Face Conv1D, or, in an export graph, the aten op that reads it (``linear``, ``convolution``,
``addmm``, ``mm``). A weight that something else also reads (a tied embedding) or that two layouts disagree on is
not a target, and is reported with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from fxsparse.errors import BadArgumentError


@dataclass(frozen=True)
class WeightTarget:
    """A weight a pattern may go on: its parameter name, layout, owning module and that module's class."""

    param: str
    layout: str
    module: str
    module_type: str
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()  # other names of the same tensor (a weight shared by several layers)


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def layout_of_module(module: torch.nn.Module) -> str | None:
    """The layout of ``module.weight`` if the module is linear-like, else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "conv"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
            and getattr(module, "nf", None) == weight.shape[1]:
        return "in_out"  # Hugging Face's GPT-2 Conv1D: weight [in, out], y = x @ W + b
    return None


def module_targets(model: torch.nn.Module) -> list[WeightTarget]:
    """The weight of every linear-like module of ``model``, once each (a shared module is listed once)."""
    targets, seen = [], set()
    for name, module in model.named_modules():
        layout = layout_of_module(module)
        weight = getattr(module, "weight", None)
        if layout is None or not isinstance(weight, torch.nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        param = f"{name}.weight" if name else "weight"
        targets.append(WeightTarget(param, layout, name, type_name(type(module)), tuple(weight.shape)))
    return targets


_ATEN = torch.ops.aten
# op -> (index of the weight argument, layout)
_WEIGHT_OPS: dict[Any, tuple[int, str]] = {
    _ATEN.linear.default: (1, "linear"),
    torch.nn.functional.linear: (1, "linear"),
    _ATEN.conv1d.default: (1, "conv"),
    _ATEN.conv2d.default: (1, "conv"),
    _ATEN.conv3d.default: (1, "conv"),
    _ATEN.convolution.default: (1, "conv"),
    torch.nn.functional.conv1d: (1, "conv"),
    torch.nn.functional.conv2d: (1, "conv"),
    torch.nn.functional.conv3d: (1, "conv"),
    _ATEN.addmm.default: (2, "in_out"),
    torch.addmm: (2, "in_out"),
    _ATEN.mm.default: (1, "in_out"),
    _ATEN.matmul.default: (1, "in_out"),
    torch.matmul: (1, "in_out"),
}


def _owner_type(node: fx.Node) -> str:
    """The class of the innermost module an export node was traced in (its ``nn_module_stack``), as text."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _path, cls = list(stack.values())[-1]
    return type_name(cls) if isinstance(cls, type) else str(cls)


def graph_targets(gm: fx.GraphModule) -> tuple[list[WeightTarget], dict[str, str]]:
    """The linear-like weights of a traced graph, and ``{parameter: why it is not one}`` for weights that a
    linear-like use and something else both read.

    A tensor known by several names (a tied weight: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is
    one weight, under its first name, and the uses of every name count."""
    params = dict(gm.named_parameters())
    canonical = {}  # every name of a parameter -> its first name
    first_of = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        canonical[name] = first_of.setdefault(id(param), name)
    uses: dict[str, list[tuple[str, str]]] = {}  # parameter -> [(layout, module type)]
    other: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            layout = layout_of_module(module)
            name = canonical.get(f"{node.target}.weight")
            if layout and name:
                uses.setdefault(name, []).append((layout, type_name(type(module))))
        elif node.op == "get_attr" and node.target in canonical:
            name = canonical[node.target]
            for user in node.users:
                layout = _layout_of_use(user, node, params[name])
                if layout is None:
                    other.setdefault(name, f"{_describe(user)} (as {node.target})")
                else:
                    uses.setdefault(name, []).append((layout, _owner_type(user)))
    targets, skipped = [], {}
    for param, found in uses.items():
        layouts = {layout for layout, _ in found}
        aliases = [n for n, c in canonical.items() if c == param and n != param]
        label = f"{param} (= {', '.join(aliases)})" if aliases else param
        if param in other:
            skipped[label] = f"also read by {other[param]}"
        elif len(layouts) > 1:
            skipped[label] = f"used with layouts {sorted(layouts)}"
        else:
            module = param.rsplit(".", 1)[0] if "." in param else ""
            targets.append(WeightTarget(param, found[0][0], module, found[0][1], tuple(params[param].shape),
                                        tuple(aliases)))
    return targets, skipped


def _layout_of_use(user: fx.Node, weight: fx.Node, value: torch.Tensor) -> str | None:
    spec = _WEIGHT_OPS.get(user.target) if user.op == "call_function" else None
    if spec is None:
        return None
    index, layout = spec
    if len(user.args) <= index or user.args[index] is not weight:
        return None
    if user.target is _ATEN.convolution.default and len(user.args) > 6 and user.args[6]:
        return None  # a transposed convolution: its weight is [in, out / groups, *k]
    if layout == "in_out" and value.dim() != 2:
        return None
    return layout


def _describe(node: fx.Node) -> str:
    target = node.target
    return f"{node.op} {getattr(target, '__name__', target)}"


def select(targets: Iterable[WeightTarget], include: Sequence[Any] = (), exclude: Sequence[Any] = ()
           ) -> tuple[list[WeightTarget], dict[str, str]]:
    """Targets that ``include`` names (all when empty) and ``exclude`` does not; ``{param: why}`` for the rest.

    An entry is a module-name prefix (``"encoder.layer.0"``, matched at dots), a module class, or a class name."""
    check_selectors("include", include)
    check_selectors("exclude", exclude)
    chosen, left_out = [], {}
    for target in targets:
        if include and not any(_matches(target, entry) for entry in include):
            left_out[target.param] = "not in include"
        elif any(_matches(target, entry) for entry in exclude):
            left_out[target.param] = "excluded"
        else:
            chosen.append(target)
    return chosen, left_out


def check_selectors(option: str, entries: Sequence[Any]) -> None:
    for entry in entries:
        if not isinstance(entry, (str, type)):
            raise BadArgumentError(f"{option} entries are module-name prefixes or module classes, not {entry!r}")


def _matches(target: WeightTarget, entry: str | type) -> bool:
    if isinstance(entry, type):
        return target.module_type == type_name(entry) or target.module_type.rsplit(".", 1)[-1] == entry.__name__
    if entry == "" or target.module == entry or target.module.startswith(entry + "."):
        return True
    return target.module_type.rsplit(".", 1)[-1] == entry


@dataclass(frozen=True)
class Eligibility:
    """The default filter of which weights take a pattern, like apex's: linear-like layouts, inputs divisible by
    M (and rows too for transposable), and minimum sizes (apex: 8 rows and 16 inputs for N:M; none for
    unstructured unless given). ``Sparsify(eligible=Eligibility(min_inputs=64))`` changes it; a callable
    ``fn(target, pattern) -> reason or None`` replaces it."""

    layouts: tuple[str, ...] = ("linear", "conv", "in_out")
    min_rows: int | None = None
    min_inputs: int | None = None

    def __call__(self, target: WeightTarget, pattern) -> str | None:
        from .patterns import NM, matrix_shape

        if target.layout not in self.layouts:
            return f"layout {target.layout} not in {self.layouts}"
        rows, inputs = matrix_shape(target.shape, target.layout)
        structured = isinstance(pattern, NM)
        min_rows = self.min_rows if self.min_rows is not None else (8 if structured else 0)
        min_inputs = self.min_inputs if self.min_inputs is not None else (16 if structured else 0)
        out = target.shape[1] if target.layout == "in_out" else target.shape[0]
        if out < min_rows or inputs < min_inputs:
            return f"smaller than the minimum ({out} outputs, {inputs} inputs; minimum {min_rows} and {min_inputs})"
        return pattern.unfit(target.shape, target.layout)


def eligible(targets: Iterable[WeightTarget], pattern, rule: Callable | None = None
             ) -> tuple[list[WeightTarget], dict[str, str]]:
    rule = rule or Eligibility()
    chosen, left_out = [], {}
    for target in targets:
        reason = rule(target, pattern)
        if reason:
            left_out[target.param] = reason
        else:
            chosen.append(target)
    return chosen, left_out
