"""Rearranging the children of a container (nn.Sequential, nn.ModuleList, or the plain modules a GraphModule
keeps): dropping blocks (a depth cut), inserting copies that compute the identity (a depth growth).

The same rearrangement serves a user's own model, in place (the trainer; Hugging Face configs, ``layer_idx`` and
``layer_types`` kept consistent), and a GraphModule, whose graph is then rewired to call the copies
(``rewire_graph``, used by ``passes.ExpandDepth``).
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import BadArgumentError
from ..graph_utils import get_attr_value, set_attr_value
from .blocks import Block
from .identity import IdentityRecipe
from .optim import Derivation

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Copy:
    """A new block: a copy of the container's child ``source`` (its index before the rearrangement), made to
    compute the identity by ``recipe`` (None: a plain copy, which does not preserve the function)."""

    source: int
    recipe: IdentityRecipe | None = None


Layout = list  # of int (a child kept, by its index before) or Copy, in the new order


def _container(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


def _configs(root: torch.nn.Module) -> dict[int, object]:
    """Config objects the modules point to, shared with copies rather than copied."""
    return {id(v): v for m in root.modules() for k, v in vars(m).items() if k == "config"}


def numbered_children(parent: torch.nn.Module, container: str) -> tuple[str, dict[int, torch.nn.Module]]:
    """The children of ``parent`` by number, and the stem their names share ("" or e.g. "encoder_layer_")."""
    names = [re.fullmatch(r"((?:[A-Za-z_]*_)?)(\d+)", key) for key in parent._modules]
    stems = {match.group(1) for match in names if match}
    if not names or None in names or len(stems) != 1:
        raise BadArgumentError(f"{container or 'the model'}: only children named by one stem and a number "
                               f"(0, 1, ... or layer_0, layer_1, ...) can be rearranged, not {list(parent._modules)}")
    return stems.pop(), {int(match.group(2)): module for match, module in zip(names, parent._modules.values())}


def _fresh(value: torch.Tensor, fill: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full_like(value, fill), value.requires_grad)


def rearrange_children(root: torch.nn.Module, container: str, layout: Layout) -> dict[torch.nn.Parameter, Derivation]:
    """Give ``root``'s container the children of ``layout``, renumbered 0..n-1; returns how each new parameter was
    made. Parameters of kept children stay the same objects; changed ones get new tensors, never written into."""
    parent = _container(root, container)
    stem, children = numbered_children(parent, container)
    shared = _configs(root)
    derivations: dict[torch.nn.Parameter, Derivation] = {}
    new_children: list[torch.nn.Module] = []
    for position, entry in enumerate(layout):
        if not isinstance(entry, Copy):
            new_children.append(children[entry])
            continue
        if position == 0:
            raise BadArgumentError(f"{container}: a new block must follow another block")
        source = children[entry.source]
        made = copy.deepcopy(source, dict(shared))
        for (name, old), (_, new) in zip(source.named_parameters(), made.named_parameters()):
            derivations[new] = Derivation(old, old)
        if entry.recipe is not None:
            _silence(made, entry.recipe, derivations)
        new_children.append(made)
    _chain_post_norms(layout, new_children, derivations)
    old_count = len(children)
    parent._modules = OrderedDict((f"{stem}{i}", m) for i, m in enumerate(new_children))
    _update_hf_counts(root, parent, layout, old_count)
    return derivations


def _silence(block: torch.nn.Module, recipe: IdentityRecipe, derivations: dict) -> None:
    """Zero the copy's residual branches (and reset its inner norms, post-norm) in its own fresh tensors."""
    with torch.no_grad():
        for name in recipe.zero:
            param = get_attr_value(block, name)
            param.zero_()
            derivations[param].scale = 0.0
        for weight, bias in recipe.inner_norms:
            for name, fill in ((weight, 1.0), (bias, 0.0)):
                param = get_attr_value(block, name)
                param.fill_(fill)
                derivations[param].source = None


