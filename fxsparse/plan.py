"""The plan: every decision fxsparse made, as JSON, re-applicable to a fresh instance of the same model.

A structural decision is recorded per parameter: for each dimension the rewrite re-indexed, which old index each
new index holds (a sorted subset when channels are removed, a permutation when reordered, repeats when grown). That form does not
depend on how the dependency analysis numbers its groups, so a plan written by one fxsparse version can be checked
and re-applied by another, and a person can read it.
"""
from __future__ import annotations

import base64
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PlanMismatchError

PLAN_FORMAT = 1


def _version() -> str:
    from . import __version__

    return __version__


def pack_bits(keep: torch.Tensor) -> str:
    """A bool tensor as base64 text, 8 entries a byte (row-major): a 4096 x 4096 mask is 2.8 MB of JSON."""
    flat = keep.detach().flatten().to(torch.uint8).cpu()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (padded * weights).sum(dim=1, dtype=torch.uint8)
    return base64.b64encode(packed.numpy().tobytes()).decode("ascii")


def unpack_bits(text: str, shape: list[int]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`."""
    raw = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    bits = raw.unsqueeze(1).bitwise_right_shift(torch.arange(7, -1, -1, dtype=torch.uint8)).bitwise_and(1)
    count = 1
    for size in shape:
        count *= size
    if bits.numel() < count:
        raise PlanMismatchError(f"a recorded mask holds {bits.numel()} bits, its shape {shape} needs {count}")
    return bits.flatten()[:count].bool().reshape(shape)


@dataclass
class Plan:
    """``kept[param][dim] = sorted kept indices``; ``shapes_before`` lets a fresh model be checked against it."""

    model: str = ""
    frontend: str = ""
    passes: list[dict[str, Any]] = field(default_factory=list)
    shapes_before: dict[str, list[int]] = field(default_factory=dict)
    shapes_after: dict[str, list[int]] = field(default_factory=dict)
    kept: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    # Per kept entry that consumes copied channels (width growth): the factor each new index is scaled by.
    scales: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    folds: list[dict[str, str]] = field(default_factory=list)  # constants kept in a made bias or correction
    inputs: dict[str, Any] = field(default_factory=dict)  # shapes and dtypes of the example inputs
    extra: dict[str, Any] = field(default_factory=dict)
    # weight sparsity: param -> {"shape", "bits" (packed keep-mask, base64), and what made it: pattern, layout...}
    masks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_pass(self, name: str, settings: dict[str, Any]) -> None:
        self.passes.append({"name": name, "settings": settings})

    def record_kept(self, param: str, dim: int, kept: list[int], scale: list[float] | None = None) -> None:
        """Index ``i`` of ``param``'s new dimension ``dim`` is old index ``kept[i]`` (a subset when channels are
        removed, a permutation when reordered, with repeats when grown), times ``scale[i]`` when given. Composed
        with what earlier rewrites recorded, so the entry always maps the original model to the latest one."""
        previous = self.kept.setdefault(param, {}).get(dim)
        previous_scale = self.scales.get(param, {}).get(dim)
        if previous is not None:
            if previous_scale is not None:
                old_scale = [previous_scale[i] for i in kept]
                scale = [a * b for a, b in zip(old_scale, scale)] if scale is not None else old_scale
            kept = [previous[i] for i in kept]
        self.kept[param][dim] = list(kept)
        if scale is not None:
            self.scales.setdefault(param, {})[dim] = list(scale)

    @property
    def is_permutation_or_growth(self) -> bool:
        """Whether some recorded index map reorders or repeats indices (not a plain sorted subset)."""
        return any(list(k) != sorted(set(k)) for dims in self.kept.values() for k in dims.values())

    def record_mask(self, param: str, keep: torch.Tensor, **info: Any) -> None:
        """Record a weight's keep-mask (a later mask of the same weight replaces it), packed 8 entries a byte."""
        self.masks[param] = {**info, "shape": list(keep.shape), "bits": pack_bits(keep)}

    def sparsity_masks(self, final: bool = True) -> dict[str, torch.Tensor]:
        """``{param: bool keep-mask}`` of every recorded mask, in the parameter's planned final shape (a mask made
        before a shrink is cut to the indices the shrink kept), or with ``final=False`` as it was recorded."""
        masks = {}
        for param, entry in self.masks.items():
            keep = unpack_bits(entry["bits"], entry["shape"])
            if final and entry["shape"] != self.shapes_after.get(param, entry["shape"]):
                for dim, index in self.kept.get(param, {}).items():
                    keep = keep.index_select(dim, torch.tensor(index, dtype=torch.long))
            masks[param] = keep
        return masks

    def masks_before_shrink(self) -> set[str]:
        """The masked weights whose mask was made before a shrink changed their shape: a replay applies those masks
        before the structural changes, in the order the compile ran them."""
        return {param for param, entry in self.masks.items()
                if entry["shape"] == self.shapes_before.get(param) != self.shapes_after.get(param)}

    @property
    def is_structural(self) -> bool:
        return bool(self.kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "fxsparse_version": _version(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "model": self.model,
            "frontend": self.frontend,
            "passes": self.passes,
            "shapes_before": self.shapes_before,
            "shapes_after": self.shapes_after,
            "kept": {p: {str(d): k for d, k in dims.items()} for p, dims in self.kept.items()},
            "scales": {p: {str(d): k for d, k in dims.items()} for p, dims in self.scales.items()},
            "groups": self.groups,
            "folds": self.folds,
            "inputs": self.inputs,
            "extra": self.extra,
            "masks": self.masks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict):
            raise PlanMismatchError(f"a plan is a JSON object, not {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanMismatchError(f"plan format {data.get('format')!r} is not the supported format {PLAN_FORMAT}")
        try:
            return cls._from_checked_dict(data)
        except (TypeError, ValueError, AttributeError) as error:
            raise PlanMismatchError(f"malformed plan: {error}") from None

    @classmethod
    def _from_checked_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(
            model=data.get("model", ""),
            frontend=data.get("frontend", ""),
            passes=list(data.get("passes", [])),
            shapes_before={k: list(v) for k, v in data.get("shapes_before", {}).items()},
            shapes_after={k: list(v) for k, v in data.get("shapes_after", {}).items()},
            kept={p: {int(d): list(k) for d, k in dims.items()} for p, dims in data.get("kept", {}).items()},
            scales={p: {int(d): list(k) for d, k in dims.items()} for p, dims in data.get("scales", {}).items()},
            groups=list(data.get("groups", [])),
            folds=list(data.get("folds", [])),
            inputs=dict(data.get("inputs", {})),
            extra=dict(data.get("extra", {})),
            masks={p: dict(entry) for p, entry in data.get("masks", {}).items()},  # absent from older plans
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise PlanMismatchError(f"plan file {str(path)!r} is not valid JSON: {error}") from None
        except OSError as error:
            raise PlanMismatchError(f"cannot read plan file {str(path)!r}: {error.strerror}") from None
        return cls.from_dict(data)

    def validate(self, model: torch.nn.Module | None = None) -> None:
        """Raise PlanMismatchError naming the first entry that cannot be right, before anything is touched.

        Every ``kept[param][dim]`` must name a planned tensor and one of its dimensions, hold integer indices
        inside that dimension, and have as many as ``shapes_after`` says; ``scales`` must match their entries. A
        plan that only removes channels holds strictly increasing indices; repeats are legal only in a plan that
        grows (``scales`` recorded, or a dimension wider after than before), other orders only in a plan that
        reorders (some entry a full permutation of its dimension) or grows. With ``model``, the model must also
        have the plan's tensors and shapes (see :meth:`check_fits`)."""
        self._check_nothing_pruned_inside_lowered_modules()  # the likeliest reason for unknown tensors: say it first
        entries = [(param, dim, kept) for param, dims in self.kept.items() for dim, kept in dims.items()]
        for param, dim, kept in entries:
            self._check_entry(param, dim, kept)
        grows = bool(self.scales) or any(len(kept) > self.shapes_before[p][d] for p, d, kept in entries)
        reorders = any(len(kept) == self.shapes_before[p][d] and kept != sorted(kept) for p, d, kept in entries)
        for param, dim, kept in entries:
            where = f"plan entry kept[{param!r}][{dim}]"
            if len(set(kept)) != len(kept) and not grows:
                repeated = next(i for i in kept if kept.count(i) > 1)
                raise PlanMismatchError(f"{where} holds index {repeated} twice, in a plan that does not grow")
            if kept != sorted(kept) and not (grows or reorders):
                raise PlanMismatchError(f"{where} is not in increasing order, in a plan that only removes")
        for param, dims in self.scales.items():
            for dim, scale in dims.items():
                kept = self.kept.get(param, {}).get(dim)
                if kept is None or len(scale) != len(kept):
                    raise PlanMismatchError(f"plan entry scales[{param!r}][{dim}] does not match an index map of "
                                            f"as many entries (kept has {None if kept is None else len(kept)})")
        if model is not None:
            self.check_fits(model)

    def _check_entry(self, param: str, dim: Any, kept: Any) -> None:
        where = f"plan entry kept[{param!r}][{dim}]"
        shape = self.shapes_before.get(param)
        if shape is None:
            raise PlanMismatchError(f"{where} names a tensor the plan has no shape for (shapes_before)")
        if not isinstance(dim, int) or not 0 <= dim < len(shape):
            raise PlanMismatchError(f"{where}: {param!r} has {len(shape)} dimensions, no dimension {dim}")
        if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            raise PlanMismatchError(f"{where} must be a list of integer indices")
        bad = next((i for i in kept if not 0 <= i < shape[dim]), None)
        if bad is not None:
            raise PlanMismatchError(f"{where} holds index {bad}, outside 0..{shape[dim] - 1} "
                                    f"(dimension {dim} of {param!r} has size {shape[dim]})")
        after = self.shapes_after.get(param)
        if after is not None and (dim >= len(after) or after[dim] != len(kept)):
            raise PlanMismatchError(f"{where} keeps {len(kept)} indices but shapes_after gives {param!r} the shape "
                                    f"{after}")

    def apply_to(self, module: torch.nn.Module, example_inputs: Any = None,
                 example_kwargs: dict | None = None) -> torch.nn.Module:
        """Shrink ``module`` (a fresh instance of the planned model) to this plan, in place; see
        :func:`fxsparse.apply_plan`."""
        from .api import apply_plan

        return apply_plan(module, self, example_inputs, example_kwargs)

    def check_fits(self, module: torch.nn.Module) -> None:
        """Raise PlanMismatchError naming the first parameter whose name or shape differs from the planned model."""
        self._check_nothing_pruned_inside_lowered_modules()
        shapes = {n: list(t.shape) for n, t in module.state_dict(keep_vars=True).items()}
        for name, shape in self.shapes_before.items():
            if name not in shapes:
                raise PlanMismatchError(f"plan expects a tensor {name!r} of shape {shape}, the model has none")
            if shapes[name] != shape:
                raise PlanMismatchError(f"plan expects {name!r} of shape {shape}, the model's is {shapes[name]}")
        for name in shapes:
            if name not in self.shapes_before:
                raise PlanMismatchError(f"the model has a tensor {name!r} the plan does not know: "
                                        f"the plan was made for another architecture ({self.model or 'unknown'})")

    def _check_nothing_pruned_inside_lowered_modules(self) -> None:
        """A module the compile lowered (``extra["lowered"]``, see fxsparse.lower) has no counterpart in the model
        that could take what was pruned inside it: no nn.MultiheadAttention has fewer heads than its width allows."""
        lowered = self.extra.get("lowered", [])
        inside = next((name for name in self.kept if any(name.startswith(f"{path}.") for path in lowered)), None)
        if inside is not None:
            raise PlanMismatchError(
                f"the plan prunes {inside!r}, inside an nn.MultiheadAttention that the compile lowered into linear "
                "and attention ops; no nn.MultiheadAttention can hold that, so this plan fits the compiled module "
                "only. For a plan that re-applies to the model, compile with lower_modules=False")
