"""PaddleSlim's training-time unstructured pruners, on PyTorch modules: ``UnstructuredPruner`` and
``GMPUnstructuredPruner`` (``paddleslim.UnstructuredPruner`` / ``GMPUnstructuredPruner``), same arguments and
rules::

    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.55)
    for x, y in data:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()                  # ratio mode: a new threshold from the weights, then new masks
    pruner.update_params()             # before evaluating or saving (fxsparse also applies masks at every change)
    UnstructuredPruner.total_sparse(model)

The rules, as PaddleSlim has them:

- ``mode="threshold"``: a weight is kept where ``|w| >= threshold``. ``mode="ratio"``: the threshold is the
  ``round(ratio * n) - 1``-th smallest ``|w|`` (0-based) over all prunable weights (``local_sparsity=False``) or per
  weight (``local_sparsity=True``), recomputed at every ``step()``; so ``round(ratio * n) - 1`` entries go when the
  magnitudes are distinct.
- ``sparse_block=[m, n]``: the weight is averaged over m x n blocks (edge blocks padded by reflection) and a block
  is kept or pruned whole, by the absolute value of its average. Blocks need 2-D or 1x1-convolution weights.
- Skipped by default: normalisation layers (whole) and 1-D parameters (biases); ``prune_params_type=
  "conv1x1_only"`` prunes only 1x1 convolution weights; ``skip_params_func(model) -> set of names`` (parameter
  names, or module names to skip whole) replaces both.
- The masks are applied to the weights before every forward (PaddleSlim's forward pre-hook), through
  :class:`fxsparse.sparse.keep.MaskKeeper`; gradients are not masked, so a pruned weight may come back in ratio mode
  when the optimizer makes it large enough, as in PaddleSlim.
- GMP: the ratio follows ``r_i = initial + (target - initial) * ((i / steps - 1)^3 + 1)`` for the
  ``pruning_steps`` steps, each held ``pruning_iterations / pruning_steps`` iterations, after
  ``stable_iterations`` at 0 and followed by ``tunning_iterations`` at the target; ``resume_iteration`` skips the
  ratios already used, and the masks are recomputed at the first ``step()`` after a resume.

Where fxsparse differs: masks are held by the pruner (``pruner.masks``), not added to the model as buffers, so a
checkpoint loads into a dense model with ``strict=True``; a new mask is applied at once, not only at the next
forward; ``set_static_masks`` leaves skipped parameters alone (PaddleSlim would mask a bias that happens to be 0).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from fxsparse.errors import BadArgumentError

from .keep import MaskKeeper

NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm,
              torch.nn.LocalResponseNorm, torch.nn.RMSNorm)


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer: torch's, or any class whose name ends in "Norm" (Hugging Face's LlamaRMSNorm...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _direct_parameters(model: torch.nn.Module):
    """(module name, module, parameter name, parameter) for every parameter, at the module that holds it."""
    for module_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            yield module_name, module, f"{module_name}.{p_name}" if module_name else p_name, param


def _is_conv1x1(param: torch.Tensor) -> bool:
    return param.dim() == 4 and param.shape[2] == 1 and param.shape[3] == 1


def block_average(weight: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """PaddleSlim's ``cal_mxn_avg_matrix``: every entry replaced by the average of its m x n block (edge blocks
    padded by reflection); a 1x1 convolution weight is seen as its 2-D matrix."""
    m, n = block
    if (m, n) == (1, 1):
        return weight.detach().clone()
    matrix = weight.detach().reshape(weight.shape[0], weight.shape[1]).float()
    rows, cols = matrix.shape
    pad_rows, pad_cols = -rows % m, -cols % n
    mode = "reflect" if pad_rows < rows and pad_cols < cols else "replicate"
    padded = F.pad(matrix[None, None], (0, pad_cols, 0, pad_rows), mode=mode)[0, 0]
    means = F.avg_pool2d(padded[None, None], (m, n))[0, 0]
    full = means.repeat_interleave(m, 0).repeat_interleave(n, 1)[:rows, :cols]
    return full.reshape(weight.shape).to(weight.dtype)


def _kth_threshold(values: torch.Tensor, ratio: float) -> float:
    """PaddleSlim's threshold: the ``max(0, round(ratio * n) - 1)``-th smallest absolute value."""
    ordered = torch.sort(values.abs().flatten()).values
    return ordered[max(0, round(ratio * ordered.numel()) - 1)].item()


