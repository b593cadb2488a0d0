"""The growth trainer: msModelSlim's ``sparse_model_width`` / ``sparse_model_depth``, function-preserving.

``epochs_each_stage=[10, 20, -1]``: the model is cut to 1/4 of its depth (or width) and trained 10 epochs, grown
2x and trained 20, grown 2x again to its original size and trained to the end (-1). ``n`` stages start at
``1/2**(n-1)``. Stages count optimizer steps (a step post hook on the user's optimizer), so gradient accumulation
does not move them. The model stays the object the user passed (blocks inserted in place), the optimizer stays
theirs (parameter groups updated, state carried, see fxsparse.growth.optim), and every growth after the cut
computes what the model computed before it (depth: copies that start as the identity).

What a kind of growth needs is one small interface, :class:`Grower`: ``cut(model, fraction)`` once, then
``grow(model, fraction)`` returning how each new parameter was made.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch

from ..errors import BadArgumentError
from .blocks import blocks_of, find_block_runs
from .identity import NotGrowableError, analyse_block
from .insert import Copy, numbered_children, rearrange_children
from .layout import spread
from .optim import Derivation, remap_optimizer

log = logging.getLogger("fxsparse")


class Grower:
    """A kind of growth. ``cut`` makes ``model`` ``fraction`` of its size in place; ``grow`` makes it ``fraction``
    of its original size (1.0: exactly the original) in place, preserving its function, and returns how each new
    parameter was made, for :func:`remap_optimizer`."""

    on_cut: Callable[[dict], None] | None = None  # for a cut that happens later (see WidthGrower)

    def cut(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation] | None:
        """Returns how each parameter the cut replaced was made (None: the survivors are the same objects)."""
        raise NotImplementedError

    def grow(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation]:
        raise NotImplementedError


class DepthGrower(Grower):
    """Depth: every run of repeated blocks keeps evenly spaced blocks at the cut; a growth inserts identity copies
    after the blocks, spread evenly. ``example_inputs`` are needed for models only torch.export can trace (Hugging
    Face transformers); others are traced symbolically without them."""

    def __init__(self, example_inputs: Any = None):
        self.example_inputs = example_inputs
        self.runs: dict[tuple[str, str], list[int | None]] = {}  # (container, stem) -> run id of each child
        self.lengths: list[int] = []  # original length of each run
        self.recipes: list = []

    def _analyse(self, model: torch.nn.Module) -> None:
        from .. import trace as fxsparse_trace

        if self.example_inputs is not None:
            gm = fxsparse_trace(model, self.example_inputs).module
        else:
            try:
                gm = torch.fx.symbolic_trace(model)
            except Exception as error:  # noqa: BLE001 - say what to do instead
                raise BadArgumentError(f"{type(model).__name__} does not trace symbolically ({type(error).__name__});"
                                       " pass example_inputs= so that it can be traced with torch.export") from None
        blocks = blocks_of(gm)
        for run in find_block_runs(gm):
            key = (run.container, run.stem)
            parent = model.get_submodule(run.container) if run.container else model
            members = self.runs.setdefault(key, [None] * len(numbered_children(parent, run.container)[1]))
            for index in run.indices:
                members[index] = len(self.lengths)
            self.lengths.append(len(run.indices))
            try:
                self.recipes.append(analyse_block(gm, blocks[run.paths()[-1]]).recipe)
            except NotGrowableError as error:
                log.warning("fxsparse: %s; its copies start as plain copies, which changes the function", error)
                self.recipes.append(None)
        if not self.runs:
            raise BadArgumentError(f"{type(model).__name__} has no run of repeated blocks to cut and grow in depth")

    def cut(self, model: torch.nn.Module, fraction: float) -> None:
        self._analyse(model)
        for (container, _), members in self.runs.items():
            keep = set()
            for run, length in enumerate(self.lengths):
                positions = [i for i, m in enumerate(members) if m == run]
                if positions:
                    count = self._count(run, fraction)
                    keep |= {positions[int(k * length / count)] for k in range(count)}
            layout = [i for i, m in enumerate(members) if m is None or i in keep]
            rearrange_children(model, container, layout)
            members[:] = [members[i] for i in layout]

    def _count(self, run: int, fraction: float) -> int:
        return self.lengths[run] if fraction >= 1.0 else max(1, round(self.lengths[run] * fraction))

    def grow(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation]:
        derivations: dict[torch.nn.Parameter, Derivation] = {}
        for (container, _), members in self.runs.items():
            hosts: dict[int, int] = {}
            for run in range(len(self.lengths)):
                positions = [i for i, m in enumerate(members) if m == run]
                if positions:
                    for host in spread(positions, self._count(run, fraction) - len(positions), "interleave"):
                        hosts[host] = hosts.get(host, 0) + 1
            if not hosts:
                continue
            layout = [e for i in range(len(members))
                      for e in [i, *([Copy(i, self.recipes[members[i]])] * hosts[i] if i in hosts else [])]]
            derivations.update(rearrange_children(model, container, layout))
            members[:] = [members[e.source if isinstance(e, Copy) else e] for e in layout]
        return derivations


class WidthGrower(Grower):
    """Width: the cut is fxsparse's own structured pruning, in place; a growth is ``passes.ExpandWidth``, in place
    and function-preserving. A copy of the model as it was before the cut is kept (``like=``), so that every group
    grows back to exactly its original width at the last stage, also where the cut's widths do not divide it."""

    def __init__(self, example_inputs: Any = None):
        self.example_inputs, self.example_kwargs = example_inputs, None
        self.original: torch.nn.Module | None = None
        self.fraction = 1.0
        # called with the cut's derivations when the cut waits for the first forward (no example_inputs)
        self.on_cut: Callable[[dict], None] | None = None

    def cut(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation] | None:
        """Without ``example_inputs`` (msModelSlim's signature has none) the cut waits for the model's first
        forward, traces it with those inputs and hands its derivations to ``on_cut`` (not under DDP: there, pass
        example_inputs, so that the model is cut before it is wrapped)."""
        if self.example_inputs is not None:
            return self._cut(model, fraction)

        def cut_on_first_forward(module, args, kwargs):
            handle.remove()
            self.example_inputs, self.example_kwargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                             for a in args), dict(kwargs)
            derivations = self._cut(module, fraction)
            if self.on_cut is not None:
                self.on_cut(derivations)

        handle = model.register_forward_pre_hook(cut_on_first_forward, with_kwargs=True)
        return None

    def _cut(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation]:
        from ..api import prune, width_derivations

        self.original = copy.deepcopy(model)
        before = dict(model.named_parameters())
        result = prune(model, self.example_inputs, keep=fraction, inplace=True, example_kwargs=self.example_kwargs)
        self.fraction = fraction
        return width_derivations(model, before, result.plan)

    def grow(self, model: torch.nn.Module, fraction: float) -> dict[torch.nn.Parameter, Derivation]:
        from .. import compile as fxsparse_compile
        from ..api import width_derivations
        from ..passes import ExpandWidth

        factor = None if fraction >= 1.0 else fraction / self.fraction
        before = dict(model.named_parameters())
        result = fxsparse_compile(model, self.example_inputs, [ExpandWidth(factor=factor, like=self.original)],
                                  example_kwargs=self.example_kwargs, inplace=True)
        self.fraction = fraction
        return width_derivations(model, before, result.plan)