def _chain_post_norms(layout: Layout, children: list[torch.nn.Module], derivations: dict) -> None:
    """Post-norm copies: the norm of the block before a chain of copies hands its affine to the chain's last copy,
    and it and every other copy of the chain get gamma=1, beta=0."""
    position = 0
    while position < len(layout):
        entry = layout[position]
        end = position + 1
        while end < len(layout) and isinstance(layout[end], Copy):
            end += 1
        recipe = layout[position + 1].recipe if end > position + 1 else None
        if recipe is not None and recipe.post_norm and not isinstance(entry, Copy):
            head, chain = children[position], children[position + 1:end]
            for name, fill in zip(recipe.last_norm, (1.0, 0.0)):
                old = get_attr_value(head, name)
                derivations.pop(get_attr_value(chain[-1], name))
                set_attr_value(chain[-1], name, torch.nn.Parameter(old.detach().clone(), old.requires_grad))
                derivations[get_attr_value(chain[-1], name)] = Derivation(old, old)
                for block in [head, *chain[:-1]]:
                    previous = get_attr_value(block, name)
                    derivations.pop(previous, None)
                    set_attr_value(block, name, _fresh(previous, fill))
                    derivations[get_attr_value(block, name)] = Derivation(None, old)
        position = end


def _update_hf_counts(root: torch.nn.Module, parent: torch.nn.Module, layout: Layout, old_count: int) -> None:
    """A Hugging Face model's config counts its layers and may list their types; attention modules know their index."""
    config = getattr(root, "config", None)
    if config is None or not any(getattr(config, name, None) == old_count for name in _LAYER_COUNTS):
        return
    for name in _LAYER_COUNTS:
        if getattr(config, name, None) == old_count:
            setattr(config, name, len(layout))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == old_count:
        config.layer_types = [types[e.source if isinstance(e, Copy) else e] for e in layout]
    for index, block in enumerate(parent.children()):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = index


# -- the graph of a GraphModule -------------------------------------------------------------------------------------


def _renumber(path: str, prefix: str, positions: dict[int, int]) -> str:
    if not path.startswith(prefix):
        return path
    index, dot, tail = path[len(prefix):].partition(".")
    if not index.isdigit() or int(index) not in positions:
        return path
    return f"{prefix}{positions[int(index)]}{dot}{tail}"


def _rename_node(node: fx.Node, rename) -> None:
    if node.op in ("get_attr", "call_module"):
        node.target = rename(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = type(stack)((rename(k), (rename(v[0]), *v[1:])) for k, v in stack.items())


def rewire_graph(gm: fx.GraphModule, container: str, stem: str, layout: Layout, blocks: dict[int, Block],
                 stream_inputs: dict[int, fx.Node]) -> None:
    """Make ``gm``'s graph call the children ``rearrange_children`` gave its container: existing nodes renumbered,
    each copy's nodes inserted after the block before it, its residual input that block's output.

    ``blocks`` and ``stream_inputs``: the analysed blocks of the container by their index before, for every block
    that is copied or that a copy follows.
    """
    prefix = f"{container}.{stem}" if container else stem
    positions = {entry: p for p, entry in enumerate(layout) if not isinstance(entry, Copy)}
    outputs = {index: block.output for index, block in blocks.items()}
    for node in list(gm.graph.nodes):
        _rename_node(node, lambda path: _renumber(path, prefix, positions))
    chains: list[tuple[int, list[int]]] = []  # (a kept block, the positions of the copies following it)
    for position, entry in enumerate(layout):
        if isinstance(entry, Copy):
            chains[-1][1].append(position)
        else:
            chains.append((entry, []))
    # last chain first: a copy's residual input is its source's input node, which growing an earlier chain
    # would replace by that chain's last copy
    for head, copies in reversed(chains):
        previous_output = outputs.get(head)
        if copies and previous_output is None:
            raise BadArgumentError(f"{container}.{head} hands no single output on: no block can follow it")
        for position in copies:
            entry = layout[position]
            moves = {positions[entry.source]: position}
            rename = lambda path, moves=moves: _renumber(path, prefix, moves)  # noqa: E731
            previous_output = _copy_block(gm, blocks[entry.source], stream_inputs[entry.source], previous_output,
                                          rename)
    gm.graph.lint()
    gm.recompile()


def _copy_block(gm: fx.GraphModule, block: Block, stream_input: fx.Node, after: fx.Node, rename) -> fx.Node:
    """Copy ``block``'s nodes after ``after`` (its residual input replaced by ``after``); returns the copy's output."""
    env: dict[fx.Node, fx.Node] = {stream_input: after}
    output = block.output
    anchor = after
    made: set[fx.Node] = set()
    for node in block.nodes:
        with gm.graph.inserting_after(anchor):
            new = gm.graph.node_copy(node, lambda n: env.get(n, n))
        _rename_node(new, rename)
        env[node] = anchor = new
        made.add(new)
    new_output = env[output]
    after.replace_all_uses_with(new_output, delete_user_cb=lambda user: user not in made)
    return new_output