class UnstructuredPruner:
    """Unstructured pruning during training, by threshold or ratio; see the module's docstring."""

    def __init__(self, model: torch.nn.Module, mode: str, threshold: float = 0.01, ratio: float = 0.55,
                 prune_params_type: str | None = None, skip_params_func: Callable | None = None,
                 local_sparsity: bool = False, sparse_block: Sequence[int] = (1, 1)):
        if not isinstance(model, torch.nn.Module):
            raise BadArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if mode not in ("ratio", "threshold"):
            raise BadArgumentError(f"mode must be 'ratio' or 'threshold', not {mode!r}")
        if prune_params_type not in (None, "conv1x1_only"):
            raise BadArgumentError(f"prune_params_type must be None or 'conv1x1_only', not {prune_params_type!r}")
        if local_sparsity and mode != "ratio":
            raise BadArgumentError("local_sparsity=True needs mode='ratio'")
        if not (len(sparse_block) == 2 and all(isinstance(b, int) and b > 0 for b in sparse_block)):
            raise BadArgumentError(f"sparse_block must be two positive integers, not {sparse_block!r}")
        if not 0.0 <= ratio < 1.0:
            raise BadArgumentError(f"ratio must be a fraction in [0, 1), got {ratio!r}")
        self.model, self.mode, self.threshold, self.ratio = model, mode, threshold, ratio
        self.local_sparsity, self.sparse_block = local_sparsity, list(sparse_block)
        self.thresholds: dict[str, float] = {}
        if skip_params_func is None:
            skip_params_func = self._get_skip_params_conv1x1 if prune_params_type else self._get_skip_params
        self.skip_params = set(skip_params_func(model))
        self._params = {name: param for module_name, module, name, param in _direct_parameters(model)
                        if self._should_prune_layer(module_name) and name not in self.skip_params}
        if tuple(self.sparse_block) != (1, 1):
            for name, param in self._params.items():
                if param.dim() != 2 and not _is_conv1x1(param):
                    raise BadArgumentError(f"sparse_block={self.sparse_block} needs 2-D or 1x1-convolution weights; "
                                           f"{name} has shape {list(param.shape)} (skip it, or use "
                                           "prune_params_type='conv1x1_only')")
        masks = {name: torch.ones_like(param, dtype=torch.bool) for name, param in self._params.items()}
        self._keeper = MaskKeeper(model, masks, mask_gradients=False, before_forward=True)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool keep-mask}`` of every prunable parameter."""
        return self._keeper.masks

    def _should_prune_layer(self, module_name: str) -> bool:
        return module_name not in self.skip_params

    def _get_skip_params(self, model: torch.nn.Module) -> set[str]:
        """Normalisation layers (by module name) and 1-D parameters (by parameter name)."""
        skip = {name for name, module in model.named_modules() if is_norm(module)}
        return skip | {name for _, _, name, param in _direct_parameters(model) if param.dim() == 1}

    def _get_skip_params_conv1x1(self, model: torch.nn.Module) -> set[str]:
        """As :meth:`_get_skip_params`, and every parameter that is not a 1x1 convolution weight."""
        skip = self._get_skip_params(model)
        return skip | {name for _, _, name, param in _direct_parameters(model) if not _is_conv1x1(param)}

    def update_threshold(self) -> None:
        """Ratio mode: the threshold(s) from the weights as they are now."""
        averaged = {name: block_average(param, self.sparse_block) for name, param in self._params.items()}
        if self.local_sparsity:
            self.thresholds = {name: _kth_threshold(values, self.ratio) for name, values in averaged.items()}
        elif averaged:
            self.threshold = _kth_threshold(torch.cat([v.flatten().float() for v in averaged.values()]), self.ratio)

    def _update_masks(self) -> None:
        masks = {}
        for name, param in self._params.items():
            threshold = self.thresholds[name] if self.local_sparsity else self.threshold
            masks[name] = block_average(param, self.sparse_block).abs() >= threshold
        self._keeper.update(masks)

    def step(self) -> None:
        """After each optimizer step: ratio mode recomputes the threshold; both modes recompute the masks."""
        if self.mode == "ratio":
            self.update_threshold()
        self._update_masks()

    def update_params(self) -> None:
        """Multiply the masks into the weights (before evaluating or saving)."""
        self._keeper.apply()

    def set_static_masks(self) -> None:
        """Masks from the zeros the weights have now (to fine-tune a model pruned elsewhere)."""
        self._keeper.update({name: param.detach() != 0 for name, param in self._params.items()})

    def summarize_weights(self, model: torch.nn.Module, ratio: float = 0.1) -> float:
        """The ``|w|`` below which ``ratio`` of the prunable layers' parameters lie (a threshold to start from)."""
        data = torch.cat([param.detach().abs().flatten().float() for module_name, _, _, param
                          in _direct_parameters(model) if self._should_prune_layer(module_name)])
        return torch.sort(data).values[max(0, int(ratio * data.numel() - 1))].item()

    def remove(self) -> None:
        """Stop masking (fxsparse's addition): the hooks go, the weights stay as they are."""
        self._keeper.remove()

    @staticmethod
    def total_sparse(model: torch.nn.Module) -> float:
        """The fraction of zeros over all of ``model``'s parameters."""
        total = values = 0
        for _, _, _, param in _direct_parameters(model):
            total += param.numel()
            values += int(torch.count_nonzero(param))
        return 1 - values / total

    @staticmethod
    def total_sparse_conv1x1(model: torch.nn.Module) -> float:
        """The fraction of zeros over the 1x1 convolution weights (normalisation layers left out)."""
        total = values = 0
        for _, module, _, param in _direct_parameters(model):
            if not is_norm(module) and _is_conv1x1(param):
                total += param.numel()
                values += int(torch.count_nonzero(param))
        return 1 - values / total


