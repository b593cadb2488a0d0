"""The one structural rewrite: apply an index map (fxsparse.index_map) to a GraphModule.

Every structural pass (Shrink removes, ChannelPermutation reorders, ExpandWidth repeats) ends here:

1. every parameter dimension in a group is gathered by the map (a copy that consumes a channel is scaled by its
   share, so that sums over copies stay what they were);
2. each op's rule rewrites the arguments and module attributes that hold sizes (view shapes, split sizes, slice
   offsets, head counts, conv groups), from the new sizes of the label arrays alone;
3. the new graph's shapes are checked, node by node, against what the map predicts.

The result is a new module (the old one stays the reference the pass manager verifies against), and every gather is
recorded in the plan, composed with earlier ones, so ``apply_plan`` can replay it on a fresh instance.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.fx as fx

from .channels import CONSUME
from .copying import copy_sharing_tensors
from .errors import FxsparseError
from .graph_utils import get_attr_value, set_attr_value
from .index_map import IndexMap
from .plan import Plan
from .rules import rule_for
from .rules.base import RewriteContext
from .shapes import propagate_shapes


class ExpectedShapes:
    """Each node's shape after the map: its old shape, every labelled dim counting its new indices."""

    def __init__(self, old_nodes: dict[str, fx.Node], node_labels: dict[str, Any], index_map: IndexMap):
        self.old_nodes, self.node_labels, self.index_map = old_nodes, node_labels, index_map
        self._sizes: dict[int, int] = {}  # by id: one label array is shared by every node its channels reach

    def of(self, name: str) -> Any:
        """The expected shape of node ``name`` (a tuple of shapes for a tuple output), None when unknown."""
        node = self.old_nodes.get(name)
        return self._shape(node.meta.get("val"), self.node_labels.get(name)) if node is not None else None

    def _shape(self, value: Any, labels: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if labels is None:
                return tuple(value.shape)
            return tuple(self._size(lab) if lab is not None else int(s) for s, lab in zip(value.shape, labels))
        if isinstance(value, (tuple, list)) and isinstance(labels, tuple):
            return tuple(self._shape(v, lab) for v, lab in zip(value, labels))
        return None

    def _size(self, labels: torch.Tensor) -> int:
        size = self._sizes.get(id(labels))
        if size is None:
            size = self._sizes[id(labels)] = int(self.index_map.counts(labels).sum())
        return size


def _actual_shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_actual_shape(v) for v in value)
    return None


def select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(dim, index)``. Along dim 0 it goes through a leading unit dim: torch's CPU kernel
    copies whole inner rows then, which is some 50x faster on a conv or linear weight."""
    if dim == 0:
        return tensor.unsqueeze(0).index_select(1, index).squeeze(0)
    return tensor.index_select(dim, index)


Gathers = dict[str, dict[int, tuple[torch.Tensor, torch.Tensor | None]]]


def gather_along(tensor: torch.Tensor, dims: dict[int, tuple[Any, Any]]) -> torch.Tensor:
    """``tensor`` with each ``dim`` gathered by its (old index per new index, scale per new index or None): one
    re-indexing as an index map or a plan records it (lists or tensors alike)."""
    for dim, (index, scale) in dims.items():
        tensor = select(tensor, dim, torch.as_tensor(index, dtype=torch.long, device=tensor.device))
        if scale is not None:
            view = [1] * tensor.dim()
            view[dim] = len(scale)
            tensor = tensor * torch.as_tensor(scale, dtype=tensor.dtype, device=tensor.device).reshape(view)
    return tensor


def planned_gathers(plan: Plan, name: str) -> dict[int, tuple[list[int], list[float] | None]]:
    """The gathers ``plan`` records for tensor ``name``, in :func:`gather_along`'s form."""
    scales = plan.scales.get(name, {})
    return {dim: (kept, scales.get(dim)) for dim, kept in plan.kept.get(name, {}).items()}


