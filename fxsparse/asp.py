"""apex ASP, drop-in: ``from fxsparse.asp import ASP`` runs apex's recipes unchanged.

    ASP.prune_trained_model(model, optimizer)          # 2:4 on every eligible Linear and Conv2d, kept in training

    ASP.init_model_for_pruning(model, mask_calculator="m4n2_1d", verbosity=2, whitelist=[torch.nn.Linear],
                               allow_recompute_mask=False)
    ASP.init_optimizer_for_pruning(optimizer)
    ASP.compute_sparse_masks()                          # and restore_pruned_weights(), is_sparsity_enabled()

The calls mean what they mean in apex (``apex.contrib.sparsity.ASP``): masks are ``state_dict`` buffers named
``__<param>_mma_mask`` (and ``__<param>_mma_pruned_p`` with ``allow_recompute_mask``), so apex checkpoints load;
a weight is skipped, with a message, when apex would skip it (fp32/fp16 weights whose first dimension is not a
multiple of 8 or whose second is not a multiple of 16). Where fxsparse differs:

- No process-wide singleton. Each ``init_model_for_pruning`` called on the class starts a new session (its masks,
  its optimizer), and the argument-less calls (``compute_sparse_masks()``...) act on the latest one, as apex's
  recipes expect; a second model in the same process works, and an earlier model keeps its masks through its own
  optimizer. ``asp = ASP()`` gives a session of one's own: ``asp.init_model_for_pruning(model)``...
- Masks are kept with torch's hooks (gradient hooks and ``Optimizer.register_step_post_hook``, see
  :mod:`fxsparse.sparse.keep`), not by replacing ``optimizer.step``; the optimizer's momentum and Adam moments are
  zeroed at pruned entries when masks are computed.
- The ``m4n2_2d_*`` calculators work: masks that are 2:4 for the weight and its transpose, the best of the 90 valid
  4x4 blocks each (``_greedy`` and ``_best`` both give the best).
- A layer named in ``allowed_layer_names`` that cannot take the pattern, or a weight whose inputs are not a
  multiple of M, is a :class:`~fxsparse.FxsparseError` naming it, not a failure deep inside.
- ``allow_permutation``: a channel permutation that works and is exact (fxsparse.passes.ChannelPermutation through
  the one index-map rewrite), with the optimizer's state permuted too. It needs to trace the model, so it needs
  example inputs: ``init_model_for_pruning(..., example_inputs=x)`` or one forward call before the masks are
  computed; without them a log line says the model was not permuted.
"""
from __future__ import annotations

import logging
import re
import types
from typing import Any, Callable

import torch

from .errors import BadArgumentError, FxsparseError
from .sparse.keep import MaskKeeper
from .sparse.patterns import NM
from .sparse.targets import layout_of_module

log = logging.getLogger("fxsparse.asp")

DEFAULT_WHITELIST = [torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d]
SPARSE_PARAMETERS = {torch.nn.Linear: ["weight"], torch.nn.Conv1d: ["weight"], torch.nn.Conv2d: ["weight"],
                     torch.nn.Conv3d: ["weight"]}
_CALCULATOR = re.compile(r"^m(\d+)n(\d+)_(1d|2d_greedy|2d_best)$")


def pattern_of(mask_calculator: str) -> NM:
    """apex's calculator names: ``m4n2_1d`` is 2:4 along the inputs, ``m4n2_2d_best`` 2:4 both ways."""
    match = _CALCULATOR.match(mask_calculator)
    if not match:
        raise BadArgumentError(f"mask_calculator {mask_calculator!r} is not one of apex's ('m4n2_1d', "
                               "'m4n2_2d_greedy', 'm4n2_2d_best', or mMnN_1d) nor a callable")
    m, n, kind = int(match.group(1)), int(match.group(2)), match.group(3)
    return NM(n, m, transposable=kind != "1d")


class _SessionMethod:
    """A method that runs on an ``ASP()`` instance, or, called on the class, on the latest session (a new one for
    the calls that start one)."""

    def __init__(self, function: Callable, starts_session: bool = False):
        self.function, self.starts_session = function, starts_session
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner):
        if instance is None:
            instance = owner._session(self.function.__name__, self.starts_session)
        return types.MethodType(self.function, instance)


