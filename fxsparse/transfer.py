"""Big-to-small weight transfer (msModelSlim's ``prune_model_weight``): initialise a small model of the same
architecture as a big one (fewer layers, a narrower MLP, fewer attention heads, a narrower residual stream) with
the big model's most important weights.

How it works, and why this way:

1. **Names.** Every tensor of the small model's state dict is paired with one big tensor: the layer index in its
   name (found by ``layer_pattern``) is rewritten through ``layer_id_map`` (small layer -> big layer). A small
   tensor without a big counterpart, of another rank or larger along any dim is an error; so is a big tensor no
   small tensor takes, unless its whole layer is dropped (the report lists dropped layers). Nothing is skipped.
2. **Coupling.** The indices kept along a narrower dim must agree across tensors: an MLP's hidden channels are rows
   of up/gate (fc1) and columns of down (fc2); a head is rows of q, k and v and columns of o; a GQA key/value
   group takes its query heads with it; a residual channel is a column of every input projection and a row of
   every output projection. fxsparse already knows this coupling from its op-rule table: the big model is traced
   and its channel analysis (what DependencyGroups computes) gives the units (channels, heads, KV groups) and, per
   unit, the tensor indices it takes with it. Unlike pruning, units the analysis *fixes* (a residual stream that
   reaches the output or a LayerNorm) may be chosen too: the small model is a new model, not a function-preserving
   rewrite of the big one.
3. **Counts.** How many units of a group go follows from the shapes: a dim that one group decides shrinks by
   (units removed) x (indices per unit). Per-head dims are never split, so heads are kept whole; the small model is
   analysed too, and one whose heads differ in size from the big model's is an error, not a silent
   reinterpretation of the weights.
4. **Choice.** Within each group the least important units go (``fxsparse.importance``; by default the L2 norm of
   every weight a unit takes with it). Survival per tensor index comes from the analysis (``keep_labels``), and
   every small dim must come out at exactly its size.

The big model is traced, so it is needed as a module. Given as weights (a state dict or a file), it needs
``big_architecture``, a module of the big model's architecture (built on the ``meta`` device it costs no memory):
the weights are loaded into it with ``assign=True``. When no tensor is narrower (only layers are dropped),
nothing is traced, and neither an architecture nor example inputs are needed.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tabulate import tabulate

from .errors import BadArgumentError, PlanMismatchError
from .importance import Importance, resolve_importance, unit_scores
from .inputs import normalize_example_inputs
from .shapes import propagate_shapes
from .trace import trace_module

DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\."
HEADS, CHANNELS, HEAD_DIMS = "heads/groups", "channels", "per-head dims"  # the kinds DependencyGroups names
UNIT_WORDS = {HEADS: "heads", CHANNELS: "channels"}

Key = tuple[str, int]  # (tensor name, dim)


@dataclass
class TransferRow:
    """One small tensor: where it came from, and the big indices kept along every dim that shrank."""

    small: str
    big: str
    big_shape: tuple[int, ...]
    small_shape: tuple[int, ...]
    how: str = "copied"
    kept: dict[int, list[int]] = field(default_factory=dict)

    def shrunk_dims(self) -> list[int]:
        return [d for d, (b, s) in enumerate(zip(self.big_shape, self.small_shape)) if s < b]


@dataclass
class TransferReport:
    """What :func:`load_big_into_small` loaded: every small tensor, its big source and how its indices were chosen."""

    rows: list[TransferRow]
    layer_id_map: dict[int, int]
    dropped_layers: list[int]
    importance: str

    def row(self, small_name: str) -> TransferRow:
        for row in self.rows:
            if row.small == small_name:
                return row
        raise KeyError(f"no small tensor named {small_name!r} in this transfer")

    def table(self) -> str:
        rows = [[r.small, r.big, f"{_shape_text(r.big_shape)} -> {_shape_text(r.small_shape)}", r.how]
                for r in self.rows]
        return tabulate(rows, headers=["small tensor", "big tensor", "big -> small shape", "indices"],
                        tablefmt="simple")

    def __str__(self) -> str:
        sliced = sum(1 for r in self.rows if r.kept)
        layers = ", ".join(f"{s} <- {b}" for s, b in sorted(self.layer_id_map.items())) or "none"
        dropped = ", ".join(map(str, self.dropped_layers)) or "none"
        return "\n".join([
            f"fxsparse transfer: {len(self.rows)} tensors loaded, {sliced} sliced by {self.importance} importance, "
            f"{len(self.rows) - sliced} copied whole",
            f"layers (small <- big): {layers}; big layers dropped: {dropped}",
            self.table(),
        ])


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


# -- weights in ---------------------------------------------------------------------------------------------------
def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadArgumentError(f"big: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one argument error
        first_line = (str(error).splitlines() or [""])[0]
        raise BadArgumentError(f"big: cannot read {str(path)!r} as a state dict ({type(error).__name__}: "
                               f"{first_line})") from None


def _big_state(big: Any) -> dict[str, torch.Tensor]:
    """The big model's tensors by name, from a module, a state dict, or a .pt/.bin/.safetensors file."""
    if isinstance(big, torch.nn.Module):
        return big.state_dict()
    state = _load_weights_file(Path(big)) if isinstance(big, (str, Path)) else big
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadArgumentError(f"big must be a module, a state dict of tensors or a path to one, not "
                               f"{type(state).__name__}")
    return dict(state)