class GMPUnstructuredPruner(UnstructuredPruner):
    """Gradual magnitude pruning: the ratio rises on PaddleSlim's cubic schedule; see the module's docstring."""

    CONFIG_KEYS = ("stable_iterations", "pruning_iterations", "tunning_iterations", "resume_iteration",
                   "pruning_steps", "initial_ratio")

    def __init__(self, model: torch.nn.Module, ratio: float = 0.55, prune_params_type: str | None = None,
                 skip_params_func: Callable | None = None, local_sparsity: bool = False,
                 sparse_block: Sequence[int] = (1, 1), configs: dict[str, Any] | None = None):
        if configs is None:
            raise BadArgumentError(f"configs is required: a dict with {', '.join(self.CONFIG_KEYS)}")
        missing = [key for key in self.CONFIG_KEYS if key not in configs]
        if missing:
            raise BadArgumentError(f"configs lacks {', '.join(missing)}")
        if configs["pruning_iterations"] / configs["pruning_steps"] <= 10:
            raise BadArgumentError("configs: pruning_iterations must be more than 10 x pruning_steps "
                                   f"(got {configs['pruning_iterations']} and {configs['pruning_steps']}), as "
                                   "PaddleSlim requires, so that every ratio is trained for a while")
        super().__init__(model, "ratio", 0.0, ratio, prune_params_type, skip_params_func, local_sparsity,
                         sparse_block)
        self.stable_iterations = configs["stable_iterations"]
        self.pruning_iterations = configs["pruning_iterations"]
        self.tunning_iterations = configs["tunning_iterations"]
        self.pruning_steps = configs["pruning_steps"]
        self.initial_ratio = configs["initial_ratio"]
        self.ratio = 0.0
        self.target_ratio = ratio
        self.cur_iteration = configs["resume_iteration"]
        self._need_prune_once = False
        self._prepare_training_hyper_parameters()

    def _prepare_training_hyper_parameters(self) -> None:
        self.ratio_increment_period = int(self.pruning_iterations / self.pruning_steps)
        rising = [self.initial_ratio + (self.target_ratio - self.initial_ratio) * ((i / self.pruning_steps - 1) ** 3 + 1)
                  for i in range(self.pruning_steps)]
        stable_steps = int(self.stable_iterations / self.pruning_iterations * self.pruning_steps)
        tunning_steps = int(self.tunning_iterations / self.pruning_iterations * self.pruning_steps)
        self.ratios_stack = ([0.0] * stable_steps + rising + [self.target_ratio] * tunning_steps)[::-1]
        for i in range(self.cur_iteration):  # resume: the ratios already used are gone
            self._need_prune_once = True
            if self.ratios_stack and i % self.ratio_increment_period == 0:
                self.ratio = self.ratios_stack.pop()

    def step(self) -> None:
        """After each optimizer step: the next ratio when its period starts, and new masks when it changed."""
        previous = self.ratio
        if self.cur_iteration % self.ratio_increment_period == 0:
            self.ratio = self.ratios_stack.pop() if self.ratios_stack else self.target_ratio
        if previous != self.ratio or self._need_prune_once:
            self.update_threshold()
            self._update_masks()
            self._need_prune_once = False
        self.cur_iteration += 1