def gather_parameters(gm: fx.GraphModule, members, index_map: IndexMap,
                      aliases: dict[str, list[str]]) -> Gathers:
    """Gather every member tensor by the map; returns, per target and dim, (old index per new index, scale or
    None). A dimension that consumes a copied channel is scaled by the copy's share."""
    gathers: Gathers = defaultdict(dict)
    members = list(members)
    if index_map.only_removes():
        for member, read in zip(members, index_map.kept_positions([member.labels for member in members])):
            if read is not None:
                gathers[member.target][member.dim] = (read, None)
    else:
        for member in members:
            if index_map.is_identity(member.labels):
                continue
            read, share = index_map.gather(member.labels)
            scale = share if CONSUME in member.roles and not bool((share == 1).all()) else None
            gathers[member.target][member.dim] = (read, scale)
    with torch.no_grad():
        for target, dims in gathers.items():
            tensor = get_attr_value(gm, target)
            new = gather_along(tensor, dims)
            if isinstance(tensor, torch.nn.Parameter):  # select made ``new`` a fresh tensor
                new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
            for name in aliases.get(target, [target]):
                set_attr_value(gm, name, new)
    return gathers


def rewrite_nodes(gm: fx.GraphModule, expected: ExpectedShapes) -> None:
    """Let each op's rule update the arguments and module attributes that hold sizes."""
    old_nodes, node_labels, index_map = expected.old_nodes, expected.node_labels, expected.index_map

    def old_shape(n: fx.Node):
        value = old_nodes[n.name].meta.get("val") if n.name in old_nodes else None
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def new_shape(n: fx.Node):
        return expected.of(n.name)

    for node in list(gm.graph.nodes):
        if node.name not in old_nodes or node.op in ("placeholder", "output", "get_attr"):
            continue
        rule = rule_for(node, gm)
        if rule is None:
            continue
        node.meta["val"] = old_nodes[node.name].meta.get("val")
        wc = RewriteContext(node, gm, new_shape, old_shape, index_map.counts, lambda n: node_labels.get(n.name))
        rule.rewrite(wc)


def check_shapes(gm: fx.GraphModule, expected_shapes: ExpectedShapes, args: tuple, kwargs: dict) -> None:
    """Every node of the rewritten graph must have exactly the shape the channel analysis predicts."""
    propagate_shapes(gm, args, kwargs)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        expected = expected_shapes.of(node.name)
        got = _actual_shape(node.meta.get("val"))
        if expected is not None and got is not None and expected != got:
            raise FxsparseError(f"the rewrite produced {node.name} ({node.format_node()[:120]}) of shape {got}, "
                                f"expected {expected}; this op's rule is wrong, please report it")


def reindex(gm: fx.GraphModule, facts, index_map: IndexMap, args: tuple, kwargs: dict, plan: Plan,
            before_rewrite: Callable[[fx.GraphModule], None] | None = None) -> tuple[fx.GraphModule, Gathers]:
    """A new module computing ``gm`` with every group re-indexed by ``index_map`` (``facts``: the channel facts
    of ``gm``, see fxsparse.analysis). ``before_rewrite`` may edit the new module once its parameters are gathered
    (Shrink folds constants there). Gathers are recorded in ``plan``."""
    new = copy_sharing_tensors(gm)
    old_nodes = {n.name: n for n in gm.graph.nodes}
    gathers = gather_parameters(new, facts.graph.members.values(), index_map, facts.graph.aliases)
    if before_rewrite is not None:
        before_rewrite(new)
    expected = ExpectedShapes(old_nodes, facts.node_labels, index_map)
    rewrite_nodes(new, expected)
    new.graph.lint()
    new.recompile()
    check_shapes(new, expected, args, kwargs)
    for target, dims in gathers.items():
        for dim, (read, scale) in dims.items():
            plan.record_kept(target, dim, read.tolist(), scale.tolist() if scale is not None else None)
    return new, gathers
