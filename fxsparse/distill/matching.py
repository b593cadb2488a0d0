"""Matching a student's intermediate value to the teacher's: through fxsparse's index maps, or a learned projection.

A student that fxsparse made (Prune + Shrink, ``load_big_into_small``, width growth) comes with an index map per
tensor: ``kept[param][dim]`` lists, for each index of the student's tensor along ``dim``, the teacher index it came
from, so ``student_param = teacher_param.index_select(dim, kept)``. The maps may reorder and repeat indices; nothing
here assumes them sorted or unique.

**Which map a value follows (the rule).** A module's output keeps the channels of the parameter that produces it:

1. the module's own ``weight`` if it has one (Linear, Conv, BatchNorm, LayerNorm, Embedding...);
2. else (a container: a Sequential, a transformer layer) the ``weight`` of its *last* weighted submodule in
   registration order (a BertLayer -> its output LayerNorm; conv-BN-ReLU -> the BN);
3. else (ReLU, pooling, dropout) the ``weight`` of the last weighted module registered *before* it.

The channel dim of that weight is 0 (its output features), except for an Embedding, a transposed convolution and
Hugging Face's Conv1D, where it is 1. The value's channel dim (``feature_dim``) is 1 after a convolution or a
BatchNorm/GroupNorm/InstanceNorm (N, C, ...) and -1 otherwise (..., C). Both can be set in the config: ``s_param``
names the student parameter whose map (along its channel dim) the value follows, ``feature_dim`` the value's dim.
A graph node produced by a module (``call_module``) follows that module's rule; any other node needs ``s_param``
to follow a map.

**What happens.** With a map for that parameter, the teacher's value is gathered along ``feature_dim``: the teacher's
hidden state restricted (reordered, repeated) to what the student keeps, and no projection is needed. Without one,
values of equal width are compared as they are, and where the widths differ a learned ``nn.Linear(student width,
teacher width, bias=False)`` maps the student's value onto the teacher's (FitNets' regressor); its parameters are
in ``DistillDualModels.trainable_parameters()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..plan import Plan
from ..transfer import TransferReport
from .config import DistillConfigError

CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)
IndexMaps = dict[str, dict[int, list[int]]]


def index_maps(plan: Any) -> IndexMaps:
    """``{student parameter name: {dim: teacher indices}}`` from a compile result's Plan, a TransferReport of
    ``load_big_into_small``, or such a dict."""
    if plan is None:
        return {}
    if isinstance(plan, Plan):
        return {name: dict(dims) for name, dims in plan.kept.items()}
    if isinstance(plan, TransferReport):
        return {row.small: dict(row.kept) for row in plan.rows if row.kept}
    if isinstance(plan, Mapping):
        return {name: {int(d): list(k) for d, k in dims.items()} for name, dims in plan.items()}
    raise DistillConfigError(f"plan must be a fxsparse Plan (result.plan), the TransferReport of load_big_into_small "
                             f"or a dict of index maps, not {type(plan).__name__}")


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight")
    return weight if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None


def channel_dim_of_weight(module: nn.Module) -> int:
    """The dim of ``module.weight`` that indexes its output channels."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)):
        return 1
    if type(module).__name__ == "Conv1D":  # Hugging Face's GPT-2 projection: weight is (in, out)
        return 1
    return 0


@dataclass
class Producer:
    """The parameter a value follows: its name, the channel dim of that parameter, and the value's channel dim."""

    param: str
    param_dim: int
    feature_dim: int
    width: int


def module_producer(model: nn.Module, module_name: str) -> Producer | None:
    """The parameter whose channels ``module_name``'s output keeps (the rule in the module docstring), or None."""
    weighted = [(name, m) for name, m in model.named_modules() if _weight(m) is not None]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if module_name not in order:
        return None
    position = order[module_name]
    inside = [(n, m) for n, m in weighted if n == module_name or module_name == "" or n.startswith(module_name + ".")]
    before = [(n, m) for n, m in weighted if order[n] < position]
    chosen = (inside or before or [None])[-1]
    if chosen is None:
        return None
    name, module = chosen
    dim = channel_dim_of_weight(module)
    feature_dim = 1 if isinstance(module, CHANNELS_FIRST) else -1
    return Producer(f"{name}.weight" if name else "weight", dim, feature_dim, _weight(module).shape[dim])


def param_producer(model: nn.Module, param: str, where: str) -> Producer:
    """The producer an explicit ``s_param`` names (its owner module decides the dims)."""
    params = dict(model.named_parameters())
    if param not in params:
        raise DistillConfigError(f'{where}: config["s_param"]: the student has no parameter {param!r}')
    owner_name = param.rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    dim = channel_dim_of_weight(owner) if params[param].dim() > 1 else 0
    feature_dim = 1 if isinstance(owner, CHANNELS_FIRST) else -1
    return Producer(param, dim, feature_dim, params[param].shape[dim])


def head_producer(model: nn.Module, param: str, where: str) -> Producer:
    """The producer an explicit ``s_head_param`` names: a query/key/value weight whose rows (dim 0) hold the heads
    of a value ``(batch, heads, ...)`` such as an attention map (heads on dim 1)."""
    params = dict(model.named_parameters())
    if param not in params:
        raise DistillConfigError(f'{where}: config["s_head_param"]: the student has no parameter {param!r}')
    return Producer(param, 0, 1, params[param].shape[0])