def _session_method(starts_session: bool = False):
    return lambda function: _SessionMethod(function, starts_session)


class _Entry:
    """One sparse parameter: its module, names and the mask (and stowed pruned values) buffers."""

    def __init__(self, module_name: str, module: torch.nn.Module, p_name: str, layout: str, recompute: bool):
        self.module_name, self.module, self.p_name, self.layout = module_name, module, p_name, layout
        param = self.param
        self.mask_name, self.pruned_name = f"__{p_name}_mma_mask", f"__{p_name}_mma_pruned_p"
        module.register_buffer(self.mask_name, torch.ones_like(param, dtype=torch.bool))
        if recompute:
            module.register_buffer(self.pruned_name, torch.zeros_like(param))

    @property
    def param(self) -> torch.nn.Parameter:
        return getattr(self.module, self.p_name)

    @property
    def mask(self) -> torch.Tensor:
        return self.module._buffers[self.mask_name]

    @property
    def pruned(self) -> torch.Tensor | None:
        return self.module._buffers.get(self.pruned_name)

    @property
    def full_name(self) -> str:
        return f"{self.module_name}.{self.p_name}" if self.module_name else self.p_name

    def describe(self) -> str:
        return f"{self.module_name}::{self.p_name} of size={list(self.param.shape)} and type={self.param.dtype}"


