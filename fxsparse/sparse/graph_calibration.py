"""Sequential calibration on a torch.fx GraphModule (what ``fxsparse.compile`` hands a pass).

A compiled graph has no callable blocks (its submodules are plain attribute holders), so it is run node by node
for every calibration example in lockstep: when the sweep reaches the first op that multiplies by a target weight,
every example's input to it is already computed; the criterion's statistics are gathered from them, the weight is
pruned in place, and the sweep goes on with the pruned weight. Each layer is thus calibrated on the outputs of
every already-pruned layer before it (a finer order than the reference's block at a time), and only one layer's
statistics and the values live across the current op (one block's working set, freed after their last use, as
``torch.fx.Interpreter`` does) are held at any time.

Recognised weight uses: a Linear/Conv1D/Conv1d/Conv2d ``call_module`` (symbolic graphs), and ``aten.linear``
(weight ``(out, in)``), ``aten.addmm``/``aten.mm`` (``x @ W``, weight ``(in, out)``) and the 1-D/2-D aten
convolutions on a ``get_attr`` weight (export graphs). A convolution's input is unfolded into rows (see
:mod:`.conv_rows`); a transposed or 3-D convolution is not a target, nor is a weight with any other use
(a tied embedding); :func:`uncalibrated` says why.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from tqdm.auto import tqdm

from ..graph_utils import placeholder_values
from .calibration_targets import LinearTarget, module_target, selected
from .conv_rows import CONV_OPS, op_geometry

aten = torch.ops.aten
# op: (index of the input argument, index of the weight argument, weight stored (in, out))
WEIGHT_USES = {
    aten.linear.default: (0, 1, False),
    aten.addmm.default: (1, 2, True),
    aten.mm.default: (0, 1, True),
    **{op: (0, 1, False) for op in CONV_OPS},
}


def graph_targets(gm: fx.GraphModule, include=None, exclude=None, only=None) -> dict[fx.Node, LinearTarget]:
    """``{node whose input is calibrated: target}`` for every selected Linear-like weight of ``gm``, at its first
    use."""
    return _scan(gm, include, exclude, only)[0]


def uncalibrated(gm: fx.GraphModule, names) -> dict[str, str]:
    """``{weight name: why}`` for the weights of ``names`` that the calibration cannot take as targets."""
    found, reasons = _scan(gm, None, None, set(names))
    calibrated = {target.name for target in found.values()}
    return {name: reasons.get(name, "not read by a Linear-like layer or 1-D/2-D convolution alone")
            for name in names if name not in calibrated}


def _scan(gm: fx.GraphModule, include, exclude, only) -> tuple[dict[fx.Node, LinearTarget], dict[str, str]]:
    modules = dict(gm.named_modules())
    found: dict[fx.Node, LinearTarget] = {}
    reasons: dict[str, str] = {}
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            name = f"{node.target}.weight"
            target = module_target(name, modules[node.target])
            if target is None or name in seen or not selected(name, include, exclude, only):
                continue
            seen.add(name)
            if isinstance(target, str):
                reasons[name] = target
            else:
                found[node] = target
        elif node.op == "get_attr" and node.target not in seen and selected(node.target, include, exclude, only):
            target = _weight_target(gm, node)
            if isinstance(target, str):
                reasons[node.target] = target
            elif target is not None:
                found[target[0]] = target[1]
                seen.add(node.target)
    return found, reasons


def _weight_target(gm: fx.GraphModule, weight_node: fx.Node) -> tuple[fx.Node, LinearTarget] | str | None:
    """The first op using a ``get_attr`` weight and its target, if every use of the weight is Linear-like (why not,
    for a convolution that is not unfolded)."""
    uses = []
    for user in weight_node.users:
        form = WEIGHT_USES.get(user.target) if user.op == "call_function" else None
        if form is None or len(user.args) <= form[1] or user.args[form[1]] is not weight_node:
            return None
        uses.append((user, form))
    if not uses or not _is_parameter(gm, weight_node.target):
        return None
    parameter = gm.get_parameter(weight_node.target)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    user, (_, _, transposed) = min(uses, key=lambda use: order[use[0]])
    if user.target not in CONV_OPS:
        return (user, LinearTarget(weight_node.target, parameter, transposed)) if parameter.dim() == 2 else None
    geometries = {op_geometry(u.target, normalize_function(u.target, u.args, u.kwargs,
                                                           normalize_to_only_use_kwargs=True).kwargs, parameter)
                  for u, _ in uses}
    if len(geometries) != 1:
        return "used by convolutions of different geometries"
    (conv,) = geometries
    return conv if isinstance(conv, str) else (user, LinearTarget(weight_node.target, parameter, False, None, conv))


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
    except AttributeError:
        return False
    return True


def input_of(node: fx.Node, target: LinearTarget) -> fx.Node:
    """The node whose value ``target``'s weight multiplies at ``node``."""
    if node.op == "call_module":
        return node.args[0]
    return node.args[WEIGHT_USES[node.target][0]]


@torch.no_grad()
def calibrate_graph(gm: fx.GraphModule, samples: list[tuple[tuple, dict]], targets: dict[fx.Node, LinearTarget],
                    statistics: Callable, prune_layers: Callable, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``gm`` on every sample in lockstep, pruning each target just before its first use; returns the masks
    ``prune_layers(name, [target], {name: statistics})`` gives."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=True)
    last_uses = interpreter.user_to_last_uses
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    environments = [dict(zip(placeholders, placeholder_values(gm, args, kwargs))) for args, kwargs in samples]
    masks: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(targets), desc="calibrating layers", unit="layer", disable=not progress)
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        target = targets.get(node)
        if target is not None:
            stats = statistics(target)
            if stats is not None:
                source = input_of(node, target)
                for environment in environments:
                    for rows in target.input_rows(environment[source]):
                        stats.add_batch(rows)
            masks.update(prune_layers(target.name, [target], {target.name: stats}))
            del stats
            bar.set_postfix_str(target.name, refresh=False)
            bar.update()
        if node.op != "placeholder":
            for environment in environments:
                interpreter.env = environment
                environment[node] = interpreter.run_node(node)
        for environment in environments:
            for dead in last_uses.get(node, ()):
                environment.pop(dead, None)
    bar.close()
    return masks