def heads_of_rows(rows: list[int], heads: int, where: str) -> list[int]:
    """The teacher heads that a projection's kept rows hold: ``heads`` whole blocks of ``len(rows) / heads`` rows."""
    if heads == 0 or len(rows) % heads:
        raise DistillConfigError(f"{where}: the plan keeps {len(rows)} rows of s_head_param, which do not split into "
                                 f"the student's {heads} heads")
    size = len(rows) // heads
    kept = []
    for head in range(heads):
        block = rows[head * size:(head + 1) * size]
        if block[0] % size or block != list(range(block[0], block[0] + size)):
            raise DistillConfigError(f"{where}: the plan's rows {block[0]}.. of s_head_param are not one whole "
                                     f"teacher head of {size} rows: heads were not kept whole")
        kept.append(block[0] // size)
    return kept


class FeatureMatch(nn.Module):
    """Brings a student value and a teacher value to one shape: a gather of the teacher's by an index map, a learned
    projection of the student's, or nothing. With ``heads``, the map is of a projection's rows and the value's
    ``feature_dim`` counts heads: the teacher's heads the student kept are gathered."""

    def __init__(self, where: str, producer: Producer | None, maps: IndexMaps, feature_dim: int | None,
                 heads: bool = False, device: torch.device | None = None, distributed: bool = False):
        """``distributed``: the student is trained with DistributedDataParallel, so a projection is too (its own
        DDP wrapper: the same initial weights on every rank, gradients averaged like the student's)."""
        super().__init__()
        self.where = where
        self.device, self.distributed = device, distributed
        self.producer = producer
        self.heads = heads
        self.feature_dim = feature_dim if feature_dim is not None else (producer.feature_dim if producer else -1)
        kept = maps.get(producer.param, {}).get(producer.param_dim) if producer else None
        self.register_buffer("kept", None if kept is None else torch.as_tensor(kept, dtype=torch.long),
                             persistent=False)
        self.kept_rows = heads and kept is not None  # a map of projection rows, not yet of heads
        self.projection: nn.Linear | None = None
        self.run_projection: nn.Module | None = None  # the projection, or its DDP wrapper

    def resolve(self, student_width: int, teacher_width: int) -> None:
        """Check a map against the widths, or add the projection the widths need; called once widths are known."""
        if self.heads:
            if self.kept is not None and self.kept_rows:  # the first value tells how many rows make a head
                self.kept = torch.tensor(heads_of_rows(self.kept.tolist(), student_width, self.where),
                                         dtype=torch.long)
                self.kept_rows = False
            elif self.kept is None and student_width != teacher_width:
                raise DistillConfigError(f"{self.where}: the student has {student_width} heads, the teacher "
                                         f"{teacher_width}, and the plan has no map of s_head_param")
        if self.kept is not None:
            if len(self.kept) != student_width:
                raise DistillConfigError(
                    f"{self.where}: the plan keeps {len(self.kept)} indices of {self.producer.param!r} dim "
                    f"{self.producer.param_dim}, but the student's value has {student_width} channels along dim "
                    f"{self.feature_dim}; name the parameter it follows with s_param, or its dim with feature_dim")
            if len(self.kept) and int(self.kept.max()) >= teacher_width:
                raise DistillConfigError(
                    f"{self.where}: the plan maps {self.producer.param!r} to teacher index {int(self.kept.max())}, "
                    f"but the teacher's value has {teacher_width} channels along dim {self.feature_dim}")
        elif student_width != teacher_width and self.projection is None:
            self.projection = nn.Linear(student_width, teacher_width, bias=False, device=self.device)
            self.run_projection = DistributedDataParallel(self.projection) if self.distributed else self.projection

    def describe(self) -> str:
        if self.kept is not None:
            unit = "rows" if self.kept_rows else "heads" if self.heads else "indices"
            return f"teacher gathered by the plan's map of {self.producer.param} ({len(self.kept)} {unit})"
        if self.projection is not None:
            return (f"learned projection {self.projection.in_features} -> {self.projection.out_features} "
                    f"(dim {self.feature_dim})")
        return "as they are"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.feature_dim
        if student.dim() <= dim or teacher.dim() <= dim or min(student.dim(), teacher.dim()) < -dim:
            raise DistillConfigError(f"{self.where}: feature dim {dim} is out of range for values of shapes "
                                     f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        self.resolve(student.shape[dim], teacher.shape[dim])
        if self.projection is not None and (self.projection.in_features, self.projection.out_features) != (
                student.shape[dim], teacher.shape[dim]):
            raise DistillConfigError(
                f"{self.where}: the projection was sized {self.projection.in_features} -> "
                f"{self.projection.out_features} from the weights that produce these values, but along dim {dim} "
                f"they are {student.shape[dim]} and {teacher.shape[dim]} wide; set feature_dim")
        if self.kept is not None:
            teacher = teacher.index_select(dim, self.kept.to(teacher.device))
        if self.projection is not None:
            student = self.run_projection(student.movedim(dim, -1).to(self.projection.weight.dtype)).movedim(-1, dim)
        if student.shape != teacher.shape:
            raise DistillConfigError(f"{self.where}: the student's value has shape {tuple(student.shape)} and the "
                                     f"teacher's {tuple(teacher.shape)} ({self.describe()}); they must match")
        return student, teacher