def _big_module(big: Any, big_architecture: torch.nn.Module | None, big_state: dict) -> torch.nn.Module:
    """A module to trace: ``big`` itself, or ``big_architecture`` holding the big weights."""
    if isinstance(big, torch.nn.Module):
        return big
    if not isinstance(big_architecture, torch.nn.Module):
        raise BadArgumentError(
            "big_architecture: some small tensors are narrower than the big ones, so the big model must be traced "
            "to choose what to keep; with big given as weights, pass big_architecture=<a module of the big "
            "model's architecture> (built on the meta device it costs no memory)")
    try:
        big_architecture.load_state_dict(big_state, strict=True, assign=True)
    except RuntimeError as error:
        raise PlanMismatchError(f"the big weights do not fit big_architecture ({type(big_architecture).__name__}): "
                                f"{' '.join(str(error).split())[:600]}") from None
    return big_architecture


# -- names and layers ---------------------------------------------------------------------------------------------
class _Layers:
    """Finds layer indices in tensor names and rewrites a small name into its big counterpart."""

    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern)
        except re.error as error:
            raise BadArgumentError(f"layer_pattern {pattern!r} is not a regular expression: {error}") from None
        if self.pattern.groups < 1:
            raise BadArgumentError(f"layer_pattern {pattern!r} needs a capturing group around the layer index")

    def locate(self, name: str) -> tuple[int, int, int] | None:
        """(layer index, start, end of its digits in ``name``), or None for a tensor outside the layers."""
        match = self.pattern.search(name)
        if match is None:
            return None
        group = next((g for g in range(1, self.pattern.groups + 1) if match.group(g) is not None), None)
        if group is None or not match.group(group).isdigit():
            raise BadArgumentError(f"layer_pattern {self.pattern.pattern!r} matches {name!r} but captures no "
                                   "layer index")
        return int(match.group(group)), match.start(group), match.end(group)

    def layer_of(self, name: str) -> int | None:
        found = self.locate(name)
        return None if found is None else found[0]

    def indices(self, names) -> list[int]:
        return sorted({layer for layer in map(self.layer_of, names) if layer is not None})

    def big_name(self, small_name: str, layer_id_map: dict[int, int]) -> str:
        found = self.locate(small_name)
        if found is None:
            return small_name
        layer, start, end = found
        return f"{small_name[:start]}{layer_id_map[layer]}{small_name[end:]}"


