"""Repeated blocks on the graph: runs of consecutive same-structure children of a container (ResNet's
``layer1.1, layer1.2``, a transformer's ``encoder.layer.0 .. 11``).

Every node carries the module path it runs in (``node.meta["nn_module_stack"]``, which both the symbolic and the
export frontend record; a ``get_attr`` node is placed by its target). A block is a child ``<container>.<index>``;
its nodes form a small labelled graph (op, module class, parameter shapes, relative parameter names), and blocks
are compared with networkx: Weisfeiler-Lehman hashes to group them, a labelled isomorphism check to confirm
that neighbours really are the same.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from ..graph_utils import get_attr_value, node_shape

_INDEX = re.compile(r"^(?:(.*)\.)?((?:[A-Za-z_]*_)?)(\d+)$")  # container, stem, index: "layers.3", "encoder_layer_3"


@dataclass
class Block:
    """One child ``<container>.<stem><index>`` (the stem is empty in nn.Sequential and nn.ModuleList, and
    ``encoder_layer_`` in torchvision's ViT) and the graph nodes that run inside it (get_attr nodes included)."""

    container: str
    index: int
    stem: str = ""
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def path(self) -> str:
        return child_path(self.container, self.stem, self.index)

    @property
    def output(self) -> fx.Node | None:
        """The one node whose value leaves the block, or None when there are several (or none)."""
        inside = set(self.nodes)
        leaving = [n for n in self.nodes if n.op != "get_attr" and any(u not in inside for u in n.users)]
        return leaving[0] if len(leaving) == 1 else None

    def relative(self, target: str) -> str:
        return target[len(self.path) + 1:]


@dataclass
class BlockRun:
    """Consecutive children of one container with the same structure: ``indices`` in order."""

    container: str
    indices: list[int]
    structure: str  # the Weisfeiler-Lehman hash every block of the run shares
    stem: str = ""

    def paths(self) -> list[str]:
        return [child_path(self.container, self.stem, i) for i in self.indices]


def child_path(container: str, stem: str, index: int) -> str:
    return f"{container}.{stem}{index}" if container else f"{stem}{index}"


def module_paths(node: fx.Node) -> list[str]:
    """The module paths ``node`` runs in, outermost first."""
    if node.op in ("get_attr", "call_module") and not node.meta.get("nn_module_stack"):
        parts = node.target.split(".")
        return [".".join(parts[:k]) for k in range(1, len(parts) + (node.op == "call_module"))]
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values()]


def blocks_of(gm: fx.GraphModule) -> dict[str, Block]:
    """Every child-of-a-container block the graph's nodes run in, by path, nodes in graph order.

    A node a rewrite made without a module stack (LowerModules' attention ops) runs where its inputs all run."""
    blocks: dict[str, Block] = {}
    paths_of: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        paths = paths_of[node] = module_paths(node)
        if not paths and node.op in ("call_function", "call_method"):
            inputs = [paths_of[n] for n in node.all_input_nodes if n.op not in ("get_attr", "placeholder")]
            paths = paths_of[node] = [p for p in inputs[0] if all(p in other for other in inputs)] if inputs else []
        for path in paths:
            match = _INDEX.match(path)
            if match is None:
                continue
            block = blocks.get(path)
            if block is None:
                block = blocks[path] = Block(match.group(1) or "", int(match.group(3)), match.group(2))
            if not block.nodes or block.nodes[-1] is not node:
                block.nodes.append(node)
    return blocks


def _label(gm: fx.GraphModule, block: Block, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        shapes = [tuple(p.shape) for p in module.parameters(recurse=True)]
        return f"module:{type(module).__name__}:{block.relative(node.target)}:{shapes}"
    if node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        return f"attr:{block.relative(node.target)}:{shape}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op}:{target}:{node_shape(node)}"


def block_graph(gm: fx.GraphModule, block: Block) -> nx.DiGraph:
    """The block's nodes as a labelled networkx graph (edges between nodes of the block only)."""
    graph = nx.DiGraph()
    inside = set(block.nodes)
    for node in block.nodes:
        graph.add_node(node.name, label=_label(gm, block, node))
    for node in block.nodes:
        for arg in node.all_input_nodes:
            if arg in inside:
                graph.add_edge(arg.name, node.name)
    return graph


def _same(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    matcher = nx.algorithms.isomorphism.DiGraphMatcher(a, b, node_match=lambda x, y: x["label"] == y["label"])
    return matcher.is_isomorphic()


def find_block_runs(gm: fx.GraphModule, min_length: int = 2) -> list[BlockRun]:
    """Runs of at least ``min_length`` consecutive children of a container whose graphs are isomorphic (same ops,
    module classes, parameter names and shapes). Outermost containers win: a block inside a block of a run is not
    reported separately."""
    blocks = blocks_of(gm)
    by_container: dict[tuple[str, str], list[Block]] = {}
    for block in blocks.values():
        by_container.setdefault((block.container, block.stem), []).append(block)
    runs: list[BlockRun] = []
    for (container, stem), members in by_container.items():
        members.sort(key=lambda b: b.index)
        graphs = [block_graph(gm, b) for b in members]
        with warnings.catch_warnings():  # networkx 3.5 notes that its directed hashes changed: ours are not stored
            warnings.simplefilter("ignore", UserWarning)
            hashes = [nx.weisfeiler_lehman_graph_hash(g, node_attr="label") for g in graphs]
        start = 0
        for end in range(1, len(members) + 1):
            continues = (end < len(members) and members[end].index == members[end - 1].index + 1
                         and hashes[end] == hashes[start] and _same(graphs[end - 1], graphs[end]))
            if continues:
                continue
            if end - start >= min_length:
                runs.append(BlockRun(container, [b.index for b in members[start:end]], hashes[start], stem))
            start = end
    run_paths = [p for run in runs for p in run.paths()]
    return [run for run in runs if not any(run.container.startswith(p + ".") or run.container == p
                                           for p in run_paths)]