class GrowthTrainer:
    """Runs the stages of ``epochs_each_stage`` on the user's own model and optimizer; see the module docstring.

    ``before_growth`` / ``after_growth``: callbacks ``fn(trainer)`` run around every growth (with DDP: re-wrap
    the model in ``after_growth``). ``state_dict`` / ``load_state_dict`` checkpoint the stage: on resume, build the
    model and optimizer as at the start, call ``sparse_model_*``, then ``load_state_dict`` of the trainer, then of
    the model and the optimizer.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                 epochs_each_stage, grower: Grower):
        check_arguments(model, optimizer, steps_per_epoch, epochs_each_stage)
        self.model, self.optimizer, self.grower = model, optimizer, grower
        self.stages = len(epochs_each_stage)
        self.boundaries = [steps_per_epoch * sum(epochs_each_stage[:s + 1]) for s in range(self.stages - 1)]
        self.stage, self.steps = 0, 0
        self.before_growth: list[Callable[[GrowthTrainer], None]] = []
        self.after_growth: list[Callable[[GrowthTrainer], None]] = []
        grower.on_cut = lambda derivations: remap_optimizer(optimizer, derivations, model.parameters())
        grower.on_cut(grower.cut(model, self.fraction(0)) or {})
        self._hook = optimizer.register_step_post_hook(self._after_step)
        optimizer.fxsparse_growth = self

    def fraction(self, stage: int) -> float:
        return 1.0 / 2 ** (self.stages - 1 - stage)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        while self.stage < self.stages - 1 and self.steps >= self.boundaries[self.stage]:
            self.grow_to(self.stage + 1)

    def grow_to(self, stage: int) -> None:
        for callback in self.before_growth:
            callback(self)
        derivations = self.grower.grow(self.model, self.fraction(stage))
        remap_optimizer(self.optimizer, derivations, self.model.parameters())
        self.stage = stage
        log.info("fxsparse: growth stage %d of %d at optimizer step %d: %d parameters", stage + 1, self.stages,
                 self.steps, sum(p.numel() for p in self.model.parameters()))
        for callback in self.after_growth:
            callback(self)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "stage": self.stage}

    def load_state_dict(self, state: dict[str, int]) -> None:
        while self.stage < state["stage"]:
            self.grow_to(self.stage + 1)
        self.steps = state["steps"]

    def remove(self) -> None:
        """Stop growing: the step hook goes."""
        self._hook.remove()


def check_arguments(model, optimizer, steps_per_epoch, epochs_each_stage) -> None:
    """msModelSlim's rules, as one-line errors naming the argument."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        raise BadArgumentError("model is wrapped in (Distributed)DataParallel: pass the model inside (ddp.module) "
                               "and wrap it again after every growth (see GrowthTrainer.after_growth)")
    if not isinstance(model, torch.nn.Module):
        raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BadArgumentError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
        raise BadArgumentError(f"steps_per_epoch must be an int above 0, got {steps_per_epoch!r}")
    if not isinstance(epochs_each_stage, (list, tuple)) or len(epochs_each_stage) <= 2:
        raise BadArgumentError(f"epochs_each_stage must be a list or tuple of more than 2 ints, got "
                               f"{epochs_each_stage!r}")
    for index, epochs in enumerate(epochs_each_stage):
        last = index == len(epochs_each_stage) - 1
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not (epochs > 0 or (last and epochs == -1)):
            raise BadArgumentError(f"epochs_each_stage[{index}] must be an int above 0"
                                   f"{' or -1 (to the end)' if last else ''}, got {epochs!r}")


def sparse_model_depth(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                       epochs_each_stage, *, example_inputs: Any = None) -> torch.nn.Module:
    """msModelSlim's depth growth training: cut ``model`` to 1/2**(n-1) of its repeated blocks now, grow it 2x at
    the end of each stage (copies that start as the identity). Returns ``model`` itself; the trainer is
    ``optimizer.fxsparse_growth``."""
    GrowthTrainer(model, optimizer, steps_per_epoch, epochs_each_stage, DepthGrower(example_inputs))
    return model


def sparse_model_width(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                       epochs_each_stage, *, example_inputs: Any = None) -> torch.nn.Module:
    """msModelSlim's width growth training (cut by fxsparse's structured pruning, grown by passes.ExpandWidth)."""
    check_arguments(model, optimizer, steps_per_epoch, epochs_each_stage)
    GrowthTrainer(model, optimizer, steps_per_epoch, epochs_each_stage, WidthGrower(example_inputs))
    return model