def _default_layer_map(small_layers: list[int], big_layers: list[int]) -> dict[int, int]:
    """Evenly spaced big layers, the first one included: 2 of 4 -> {0: 0, 1: 2}, 3 of 12 -> {0: 0, 1: 4, 2: 8}."""
    if len(small_layers) > len(big_layers):
        raise BadArgumentError(f"layer_id_map: the small model has {len(small_layers)} layers, the big one "
                               f"{len(big_layers)}; say which big layer each small layer comes from")
    return {small: big_layers[i * len(big_layers) // len(small_layers)] for i, small in enumerate(small_layers)}


def _layer_range(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "none"


def _check_layer_map(layer_id_map: Any, small_layers: list[int], big_layers: list[int]) -> dict[int, int]:
    if not isinstance(layer_id_map, Mapping):
        raise BadArgumentError(f"layer_id_map must be a dict of small layer -> big layer, not "
                               f"{type(layer_id_map).__name__}")
    for small, big in layer_id_map.items():
        if small not in small_layers:
            raise BadArgumentError(f"layer_id_map[{small!r}]: the small model has no layer {small!r} "
                                   f"(its layers: {_layer_range(small_layers)})")
        if big not in big_layers:
            raise BadArgumentError(f"layer_id_map[{small!r}] = {big!r}: the big model has no layer {big!r} "
                                   f"(its layers: {_layer_range(big_layers)})")
    missing = [layer for layer in small_layers if layer not in layer_id_map]
    if missing:
        raise BadArgumentError(f"layer_id_map has no entry for small layer(s) {missing}: say which big layer each "
                               "small layer comes from")
    return dict(layer_id_map)


def _pair_tensors(small_state: dict, big_state: dict, layers: _Layers, layer_map: dict[int, int]) -> list[TransferRow]:
    """One row per small tensor, naming its big counterpart; a missing or larger counterpart is an error."""
    rows = []
    for name, tensor in small_state.items():
        big_name = layers.big_name(name, layer_map)
        if big_name not in big_state:
            close = difflib.get_close_matches(big_name, list(big_state), n=3)
            hint = f"; close big names: {', '.join(close)}" if close else ""
            raise PlanMismatchError(f"small tensor {name!r} has no counterpart in the big weights (looked for "
                                    f"{big_name!r}){hint}")
        big_shape, small_shape = tuple(big_state[big_name].shape), tuple(tensor.shape)
        if len(big_shape) != len(small_shape) or any(s > b for s, b in zip(small_shape, big_shape)):
            raise PlanMismatchError(f"small tensor {name!r} of shape {list(small_shape)} does not fit in big "
                                    f"{big_name!r} of shape {list(big_shape)}: every dim must be at most the big one")
        rows.append(TransferRow(name, big_name, big_shape, small_shape))
    return rows


def _check_big_used(rows: list[TransferRow], big_state: dict, layers: _Layers, dropped: list[int]) -> None:
    """Every big tensor is taken by a small one, unless its whole layer is dropped."""
    used = {row.big for row in rows}
    left = [n for n in big_state if n not in used and layers.layer_of(n) not in dropped]
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise PlanMismatchError(f"big tensor(s) {', '.join(map(repr, left[:5]))}{more} have no counterpart in the "
                                "small model (only whole dropped layers may be left behind)")


# -- coupling ------------------------------------------------------------------------------------------------------
def _example_inputs(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """The user's inputs, or for a Hugging Face-style text model a short batch of token ids."""
    if example_inputs is None and not example_kwargs:
        parameters = inspect.signature(model.forward).parameters
        if "input_ids" in parameters:
            example_kwargs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
            if "use_cache" in parameters:
                example_kwargs["use_cache"] = False  # a cache object in the output stops torch.export
    return normalize_example_inputs(example_inputs, example_kwargs)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout in the trace), then every submodule's own mode back: the user's model is unchanged."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _Coupling:
    """A model's channel analysis, reduced to what a transfer needs: the selectable units in groups of
    interchangeable ones, and how many indices of a tensor dim one unit of a group takes with it (its width)."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict, frontend: str):
        from fxsparse.analysis import analyse_channels

        with _eval_mode(model):
            traced = trace_module(model, args, kwargs, frontend)
        if not traced.shapes:
            propagate_shapes(traced.module, traced.args, traced.kwargs)
        self.module = traced.module
        self.analysis = analyse_channels(traced.module).analysis
        graph = self.analysis.graph
        self.canonical = {alias: name for name, aliases in graph.aliases.items() for alias in aliases}
        self.kinds = self.analysis.group_kinds()
        # every channel, head and head dim, fixed ones too: a new, smaller model may drop residual channels
        self.units = self.analysis.channel_units(include_fixed=True)
        self.unit_group = self.analysis.space_group[self.analysis.space_of[self.units]]

    def member(self, name: str, dim: int):
        return self.analysis.graph.members.get((self.canonical.get(name, name), dim))

    def group_size(self, group: int) -> int:
        return int((self.unit_group == group).sum())

    def head_sizes(self, widths: dict[Key, dict[int, int]], key: Key) -> set[int]:
        """The sizes of the heads whose dims index ``key`` (per-head-dims groups have one unit per head dim)."""
        return {self.group_size(g) for g in widths.get(key, {}) if self.kinds[g] == HEAD_DIMS}

    def widths(self, keys: list[Key]) -> dict[Key, dict[int, int]]:
        """For each tensor dim, the groups whose units take indices of it, and how many indices one unit takes
        (found by removing one unit of each group: exact for any nesting of heads, groups and merges)."""
        members = {key: m for key in keys if (m := self.member(*key)) is not None}
        widths: dict[Key, dict[int, int]] = defaultdict(dict)
        for group in torch.unique(self.unit_group).tolist():
            lost = ~self.analysis.keep_labels(self.units[self.unit_group == group][:1])
            for key, member in members.items():
                count = int(lost[member.labels].sum())
                if count:
                    widths[key][group] = count
        return widths

    def scores(self, importance: Importance) -> torch.Tensor:
        """One score per selectable unit (fixed ones included)."""
        return unit_scores(self.analysis, self.module, importance, units=self.units)


def _removal_counts(rows: list[TransferRow], coupling: _Coupling, widths: dict[Key, dict[int, int]]
                    ) -> dict[int, int]:
    """How many units each group loses, from the dims that exactly one group of channels or heads decides
    (per-head dims are never split)."""
    counts: dict[int, int] = {}
    decided_by: dict[int, str] = {}
    for row in rows:
        for dim in row.shrunk_dims():
            deciding = {g: w for g, w in widths.get((row.big, dim), {}).items() if coupling.kinds[g] != HEAD_DIMS}
            if not deciding:
                raise PlanMismatchError(
                    f"small tensor {row.small!r} dim {dim} shrinks {row.big_shape[dim]} -> {row.small_shape[dim]}, "
                    f"but no channel or head of the big model decides the indices of {row.big!r} dim {dim} (a "
                    "per-head dim, an embedding's rows, a dim the traced model does not use): it cannot be sliced")
            if len(deciding) > 1:
                continue  # several groups share this dim: other dims set their counts; _record_kept checks it
            (group, width), = deciding.items()
            removed, remainder = divmod(row.big_shape[dim] - row.small_shape[dim], width)
            unit = UNIT_WORDS[coupling.kinds[group]]
            if remainder:
                raise PlanMismatchError(
                    f"small tensor {row.small!r} dim {dim}: {row.big_shape[dim]} -> {row.small_shape[dim]} is not a "
                    f"whole number of the big model's {unit} ({width} indices each in {row.big!r})")
            if counts.setdefault(group, removed) != removed:
                raise PlanMismatchError(
                    f"small tensors {row.small!r} and {decided_by[group]!r} drop different numbers of the same "
                    f"{unit} of the big model ({removed} and {counts[group]} of {coupling.group_size(group)})")
            decided_by.setdefault(group, row.small)
    return counts


def _check_head_sizes(rows: list[TransferRow], big_widths: dict, small_widths: dict, big: _Coupling,
                      small: _Coupling) -> None:
    """Heads are kept whole, so the small model's heads must have the big model's head size; a small model with
    fewer heads of a larger size (BERT's head size is hidden/heads) would get the big weights reinterpreted."""
    for row in rows:
        for dim in range(len(row.small_shape)):
            big_sizes = big.head_sizes(big_widths, (row.big, dim))
            small_sizes = small.head_sizes(small_widths, (row.small, dim))
            if big_sizes and small_sizes and big_sizes != small_sizes:
                raise PlanMismatchError(
                    f"small tensor {row.small!r} dim {dim} holds heads of size {min(small_sizes)}, the big "
                    f"{row.big!r} heads of size {min(big_sizes)}: heads are kept whole, so the small model must "
                    "have the big model's head size")


def _removed_units(coupling: _Coupling, counts: dict[int, int], scores: torch.Tensor) -> torch.Tensor:
    removed = [torch.empty(0, dtype=torch.long)]
    for group, count in counts.items():
        in_group = coupling.unit_group == group
        order = torch.argsort(scores[in_group], stable=True)
        removed.append(coupling.units[in_group][order[:count]])
    return torch.cat(removed)


def _record_kept(rows: list[TransferRow], coupling: _Coupling, removed: torch.Tensor, counts: dict[int, int],
                 widths: dict[Key, dict[int, int]], criterion: str) -> None:
    """Fill every row's kept indices and how they were chosen; a dim that does not come out at its small size
    is an error."""
    keep = coupling.analysis.keep_labels(removed)
    for row in rows:
        chosen = []
        for dim, (big_size, small_size) in enumerate(zip(row.big_shape, row.small_shape)):
            member = coupling.member(row.big, dim)
            kept = torch.nonzero(keep[member.labels]).flatten() if member is not None else torch.arange(big_size)
            if len(kept) != small_size:
                raise PlanMismatchError(
                    f"small tensor {row.small!r} dim {dim}: the choice coupled with other tensors keeps {len(kept)} "
                    f"of the {big_size} indices of {row.big!r}, but the small tensor has {small_size} (tensors "
                    "that share these channels or heads shrink by different amounts)")
            if small_size < big_size:
                row.kept[dim] = kept.tolist()
                deciding = [g for g in widths.get((row.big, dim), {}) if counts.get(g)]
                units = " and ".join(sorted({UNIT_WORDS[coupling.kinds[g]] for g in deciding}))
                chosen.append((dim, f"top-k {units} by {criterion}"))
        if len(chosen) == 1:
            row.how = chosen[0][1]
        elif chosen:
            row.how = "; ".join(f"dim {dim}: {text}" for dim, text in chosen)


def _choose_kept(rows: list[TransferRow], big_model: torch.nn.Module, small: torch.nn.Module, inputs: tuple,
                 frontend: str, importance: Importance) -> None:
    """Trace both models, decide how many units each big group loses, drop the least important, record the rest."""
    args, kwargs = inputs
    big, little = _Coupling(big_model, args, kwargs, frontend), _Coupling(small, args, kwargs, frontend)
    big_widths = big.widths([(row.big, dim) for row in rows for dim in range(len(row.big_shape))])
    small_widths = little.widths([(row.small, dim) for row in rows for dim in range(len(row.small_shape))])
    _check_head_sizes(rows, big_widths, small_widths, big, little)
    counts = _removal_counts(rows, big, big_widths)
    removed = _removed_units(big, counts, big.scores(importance))
    _record_kept(rows, big, removed, counts, big_widths, importance.name)


def _sliced(tensor: torch.Tensor, kept: dict[int, list[int]]) -> torch.Tensor:
    for dim, indices in kept.items():
        tensor = tensor.index_select(dim, torch.tensor(indices, device=tensor.device))
    return tensor


# -- the entry point -----------------------------------------------------------------------------------------------
def load_big_into_small(
    big: torch.nn.Module | Mapping[str, torch.Tensor] | str | Path,
    small: torch.nn.Module,
    layer_id_map: Mapping[int, int] | None = None,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    importance: str | Importance | Callable = "l2",
    *,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    big_architecture: torch.nn.Module | None = None,
    frontend: str = "auto",
) -> TransferReport:
    """Load a big model's weights into ``small`` (same architecture, smaller config), in place.

    ``big`` is a module, a state dict, or a .pt/.bin (read with ``weights_only=True``) or .safetensors file; as
    weights, it needs ``big_architecture`` whenever a tensor shrinks (see the module docstring).
    ``layer_id_map`` maps small layer -> big layer (default: evenly spaced from the first, 2 of 4 -> {0: 0, 1: 2});
    layers are found in tensor names by ``layer_pattern``'s first matching group. The heads, KV groups, MLP
    channels and residual channels kept are the most important by ``importance`` (a criterion name, an
    :class:`~fxsparse.importance.Importance` or ``fn(tensor, dim)``), the same for every tensor that shares them.
    ``example_inputs``/``example_kwargs`` drive the trace (default for a model with ``input_ids``: a batch of 8
    tokens). Every mismatch is a :class:`PlanMismatchError` naming the tensor; a bad argument a
    :class:`BadArgumentError`. Returns a :class:`TransferReport` listing every tensor loaded.
    """
    if not isinstance(small, torch.nn.Module):
        raise BadArgumentError(f"small must be a torch.nn.Module, not {type(small).__name__}")
    if big_architecture is not None and isinstance(big, torch.nn.Module):
        raise BadArgumentError("big_architecture is for a big model given as weights; big is already a module")
    criterion = resolve_importance(importance)
    if criterion.needs_gradients:
        raise BadArgumentError(f"importance={criterion.name!r} needs gradients; use a weight criterion (l1, l2...)")
    big_state, small_state = _big_state(big), small.state_dict()
    layers = _Layers(layer_pattern)
    small_layers, big_layers = layers.indices(small_state), layers.indices(big_state)
    if layer_id_map is None:
        layer_map = _default_layer_map(small_layers, big_layers)
    else:
        layer_map = _check_layer_map(layer_id_map, small_layers, big_layers)
    dropped = [layer for layer in big_layers if layer not in layer_map.values()]
    rows = _pair_tensors(small_state, big_state, layers, layer_map)
    _check_big_used(rows, big_state, layers, dropped)
    if any(row.shrunk_dims() for row in rows):
        big_model = _big_module(big, big_architecture, big_state)
        inputs = _example_inputs(big_model, example_inputs, example_kwargs)
        _choose_kept(rows, big_model, small, inputs, frontend, criterion)
    small.load_state_dict({row.small: _sliced(big_state[row.big], row.kept) for row in rows}, strict=True)
    return TransferReport(rows, layer_map, dropped, criterion.name)
