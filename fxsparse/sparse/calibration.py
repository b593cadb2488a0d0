"""Sequential, memory-bounded calibration for one-shot pruning (Wanda, SparseGPT, magnitude).

A transformer is a stack of repeated blocks. The inputs of the first block are captured once, for every
calibration example, by a hook that stops the model's forward there; then each block in turn is run on them with
hooks that feed its Linear-like layers' inputs to a criterion's statistics, its weights are pruned, and it is run
again so the next block calibrates on the outputs of the already-pruned blocks before it (as the SparseGPT and
Wanda reference code do). Only one block's activations (its inputs and outputs for the calibration set) and one
block's statistics (Hessians for SparseGPT) are alive at a time, so depth does not raise the peak memory.

Targets are ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2; weight stored as ``(in, out)``) and ``nn.Conv1d``/
``nn.Conv2d`` (their inputs unfolded into one row per output position, :mod:`.conv_rows`; a grouped convolution
is calibrated and pruned group by group, each group's outputs on its own input channels) inside the blocks.
A model without a repeated stack (a plain MLP) is one block. A torch.fx GraphModule (what compile hands a pass)
has no callable blocks: it is calibrated layer by layer, see graph_calibration.py. The weights are changed IN PLACE.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from ..errors import BadArgumentError
from ..inputs import normalize_example_inputs
from .criteria import WEIGHT_CRITERIA, WeightCriterion
from .graph_calibration import calibrate_graph, graph_targets, uncalibrated
from .patterns import NM, Unstructured
from .sparsegpt import HessianStatistics, sparsegpt_prune
from .calibration_targets import LinearTarget, linear_targets, module_target
from .wanda import WandaStatistics, per_row_scores, wanda_prune

log = logging.getLogger(__name__)

# -- patterns --------------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | NM | Unstructured) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` (N kept of every M consecutive inputs) -> ``(N, M)``."""
    if isinstance(pattern, NM):
        return pattern.n, pattern.m
    if pattern == "unstructured" or isinstance(pattern, Unstructured):
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise BadArgumentError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', not {pattern!r}") from None
    if not 0 < n < m:
        raise BadArgumentError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


# -- blocks ----------------------------------------------------------------------------------------------------


