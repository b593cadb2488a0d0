"""Shrink: physically remove the channels a decision removes, and emit a smaller GraphModule.

Removal is the subset case of the one structural rewrite (fxsparse.rewrite.reindex with IndexMap.removal):
parameters are gathered, modules keep their class with their size attributes updated, and graph arguments that hold
sizes are rewritten by each op's rule. What is particular to removal lives here: constants carried by removed
channels are folded into the consumers (fxsparse.residue). The result is checked against the expected shapes of
every node, then against the masked model's outputs by the pass manager's verification.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxsparse.context import CompileContext
from fxsparse.errors import FxsparseError
from fxsparse.graph_utils import get_attr_value, set_attr_value
from fxsparse.index_map import IndexMap
from fxsparse.metrics import count_parameters
from fxsparse.modules import PaddedConstantCorrection
from fxsparse.pass_manager import Pass
from fxsparse.residue import Fold, proving_pays, settle_residues
from fxsparse.rewrite import reindex
from fxsparse.verify import trial_inputs


def layer_owner(node: fx.Node) -> str:
    """The module path a layer node belongs to: its target, or where its weight parameter lives."""
    if node.op == "call_module":
        return node.target
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target.endswith("weight"):
            return arg.target.rpartition(".")[0]
    return ""


def _free_name(gm: fx.GraphModule, wanted: str) -> str:
    """``wanted``, or ``wanted_2``, ``wanted_3``... whichever no attribute of ``gm`` has yet (a layer folded into
    again in a later pruning step gets a second correction beside its first)."""
    candidate, n = wanted, 1
    while True:
        try:
            get_attr_value(gm, candidate)
        except AttributeError:
            return candidate
        n += 1
        candidate = f"{wanted}_{n}"


def _add_to_bias(gm: fx.GraphModule, node: fx.Node, vector: torch.Tensor, bias_index: int) -> str:
    """Add ``vector`` (per output channel, already sliced) to the bias of a linear or conv node; returns the
    bias's name. A bias made here is named like the layer's own (``<layer>.bias``), so state dicts line up with
    the user's module. The bias gets a new tensor: the old one may be shared with the reference model (see
    copy_sharing_tensors)."""
    owner = layer_owner(node)
    with torch.no_grad():
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            old = module.bias if module.bias is not None else torch.zeros_like(vector, dtype=module.weight.dtype)
            module.bias = torch.nn.Parameter(old + vector.to(old.dtype), requires_grad=module.weight.requires_grad)
            return f"{owner}.bias"
        bias = node.args[bias_index] if 0 <= bias_index < len(node.args) else node.kwargs.get("bias")
        if isinstance(bias, fx.Node) and bias.op == "get_attr":
            old = get_attr_value(gm, bias.target)
            new = old + vector.to(old.dtype)
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            set_attr_value(gm, bias.target, new)
            return bias.target
        if bias is not None:
            raise FxsparseError(f"cannot fold a removed channel's constant into {node.name}: its bias is computed")
        if bias_index < 0:
            raise FxsparseError(f"cannot fold a removed channel's constant into {node.name}: it takes no bias")
        name = _free_name(gm, f"{owner}.bias" if owner else "bias")
        set_attr_value(gm, name, torch.nn.Parameter(vector.clone()))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        args = list(node.args) + [None] * max(0, bias_index + 1 - len(node.args))
        args[bias_index] = attr
        node.args = tuple(args)
        return name


def apply_folds(gm: fx.GraphModule, folds: list[Fold], keep: torch.Tensor,
                node_labels: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Fold every constant into its consumer; returns report rows and plan records ({owner, kind, name})."""
    nodes = {n.name: n for n in gm.graph.nodes}
    rows, records = [], []
    for fold in folds:
        node = nodes[fold.consumer.node]
        out_labels = node_labels[node.name][fold.out_dim]
        alive = torch.nonzero(keep[out_labels]).flatten()
        owner = layer_owner(node)
        if fold.correction is None:
            name = _add_to_bias(gm, node, fold.vector.index_select(0, alive), fold.consumer.bias_index)
            rows.append({"node": node.name, "folded": "bias", "max |constant|": f"{fold.vector.abs().max():.3g}"})
            records.append({"owner": owner, "kind": "bias", "name": name})
            continue
        # inside the layer it corrects (<layer>.border_correction), as the in-place model holds it too
        name = _free_name(gm, f"{owner}.border_correction" if owner else f"{node.name}_border_correction")
        gm.add_submodule(name, PaddedConstantCorrection(fold.correction.index_select(0, alive), *fold.conv_args))
        records.append({"owner": owner, "kind": "correction", "name": name})
        source = node.args[0]
        with gm.graph.inserting_after(node):
            correction = gm.graph.call_module(name, (source,))
        with gm.graph.inserting_after(correction):
            total = gm.graph.call_function(torch.add, (node, correction))
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        rows.append({"node": node.name, "folded": "border-exact correction",
                     "max |constant|": f"{fold.correction.abs().max():.3g}"})
    return rows, records


class Shrink(Pass):
    """Remove the channels ``ctx.facts["removal"]`` names; the masked model is the reference it must match."""

    name = "Shrink"
    requires = ("groups", "removal")
    rewrites = True

    def run(self, ctx: CompileContext) -> list[dict[str, Any]]:
        facts = ctx.facts["groups"]
        removal = ctx.facts["removal"]
        masked = ctx.module
        analysis = facts.analysis
        removed, empty_notes = analysis.keep_nonempty(removal.units)
        # residues are measured on verification's first trial input, so that its reference output is one run less;
        # without verification, a proof of what removed channels carry saves the run where a run costs more
        trial_args, trial_kwargs = trial_inputs(ctx.args, ctx.kwargs, trials=1)[0]
        removed, keep, folds, notes, output = settle_residues(
            masked, analysis, facts.graph.consumers, removed, trial_args, trial_kwargs, facts.node_labels,
            prove=not ctx.verify and proving_pays(ctx.traced_macs, len(masked.graph.nodes)))
        if output is not None:
            ctx.reference_outputs[0] = output
        notes = empty_notes + notes
        fold_rows, fold_records = [], []

        def fold(new: fx.GraphModule) -> None:
            rows, records = apply_folds(new, folds, keep, facts.node_labels)
            fold_rows.extend(rows)
            fold_records.extend(records)

        new, _ = reindex(masked, facts, IndexMap.removal(analysis, removed), ctx.args, ctx.kwargs, ctx.plan,
                         before_rewrite=fold)
        ctx.plan.folds.extend(fold_records)
        ctx.reference = masked
        ctx.module = new
        gone_flag = analysis.flag(removed)
        rows = []
        for group in facts.groups:
            gone = int(gone_flag[group.units].sum())
            if gone:
                rows.append({"group": group.id, "kind": group.kind, "units": group.size, "removed": gone,
                             "kept": group.size - gone})
        rows += fold_rows
        rows += [{"note": n} for n in notes]
        self._summary = (f"removed {len(removed)} units in {sum(1 for r in rows if 'removed' in r)} groups; "
                         f"{len(fold_rows)} constants folded; params {count_parameters(masked)} -> "
                         f"{count_parameters(new)}")
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        return getattr(self, "_summary", "")
