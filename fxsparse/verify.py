"""Numerical verification: run a rewritten module and its reference on the same random inputs and compare."""
from __future__ import annotations

from typing import Any

import torch

from .errors import BadArgumentError, VerificationError
from .graph_utils import iter_tensors
from .inputs import inputs_like


# The relative error accepted by default: float32 rounding over a deep model's changed summation orders.
DEFAULT_TOLERANCE = 1e-4
# For float16 and bfloat16 outputs, this many of the dtype's machine epsilons: prune + shrink of the built-in
# transformer and of torchvision's ResNet-18 differ from the masked model by at most 0.8 eps in either dtype.
HALF_PRECISION_EPSILONS = 16


def check_tolerance(tolerance: Any) -> None:
    """BadArgumentError unless ``tolerance`` is a number >= 0, None (measure only) or "auto"."""
    if tolerance is None or tolerance == "auto":
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise BadArgumentError(f"tolerance must be a relative error >= 0 (e.g. 1e-4), None to only measure, or "
                               f"'auto', not {tolerance!r}")


def tolerance_for(outputs: Any, tolerance: float | str | None) -> float | None:
    """The tolerance to apply to ``outputs``: the user's, or for "auto" ``DEFAULT_TOLERANCE`` widened to what the
    least precise floating output dtype can hold (float16, bfloat16)."""
    if tolerance != "auto":
        return tolerance
    eps = [torch.finfo(t.dtype).eps for t in iter_tensors(outputs) if t.is_floating_point()]
    return max([DEFAULT_TOLERANCE] + [HALF_PRECISION_EPSILONS * e for e in eps])


def compare_outputs(reference: Any, candidate: Any) -> dict[str, float]:
    """Largest absolute and relative (to the reference's largest magnitude) difference over all output tensors."""
    ref = [t.detach().float() for t in iter_tensors(reference)]
    got = [t.detach().float() for t in iter_tensors(candidate)]
    if len(ref) != len(got):
        raise VerificationError(f"the rewritten module returns {len(got)} tensors, the reference {len(ref)}")
    max_abs, max_rel = 0.0, 0.0
    for index, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            raise VerificationError(f"output {index} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}")
        diff = (r - g).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return {"max_abs": max_abs, "max_rel": max_rel}


def trial_inputs(args: tuple, kwargs: dict, trials: int = 2, seed: int = 0) -> list[tuple[tuple, dict]]:
    """The random inputs, shaped like the example inputs, that verification compares on (the same for a seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [inputs_like(args, kwargs, generator) for _ in range(trials)]


def verify_equivalent(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    trials: int = 2,
    tolerance: float | str | None = "auto",
    what: str = "rewrite",
    seed: int = 0,
    known: dict[int, Any] | None = None,
) -> dict[str, float]:
    """Compare on ``trials`` random inputs shaped like the example inputs (:func:`trial_inputs`); raise if the
    relative error exceeds ``tolerance`` (None: only measure; "auto": see :func:`tolerance_for`). ``known``: the
    reference's outputs on some of those inputs, by trial index, computed already by a pass that had to run it."""
    worst = {"max_abs": 0.0, "max_rel": 0.0, "trials": trials}
    known = known or {}
    with torch.no_grad():
        for trial, (trial_args, trial_kwargs) in enumerate(trial_inputs(args, kwargs, trials, seed)):
            expected = known[trial] if trial in known else reference(*trial_args, **trial_kwargs)
            result = compare_outputs(expected, candidate(*trial_args, **trial_kwargs))
            tolerance = tolerance_for(expected, tolerance)
            worst["max_abs"] = max(worst["max_abs"], result["max_abs"])
            worst["max_rel"] = max(worst["max_rel"], result["max_rel"])
    if tolerance is not None and worst["max_rel"] > tolerance:
        raise VerificationError(
            f"{what} changed the model's outputs: max relative difference {worst['max_rel']:.3e} "
            f"(absolute {worst['max_abs']:.3e}) exceeds the tolerance {tolerance:.0e}"
        )
    return worst