def _signature(module: nn.Module) -> tuple:
    return type(module), tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def find_blocks(model: nn.Module, blocks: str | list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks to calibrate in order, as ``(name, module)``.

    ``blocks`` may name a ModuleList/Sequential (``"transformer.h"``) or list block names. By default: the
    ModuleList/Sequential of at least two children of one type and parameter shapes holding the most parameters
    (HF ``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``); else the whole model, as one block.
    """
    modules = dict(model.named_modules())
    if isinstance(blocks, str):
        if blocks not in modules or not isinstance(modules[blocks], (nn.ModuleList, nn.Sequential)):
            raise BadArgumentError(f"blocks={blocks!r} is not a ModuleList or Sequential of the model")
        return [(f"{blocks}.{child}", module) for child, module in modules[blocks].named_children()]
    if blocks is not None:
        missing = [name for name in blocks if name not in modules]
        if missing:
            raise BadArgumentError(f"blocks names {missing}, which are not modules of the model")
        return [(name, modules[name]) for name in blocks]
    best, best_size = None, 0
    for name, container in modules.items():
        children = list(container.children())
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(children) < 2:
            continue
        if len({_signature(child) for child in children}) != 1:
            continue
        size = sum(p.numel() for p in container.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        return [("", model)]
    return [(f"{best}.{child}", module) for child, module in modules[best].named_children()]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def capture_block_inputs(model: nn.Module, first_block: nn.Module, samples: list[tuple[tuple, dict]]):
    """``[(args, kwargs)]``: what ``first_block`` is called with for each calibration example (the rest of the
    forward is not run)."""
    if first_block is model:
        return list(samples)
    captured = []

    def record(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for args, kwargs in samples:
            try:
                model(*args, **kwargs)
            except _StopForward:
                continue
            except Exception as error:  # nothing is pruned yet: a bad calibration input is the user's to fix
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise BadArgumentError(f"a calibration input fails in the model's forward: "
                                       f"{type(error).__name__}: {message}") from error
            raise BadArgumentError("the model's forward never reached its first block: pass blocks= explicitly")
    finally:
        handle.remove()
    return captured


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BadArgumentError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def _next_inputs(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The next block's inputs: this block's, with the hidden state replaced by this block's output."""
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise BadArgumentError("a block takes no positional input nor hidden_states=: pass blocks= explicitly")


# -- the engine ------------------------------------------------------------------------------------------------

Statistics = Any  # an object with add_batch(inputs) (WandaStatistics, HessianStatistics), or None
PruneBlock = Callable[[str, list[LinearTarget], dict[str, Statistics]], dict[str, torch.Tensor]]


@torch.no_grad()
def calibrate_blocks(model: nn.Module, calibration: list, statistics: Callable[[LinearTarget], Statistics],
                     prune_block: PruneBlock, blocks=None, include=None, exclude=None, only: set[str] | None = None,
                     progress: bool = True, validate: Callable[[list[LinearTarget]], None] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Run the sequential engine; returns ``{weight name: bool keep-mask}`` from ``prune_block``.

    ``statistics(target)`` makes the per-layer statistics object (or None when the criterion needs no data);
    ``prune_block(block name, targets, {weight name: statistics})`` prunes the block's targets in place and
    returns their keep-masks. Everything is checked (``validate`` gets every target) before any weight changes.
    """
    if not isinstance(model, nn.Module):
        raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise BadArgumentError("calibration must be a non-empty list of example inputs")
    samples = [normalize_example_inputs(example) for example in calibration]
    if isinstance(model, fx.GraphModule) and blocks is None:  # a graph's train/eval behaviour is fixed in it
        by_node = graph_targets(model, include, exclude, only)
        _check_targets(list(by_node.values()), only, validate)
        return calibrate_graph(model, samples, by_node, statistics, prune_block, progress)
    stack = find_blocks(model, blocks)
    targets = {name: linear_targets(block, name, include, exclude, only) for name, block in stack}
    _check_targets([t for block_targets in targets.values() for t in block_targets], only, validate)

    training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    try:
        inputs = capture_block_inputs(model, stack[0][1], samples)
        _next_inputs(*inputs[0], _main_tensor(stack[0][1](*inputs[0][0], **inputs[0][1])))  # fails before pruning
        for name, block in tqdm(stack, desc="calibrating blocks", unit="block", disable=not progress):
            block_targets = targets[name]
            stats = {t.name: statistics(t) for t in block_targets}
            observed = {t.name: t for t in block_targets if stats[t.name] is not None}
            if observed:
                _observe(block, inputs, observed, stats)
            if block_targets:
                masks.update(prune_block(name, block_targets, stats))
            del stats
            inputs = [_next_inputs(args, kwargs, _main_tensor(block(*args, **kwargs))) for args, kwargs in inputs]
            log.info("calibrated %s: %d layers pruned", name or "the model", len(block_targets))
    finally:
        model.train(training)
    return masks


def _check_targets(found: list[LinearTarget], only: set[str] | None, validate) -> None:
    if only is not None:
        missing = sorted(only - {t.name for t in found})
        if missing:
            raise BadArgumentError(f"targets {missing[:3]} are not Linear/Conv1D weights this engine calibrates "
                                   "(inside the repeated blocks of an eager model; not a tied embedding)")
    if not found:
        raise BadArgumentError("no Linear or Conv1D weight to sparsify (check include=/exclude=/blocks=)")
    if validate is not None:
        validate(found)


def _observe(block: nn.Module, inputs: list, observed: dict[str, LinearTarget], stats: dict[str, Statistics]):
    """Run ``block`` on every calibration input with hooks feeding each observed layer's input to its stats."""
    def observer(target: LinearTarget, statistics: Statistics):
        def add(_module, args):
            for rows in target.input_rows(args[0]):
                statistics.add_batch(rows)
        return add

    handles = [target.module.register_forward_pre_hook(observer(target, stats[name]))
               for name, target in observed.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


# -- criteria --------------------------------------------------------------------------------------------------


def magnitude_prune(weight: torch.Tensor, _statistics, sparsity: float, n_of_m: tuple[int, int] | None = None,
                    transposable: bool = False):
    """Plain per-layer magnitude: zero the ``round(numel * sparsity)`` smallest ``|W|`` (or keep the N largest of
    every M consecutive inputs, both ways in M x M blocks if ``transposable``). Returns ``(pruned weight,
    keep-mask)``."""
    scores = weight.abs()
    if n_of_m and transposable:
        keep = NM(*n_of_m, transposable=True).keep_mask(scores, "linear")
    elif n_of_m:
        n, m = n_of_m
        groups = scores.reshape(scores.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        keep = keep.reshape(weight.shape)
    else:
        keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        keep[scores.flatten().topk(round(weight.numel() * sparsity), largest=False).indices] = False
        keep = keep.reshape(weight.shape)
    return weight * keep, keep


class PerGroup:
    """The statistics of a grouped convolution: one object per group, each fed its group's block of columns."""

    def __init__(self, parts: list):
        self.parts = parts

    def add_batch(self, rows: torch.Tensor) -> None:
        for part, columns in zip(self.parts, rows.chunk(len(self.parts), dim=-1)):
            part.add_batch(columns)

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens


def new_statistics(statistics_class, target: LinearTarget):
    """``statistics_class(in_features)`` for ``target``, one per group for a grouped convolution (None: no data)."""
    if statistics_class is None:
        return None
    if target.groups == 1:
        return statistics_class(target.in_features)
    return PerGroup([statistics_class(target.in_features) for _ in range(target.groups)])


def _group_sparsities(target: LinearTarget, sparsity: float) -> list[float]:
    """Each group's sparsity such that the groups together prune exactly ``round(numel * sparsity)`` weights (a
    depthwise group of 9 weights alone would round 4.5 to 4 every time)."""
    total, groups = round(target.parameter.numel() * sparsity), target.groups
    edges = [round(total * i / groups) for i in range(groups + 1)]
    size = target.parameter.numel() // groups
    return [(after - before) / size for before, after in zip(edges, edges[1:])]


def prune_target(prune: Callable, target: LinearTarget, statistics, sparsity: float, n_of_m, exact_count: bool = False,
                 **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``prune(matrix, statistics, sparsity, n_of_m, **options)`` on ``target``; for a grouped convolution with
    statistics, on each group's rows with its own statistics, stacked back. ``exact_count``: the groups share
    ``round(numel * sparsity)`` pruned weights exactly (SparseGPT's count per layer; Wanda's is per output row)."""
    if not isinstance(statistics, PerGroup):
        return prune(target.matrix(), statistics, sparsity, n_of_m, **options)
    shares = _group_sparsities(target, sparsity) if exact_count and n_of_m is None else [sparsity] * target.groups
    parts = [prune(rows, part, share, n_of_m, **options)
             for rows, part, share in zip(target.matrix().chunk(target.groups), statistics.parts, shares)]
    return torch.cat([weight for weight, _ in parts]), torch.cat([keep for _, keep in parts])


def target_scores(target: LinearTarget, statistics) -> torch.Tensor:
    """The scores one global threshold compares: Wanda's per calibration row (per group for a grouped
    convolution), or ``|W|`` without statistics."""
    if statistics is None:
        return target.matrix().abs()
    if not isinstance(statistics, PerGroup):
        return per_row_scores(target.matrix(), statistics)
    return torch.cat([per_row_scores(rows, part)
                      for rows, part in zip(target.matrix().chunk(target.groups), statistics.parts)])


METHODS = {
    # name: (statistics class or None, prune function(weight, statistics, sparsity, n_of_m, **options))
    "magnitude": (None, magnitude_prune),
    "wanda": (WandaStatistics, wanda_prune),
    "sparsegpt": (HessianStatistics, sparsegpt_prune),
}


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise BadArgumentError(f"sparsity must be a number in [0, 1), not {sparsity!r}")
    return float(sparsity)


def check_pattern_fits(n_of_m: tuple[int, int] | None, blocksize: int | None = None, transposable: bool = False):
    """A validator: every target's input width (a convolution's input channels) must split into groups of M, its
    outputs too if ``transposable``, and SparseGPT's blocksize too."""

    def validate(targets: list[LinearTarget]):
        if n_of_m is None:
            return
        m = n_of_m[1]
        if blocksize is not None and blocksize % m:
            raise BadArgumentError(f"blocksize={blocksize} is not a multiple of the pattern's M={m}")
        for target in targets:
            if target.group_width % m:
                raise BadArgumentError(
                    f"{target.name} has {target.group_width} input channels, not a multiple of M={m}: exclude it"
                    if target.conv else
                    f"{target.name} has {target.in_features} inputs, not a multiple of M={m}: exclude it")
            outputs = target.matrix().shape[0] // target.groups
            if transposable and outputs % m:
                raise BadArgumentError(f"{target.name} has {outputs} outputs (per group), not a multiple of M={m} "
                                       "(transposable): exclude it")

    return validate


def check_scope(criterion: str, scope: str) -> None:
    """SparseGPT has no global threshold: refused with what to use instead."""
    if scope not in ("local", "global"):
        raise BadArgumentError(f"scope must be 'local' or 'global', not {scope!r}")
    if scope == "global" and criterion == "sparsegpt":
        raise BadArgumentError("scope='global' cannot go with criterion='sparsegpt', whose OBS update picks each "
                               "layer's mask on that layer's own Hessian as it goes: use scope='local' (a sparsity "
                               "per layer) or criterion='wanda' for one threshold over all layers")


def sparsify_sequential(model: nn.Module, calibration: list, criterion: str = "wanda",
                        pattern: str = "unstructured", sparsity: float = 0.5, blocks=None,
                        include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                        progress: bool = True, only: set[str] | None = None, transposable: bool = False,
                        scope: str = "local", **options) -> dict[str, torch.Tensor]:
    """Prune ``model``'s Linear/Conv1D/Conv1d/Conv2d weights one block at a time, IN PLACE, and return
    ``{weight name: bool keep-mask}`` (mask in the weight's own layout).

    - ``calibration``: a list of example inputs, each a tensor, a tuple of inputs or a dict of keyword inputs.
    - ``criterion``: ``"wanda"`` (|W|·‖x‖, no update), ``"sparsegpt"`` (OBS with weight update; ``blocksize=128``,
      ``percdamp=0.01`` may be passed) or ``"magnitude"`` (no data used).
    - ``pattern``: ``"unstructured"`` (with ``sparsity``) or ``"N:M"`` (N kept of every M consecutive inputs;
      ``transposable=True``: also of every M consecutive outputs, in M x M blocks).
    - ``scope="global"`` (unstructured; wanda or magnitude): one threshold over every target's scores, which are
      then all taken on the dense model (Wanda's as :func:`~fxsparse.sparse.wanda.per_row_scores`).
    - ``blocks``: the repeated stack's name (``"model.layers"``) or a list of block names; found if None.
    - ``include``/``exclude``: globs over weight names (``"*.mlp.*"``); ``only``: an exact set of weight names.
    """
    if criterion not in METHODS:
        raise BadArgumentError(f"criterion must be one of {sorted(METHODS)}, not {criterion!r}")
    statistics_class, prune = METHODS[criterion]
    n_of_m = parse_pattern(pattern)
    sparsity = _check_sparsity(sparsity)
    check_scope(criterion, scope)
    if n_of_m is not None and scope == "global":
        raise BadArgumentError("scope='global' applies to pattern='unstructured' only")
    if transposable and n_of_m is None:
        raise BadArgumentError("transposable=True applies to N:M patterns only")
    allowed = {"sparsegpt": {"blocksize", "percdamp"}}.get(criterion, set())
    if set(options) - allowed:
        raise BadArgumentError(f"criterion {criterion!r} takes no option {sorted(set(options) - allowed)}")
    validate = check_pattern_fits(n_of_m, options.get("blocksize", 128) if criterion == "sparsegpt" else None,
                                  transposable)

    def statistics(target: LinearTarget):
        return new_statistics(statistics_class, target)

    if scope == "global":
        return _prune_globally(model, calibration, statistics, sparsity, blocks, include, exclude, only, progress)

    def prune_block(_name, targets, stats):
        masks = {}
        for target in targets:
            weight, keep = prune_target(prune, target, stats[target.name], sparsity, n_of_m,
                                        exact_count=criterion == "sparsegpt", transposable=transposable, **options)
            target.write(weight)
            masks[target.name] = target.layout(keep)
        return masks

    return calibrate_blocks(model, calibration, statistics, prune_block, blocks, include, exclude, only, progress,
                            validate=validate)


def _prune_globally(model, calibration, statistics, sparsity, blocks, include, exclude, only, progress):
    """Global unstructured sparsity: every target's scores on the dense model (Wanda's per calibration row, or
    ``|W|``), then one threshold over all of them."""
    scored: dict[str, tuple[LinearTarget, torch.Tensor]] = {}

    def score_block(_name, targets, stats):
        for target in targets:
            scored[target.name] = (target, target_scores(target, stats[target.name]))
        return {}

    calibrate_blocks(model, calibration, statistics, score_block, blocks, include, exclude, only, progress)
    keep = Unstructured(sparsity, "global").keep_masks({name: scores for name, (_, scores) in scored.items()})
    masks = {}
    for name, (target, _) in scored.items():
        target.write(target.matrix() * keep[name])
        masks[name] = target.layout(keep[name])
    return masks


class CalibratedCriterion(WeightCriterion):
    """The engine behind the weight-criterion interface (``WEIGHT_CRITERIA``, ``Sparsify(criterion=...)``):
    ``compute_masks(module, targets, pattern, calibration)`` prunes ``targets`` (weight names or
    :class:`~fxsparse.sparse.targets.WeightTarget`) of ``module`` in place, sequentially, and returns their masks.
    ``pattern`` is ``"unstructured"``/``"N:M"`` (with this criterion's ``sparsity``) or an ``NM``/``Unstructured``
    (transposable N:M and global unstructured included, where :meth:`check_pattern` allows)."""

    method: ClassVar[str] = ""
    needs_calibration = True

    def __init__(self, sparsity: float = 0.5, blocks=None, progress: bool = True, **options):
        self.sparsity, self.blocks, self.progress, self.options = _check_sparsity(sparsity), blocks, progress, options

    def check_pattern(self, pattern) -> None:
        check_scope(self.method, getattr(pattern, "scope", "local"))

    def unsupported(self, module: nn.Module, targets: Iterable, pattern=None) -> dict[str, str]:
        names = [getattr(target, "param", target) for target in targets]
        if isinstance(module, fx.GraphModule) and self.blocks is None:
            reasons = uncalibrated(module, names)
            found = {t.name: t for t in graph_targets(module, only=set(names)).values()}
        else:
            modules = dict(module.named_modules())
            found = {name: module_target(name, modules.get(name.rpartition(".")[0])) for name in names}
            reasons = {name: why for name, why in found.items() if isinstance(why, str)}
        if getattr(pattern, "transposable", False):
            for name, target in found.items():
                if isinstance(target, LinearTarget) and target.conv is not None and name not in reasons:
                    outputs = target.parameter.shape[0] // target.groups
                    if outputs % pattern.m:  # the "conv" layout's M x M blocks would span kernel positions/groups
                        reasons[name] = (f"{outputs} output channels per group, not a multiple of M={pattern.m}: "
                                         "its transposable blocks span kernel positions or groups")
        return reasons

    def compute_masks(self, module: nn.Module, targets: Iterable, pattern, calibration: list | None = None
                      ) -> dict[str, torch.Tensor]:
        self.check_pattern(pattern)
        sparsity = self.sparsity if isinstance(pattern, str) else pattern.sparsity
        names = {getattr(target, "param", target) for target in targets}
        return sparsify_sequential(module, calibration or [], self.method, pattern, sparsity, self.blocks,
                                   progress=self.progress, only=names,
                                   transposable=getattr(pattern, "transposable", False),
                                   scope=getattr(pattern, "scope", "local"), **self.options)


class WandaCriterion(CalibratedCriterion):
    """Wanda: |W|·‖x‖₂ per input column, mask per output row or N:M group, no weight update."""

    name = method = "wanda"


class SparseGPTCriterion(CalibratedCriterion):
    """SparseGPT: damped Hessian, column-block OBS pruning with the update of the remaining weights."""

    name = method = "sparsegpt"
    updates_weights = True


WEIGHT_CRITERIA.update({"wanda": WandaCriterion, "sparsegpt": SparseGPTCriterion})