class ASP:
    """apex's Automatic SParsity, without its singleton; see the module's docstring."""

    _latest: "ASP | None" = None  # the session apex's argument-less class calls act on

    def __init__(self):
        self._model: torch.nn.Module | None = None
        self._entries: list[_Entry] = []
        self._calculate: Callable[[torch.Tensor, _Entry], torch.Tensor] | None = None
        self._pattern: NM | None = None
        self._keeper: MaskKeeper | None = None
        self._verbosity = 0
        self._allow_permutation = False
        self._permuted = False
        self._example_inputs: tuple[tuple, dict] | None = None

    @classmethod
    def _session(cls, call: str, starts_session: bool) -> "ASP":
        if starts_session:
            cls._latest = cls()
        elif cls._latest is None:
            raise FxsparseError(f"ASP.{call}: call ASP.init_model_for_pruning(model, ...) first")
        return cls._latest

    def _say(self, level: int, text: str) -> None:
        if self._verbosity >= level:
            print(f"[ASP] {text}")

    @classmethod
    def already_init_asp_model(cls) -> bool:
        """Whether an ``init_model_for_pruning`` on the class has set up a session (apex's check)."""
        return cls._latest is not None and cls._latest._model is not None

    @_session_method(starts_session=True)
    def init_model_for_pruning(self, model: torch.nn.Module, mask_calculator: Any = "m4n2_1d", verbosity: int = 3,
                               whitelist: list | None = None, allowed_layer_names: list[str] | None = None,
                               disallowed_layer_names: list[str] = (), allow_recompute_mask: bool = False,
                               custom_layer_dict: dict | None = None, allow_permutation: bool = True,
                               example_inputs: Any = None) -> None:
        """Add the mask buffers to every eligible layer's weights (all ones: sparsity starts off).

        ``example_inputs`` (fxsparse's addition: a tensor, a tuple, or a dict of keyword inputs) lets
        ``allow_permutation`` trace the model; a forward call before ``compute_sparse_masks`` does too."""
        if self._model is not None:
            raise FxsparseError("this ASP session already prunes a model; start another with ASP() "
                                "(or call ASP.init_model_for_pruning on the class)")
        if not isinstance(model, torch.nn.Module):
            raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if isinstance(mask_calculator, str):
            self._pattern = pattern_of(mask_calculator)
            self._calculate = lambda param, entry: self._pattern.keep_mask(param.abs(), entry.layout)
        elif callable(mask_calculator):
            self._calculate = lambda param, entry: mask_calculator(param).bool()
        else:
            raise BadArgumentError(f"mask_calculator must be an apex pattern name or a callable, not {mask_calculator!r}")
        parameters = dict(SPARSE_PARAMETERS)
        whitelist = list(DEFAULT_WHITELIST if whitelist is None else whitelist)
        if custom_layer_dict:
            parameters.update(custom_layer_dict)
            whitelist += [t for t in custom_layer_dict if t not in whitelist]
        for layer_type in whitelist:
            if layer_type not in parameters:
                raise BadArgumentError(f"whitelist: ASP does not know which parameters of {layer_type.__name__} to "
                                       "sparsify; give them in custom_layer_dict={Type: ['weight']}")
        names = {name for name, _ in model.named_modules()}
        for name in list(allowed_layer_names or []) + list(disallowed_layer_names):
            if name not in names:
                raise BadArgumentError(f"allowed/disallowed_layer_names: the model has no layer {name!r}")
        self._verbosity, self._allow_permutation = verbosity, allow_permutation
        planned = []  # every weight is checked before any buffer is added: a refused model is left as it was
        for name, module in model.named_modules():
            if not isinstance(module, tuple(whitelist)) or name in disallowed_layer_names:
                continue
            if allowed_layer_names is not None and name not in allowed_layer_names:
                continue
            named = allowed_layer_names is not None
            wanted = parameters.get(type(module)) or next(v for t, v in parameters.items() if isinstance(module, t))
            for p_name, param in module.named_parameters(recurse=False):
                if p_name in wanted and param.requires_grad:
                    layout = self._layout_if_eligible(name, module, p_name, param, named)
                    if layout:
                        planned.append((name, module, p_name, layout))
                else:
                    self._say(3, f"Not sparsifying {name}::{p_name} of size={list(param.shape)} and type={param.dtype}")
        self._model = model
        self._entries = [_Entry(*entry, recompute=allow_recompute_mask) for entry in planned]
        if allow_permutation:
            if example_inputs is not None:
                from .inputs import normalize_example_inputs

                self._example_inputs = normalize_example_inputs(example_inputs)
            else:
                handle = model.register_forward_pre_hook(
                    lambda module, args, kwargs: (self._remember_inputs(module, args, kwargs), handle.remove())[1],
                    with_kwargs=True)

    def _layout_if_eligible(self, name: str, module: torch.nn.Module, p_name: str, param: torch.Tensor,
                            named: bool) -> str | None:
        where = f"{name}::{p_name} of size={list(param.shape)}"
        if param.dim() < 2:
            raise FxsparseError(f"ASP cannot sparsify {where}: a weight needs at least two dimensions")
        if param.dtype in (torch.float32, torch.float16) and (param.shape[0] % 8 or param.shape[1] % 16):
            if named:
                raise FxsparseError(f"ASP cannot sparsify {where}, named in allowed_layer_names: its first dimension "
                                    "must be a multiple of 8 and its second of 16")
            self._say(1, f"Auto skipping pruning {where} and type={param.dtype} for sparsity")
            return None
        layout = (layout_of_module(module) if p_name == "weight" else None) or ("linear" if param.dim() == 2 else "conv")
        if self._pattern is not None and self._pattern.unfit(tuple(param.shape), layout):
            raise FxsparseError(f"ASP cannot sparsify {where} with {self._pattern.name}: "
                                f"{self._pattern.unfit(tuple(param.shape), layout)}")
        self._say(3, f"Sparsifying {where} and type={param.dtype} for sparsity")
        return layout

    @_session_method()
    def init_optimizer_for_pruning(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the masks through ``optimizer``'s steps (gradients and weights of pruned entries stay zero)."""
        if self._keeper is not None:
            raise FxsparseError("ASP.init_optimizer_for_pruning: this session already has an optimizer")
        masks = {entry.full_name: entry.mask for entry in self._entries}
        self._keeper = MaskKeeper(self._model, masks, [optimizer])

    def _permute(self) -> None:
        """Channel permutation (``allow_permutation``), once per session, right before the first masks: channels
        are reordered in place (weights, BatchNorm statistics, optimizer state, these masks) so that N:M pruning
        keeps more magnitude; the model computes exactly what it did (verified on the example inputs).

        The model is traced, so it needs example inputs: ``init_model_for_pruning(..., example_inputs=x)``, or any
        forward call after ``init_model_for_pruning`` (its inputs are kept). Without them a log line says so."""
        if not self._allow_permutation or self._permuted:
            return
        self._permuted = True
        if self._pattern is None:
            log.warning("ASP: allow_permutation=True, but a custom mask_calculator has no N:M pattern to permute for")
            return
        if self._example_inputs is None:
            log.warning("ASP: allow_permutation=True, but no example inputs are known to trace the model with; pass "
                        "init_model_for_pruning(..., example_inputs=x) or run one forward first. Not permuted.")
            return
        from .api import permute_channels

        args, kwargs = self._example_inputs
        companions = {entry.full_name: [t for t in (entry.mask, entry.pruned) if t is not None]
                      for entry in self._entries}
        result = permute_channels(self._model, args, f"{self._pattern.n}:{self._pattern.m}",
                                  self._keeper.optimizers if self._keeper is not None else (), example_kwargs=kwargs,
                                  companions=companions, consumers=[entry.full_name for entry in self._entries])
        self._say(2, f"Permuted: {result.report.pass_record('ChannelPermutation').summary}")

    def _remember_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._example_inputs is None:
            self._example_inputs = (args, kwargs)

    @_session_method()
    def compute_sparse_masks(self) -> None:
        """Compute the masks from the weights now and apply them: sparsity on."""
        with torch.no_grad():
            self._permute()
            for entry in self._entries:
                param, mask, pruned = entry.param, entry.mask, entry.pruned
                if bool(mask.sum() < mask.numel()):  # recomputing: first restore the dense weights
                    if pruned is None:
                        raise FxsparseError(f"ASP.compute_sparse_masks: {entry.full_name} is already sparse and its "
                                            "pruned values were not kept; use allow_recompute_mask=True")
                    param.add_(pruned.to(param.device))
                mask.copy_(self._calculate(param, entry))
                if pruned is not None:
                    pruned.copy_(param * ~mask)
                param.mul_(mask)
                self._say(2, f"Enabled {100.0 - 100.0 * mask.sum().item() / mask.numel():.2f}% sparsity for "
                             f"{entry.describe()}")
            if self._keeper is not None:
                self._keeper.update(self._keeper.masks)  # zero the optimizer state at the pruned entries

    @_session_method()
    def restore_pruned_weights(self) -> None:
        """Sparsity off: the masks become all ones and the pruned values come back (needs allow_recompute_mask)."""
        with torch.no_grad():
            for entry in self._entries:
                mask, pruned = entry.mask, entry.pruned
                if bool(mask.sum() < mask.numel()):
                    if pruned is None:
                        raise FxsparseError(f"ASP.restore_pruned_weights: the pruned values of {entry.full_name} "
                                            "were not kept; use allow_recompute_mask=True")
                    entry.param.add_(pruned.to(entry.param.device))
                    mask.fill_(True)
                    pruned.zero_()
                    self._say(2, f"Disabled sparsity for {entry.module_name}::{entry.p_name} (dense weights restored)")

    @_session_method()
    def is_sparsity_enabled(self) -> bool:
        """True when every mask is N:M-sparse, False when every mask is all ones; an error for a mixture."""
        full, sparse = 0, 0
        density = self._pattern.n / self._pattern.m if self._pattern is not None else 0.5
        for entry in self._entries:
            kept, total = int(entry.mask.sum()), entry.mask.numel()
            full += kept == total
            sparse += kept == round(total * density)
        if full == len(self._entries):
            return False
        if sparse == len(self._entries):
            return True
        raise FxsparseError(f"inconsistent model sparsity: {full} of {len(self._entries)} masks dense, {sparse} sparse")

    @_session_method(starts_session=True)
    def prune_trained_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            example_inputs: Any = None) -> None:
        """apex's one call: 2:4 on Linear and Conv2d weights, kept through ``optimizer``'s steps, on now
        (permuted first when ``example_inputs`` are given, fxsparse's addition)."""
        self.init_model_for_pruning(model, mask_calculator="m4n2_1d", verbosity=2,
                                    whitelist=[torch.nn.Linear, torch.nn.Conv2d], allow_recompute_mask=False,
                                    example_inputs=example_inputs)
        self.init_optimizer_for_pruning(optimizer)
        self.compute_sparse_masks()

    @property
    def sparse_parameters(self) -> list[str]:
        """The names of the parameters this session sparsifies."""
        return [entry.full_name for entry in self._entries]
