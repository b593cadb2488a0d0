"""DistillDualModels: a teacher and a student run side by side, with the soft loss between them.

``loss, student_out, teacher_out = dual(*batch)`` runs the teacher (in eval mode, under ``torch.no_grad``, in its own
precision: it is never cast to half) and then the student, and returns the soft loss, the sum of ``func_weight *
loss`` over every match of the config; ``dual.get_total_loss(hard_loss)`` mixes in the task loss.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..inputs import normalize_example_inputs
from .capture import GraphCapture, ModuleCapture, find_module, pick
from .config import DistillConfigError, KnowledgeDistillConfig
from .losses import LOSSES, takes_temperature
from .matching import FeatureMatch, head_producer, index_maps, module_producer, param_producer

log = logging.getLogger("fxsparse")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose names the config uses: a DistributedDataParallel student's ``.module``."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _absorbed_modules(model: nn.Module, modules: dict[str, str]) -> dict[str, str]:
    """``{module name: node name}`` for the named modules a torch.fx GraphModule never calls: containers (a
    Sequential, a residual block) that tracing took apart. Such a module's output is the value of the last node
    traced inside it (by the ``nn_module_stack`` the tracer records on every node)."""
    if not isinstance(model, fx.GraphModule):
        return {}
    called = {node.target for node in model.graph.nodes if node.op == "call_module"}
    absorbed = {}
    for name, where in modules.items():
        find_module(model, name, where)
        if name in called or name == "":
            continue
        inside = [node.name for node in model.graph.nodes
                  if any(path == name for path, *_ in node.meta.get("nn_module_stack", {}).values())]
        if inside:
            absorbed[name] = inside[-1]
    return absorbed


class _Side:
    """One model's runner: hooks on the named modules, and the traced graph when graph nodes are named (or when a
    named module is a container a GraphModule no longer calls)."""

    def __init__(self, model: nn.Module, side: str, modules: dict[str, str], nodes: dict[str, str],
                 args: tuple | None, kwargs: dict | None):
        self.model, self.side = model, side
        self.absorbed = _absorbed_modules(_unwrap(model), modules)
        hooked = {name: where for name, where in modules.items() if name not in self.absorbed}
        self.modules = ModuleCapture(_unwrap(model), hooked, side)
        self.graph: GraphCapture | None = None
        nodes = {**nodes, **{node: modules[name] for name, node in self.absorbed.items()}}
        if nodes:
            try:
                self.graph = self._graph(nodes, args, kwargs)
            except BaseException:
                self.modules.close()
                raise

    def _graph(self, nodes: dict[str, str], args: tuple | None, kwargs: dict | None) -> GraphCapture:
        where = next(iter(nodes.values()))
        if isinstance(self.model, DistributedDataParallel):
            raise DistillConfigError(f"{where}: graph nodes of a DistributedDataParallel {self.side} would bypass "
                                     "its gradient sync; capture leaf modules by name")
        if args is None and not isinstance(self.model, fx.GraphModule):
            raise DistillConfigError(f"{where}: capturing graph nodes needs the model traced: pass example_inputs to "
                                     "get_distill_model")
        return GraphCapture(self.model, nodes, args, kwargs, self.side)

    def module_value(self, name: str, call: int | None, nodes: dict[str, Any], where: str) -> Any:
        if name in self.absorbed:
            if call:
                raise DistillConfigError(f"{where}: {name!r} is taken apart in the {self.side}'s graph; only its last "
                                         "call can be captured (call index 0)")
            return nodes[self.absorbed[name]]
        return self.modules.value(name, call, where)

    def run(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        with self.modules.record():
            if self.graph is None:
                return self.model(*args, **kwargs), {}
            return self.graph(*args, **kwargs)


class _Match(nn.Module):
    """One entry of the config, resolved: where its two values come from, how they are matched, its losses."""

    def __init__(self, kind: str, number: int, spec: dict, losses: list[tuple[str, float, float | None, nn.Module]],
                 feature: FeatureMatch | None):
        super().__init__()
        self.kind, self.number, self.spec = kind, number, spec
        self.where = f"{kind} #{number}"
        self.label = f"{'output' if kind == 'add_output_soft_label' else 'inter'}_match{number}"  # msModelSlim's
        self.names = [name for name, *_ in losses]
        self.weights = [weight for _, weight, _, _ in losses]
        self.temperatures = [temperature for _, _, temperature, _ in losses]
        self.losses = nn.ModuleList(module for *_, module in losses)
        self.feature = feature

    def source(self, side: str) -> str:
        if self.kind == "add_output_soft_label":
            return f"output[{self.spec[f'{side}_output_idx']!r}]"
        key = f"{side}_module" if f"{side}_module" in self.spec else f"{side}_node"
        call = self.spec.get(f"{side}_call_idx")
        where = f"{key[2:]} {self.spec[key]!r}" + (f" call {call}" if call is not None else "")
        return f"{where} [{self.spec[f'{side}_output_idx']!r}]"

    def value(self, side: str, output: Any, runner: _Side, nodes: dict[str, Any]) -> torch.Tensor:
        index = self.spec[f"{side}_output_idx"]
        field = f'{self.where}: config["{side}_output_idx"] ({"teacher" if side == "t" else "student"})'
        if self.kind == "add_output_soft_label":
            return pick(output, index, field)
        if f"{side}_node" in self.spec:
            return pick(nodes[self.spec[f"{side}_node"]], index, field)
        value = runner.module_value(self.spec[f"{side}_module"], self.spec.get(f"{side}_call_idx"), nodes,
                                    f'{self.where}: config["{side}_module"]')
        return pick(value, index, field)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, unweighted: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.feature is not None:
            student, teacher = self.feature(student, teacher)
        total = 0
        for name, weight, temperature, loss_fn in zip(self.names, self.weights, self.temperatures, self.losses):
            value = loss_fn(student, teacher) if temperature is None else loss_fn(student, teacher, temperature)
            unweighted[f"{self.label}_{name}"] = value.detach()
            total = total + weight * value
        return total


def _build_loss(config: KnowledgeDistillConfig, loss: dict, where: str) -> nn.Module:
    name = loss["func_name"]
    if name in config.custom_loss_func:
        module = config.custom_loss_func[name]
    else:
        try:
            module = LOSSES[name](*loss["func_param"])
        except TypeError as error:
            raise DistillConfigError(f'{where}["func_param"]: {name} does not take {loss["func_param"]!r} '
                                     f"({error})") from None
    if loss["temperature"] is not None and not takes_temperature(module):
        raise DistillConfigError(f'{where}["temperature"]: {name} takes no temperature')
    return module


class DistillDualModels(nn.Module):
    """The teacher, the student and the soft loss between them (msModelSlim's DistillDualModels, for PyTorch).

    Attributes and methods as in msModelSlim: ``teacher_model``, ``student_model``, ``hard_label_loss_weight``,
    ``distill_loss`` (the last soft loss), ``get_total_loss(hard_loss)``, ``get_student_model()``,
    ``set_train_state(is_teacher_train)``. Added: ``trainable_parameters()`` (the student's, any learned
    projection's, and the teacher's with ``set_teacher_train``), ``unweighted_losses`` (every loss of the last
    forward, detached, named like msModelSlim's log), ``table()`` (what is matched to what, and how).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: KnowledgeDistillConfig, plan: Any = None,
                 example_args: tuple | None = None, example_kwargs: dict | None = None):
        super().__init__()
        self.teacher_model = teacher
        self.student_model = student
        self.train_teacher = config.train_teacher
        self.hard_label_loss_weight = config.hard_label_loss_weight
        self.distill_loss: torch.Tensor | None = None
        self.unweighted_losses: dict[str, torch.Tensor] = {}
        maps = index_maps(plan)
        specs = [("add_output_soft_label", i, m) for i, m in enumerate(config.output_matches)]
        specs += [("add_inter_soft_label", i, m) for i, m in enumerate(config.inter_matches)]
        wanted = {side: {"module": {}, "node": {}} for side in "ts"}
        for kind, number, spec in specs:
            for side in "ts":
                for what in ("module", "node"):
                    key = f"{side}_{what}"
                    if key in spec:
                        wanted[side][what].setdefault(spec[key], f'{kind} #{number}: config["{key}"]')
        self._sides: list[_Side] = []
        try:  # a config error leaves no hook behind on either model
            self._teacher = self._side(teacher, "teacher", wanted["t"], example_args, example_kwargs)
            self._student = self._side(student, "student", wanted["s"], example_args, example_kwargs)
            self.matches = nn.ModuleList(self._match(kind, number, spec, config, maps) for kind, number, spec in specs)
        except BaseException:
            self.close()
            raise
        self.train()

    def _side(self, model: nn.Module, side: str, wanted: dict, args, kwargs) -> _Side:
        self._sides.append(_Side(model, side, wanted["module"], wanted["node"], args, kwargs))
        return self._sides[-1]

    def _match(self, kind: str, number: int, spec: dict, config: KnowledgeDistillConfig, maps: dict) -> _Match:
        losses = [(loss["func_name"], loss["func_weight"], loss["temperature"],
                   _build_loss(config, loss, f"{kind} #{number}: loss_func[{index}]"))
                  for index, loss in enumerate(spec["loss_func"])]
        any_widths = all(getattr(module, "compares_any_widths", False) for *_, module in losses)
        matched = kind == "add_inter_soft_label" and not any_widths  # relation losses compare values as they are
        feature = self._feature_match(f"{kind} #{number}", spec, maps) if matched else None
        return _Match(kind, number, spec, losses, feature)

    def _feature_match(self, where: str, spec: dict, maps: dict) -> FeatureMatch:
        """How the student's value meets the teacher's (see fxsparse.distill.matching); a projection is made now when
        the weights that produce the two values say their widths differ, so the optimizer can be given it."""
        student = _unwrap(self.student_model)
        if "s_head_param" in spec:
            producer = head_producer(student, spec["s_head_param"], where)
        elif "s_param" in spec:
            producer = param_producer(student, spec["s_param"], where)
        elif "s_module" in spec:
            producer = module_producer(student, spec["s_module"])
        else:
            op, target = self._student.graph.node_targets[spec["s_node"]]
            producer = module_producer(student, target) if op == "call_module" else None
        device = next(student.parameters(), torch.empty(0)).device
        match = FeatureMatch(where, producer, maps, spec.get("feature_dim"), heads="s_head_param" in spec,
                             device=device, distributed=isinstance(self.student_model, DistributedDataParallel))
        teacher = module_producer(_unwrap(self.teacher_model), spec["t_module"]) if "t_module" in spec else None
        if producer is not None and teacher is not None and match.kept is None and not match.heads:
            match.resolve(producer.width, teacher.width)
        return match

    # -- running ------------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """``(soft loss, student output, teacher output)`` for one batch, given as the models take it."""
        if not self.train_teacher and self.teacher_model.training:
            self.teacher_model.eval()
        frozen = contextlib.nullcontext() if self.train_teacher else torch.no_grad()
        with frozen:
            teacher_out, teacher_nodes = self._teacher.run(args, kwargs)
        student_out, student_nodes = self._student.run(args, kwargs)
        unweighted: dict[str, torch.Tensor] = {}
        total = 0
        for match in self.matches:
            teacher = match.value("t", teacher_out, self._teacher, teacher_nodes)
            student = match.value("s", student_out, self._student, student_nodes)
            total = total + match.loss(student, teacher, unweighted)
        self.distill_loss, self.unweighted_losses = total, unweighted
        return total, student_out, teacher_out

    def get_total_loss(self, hard_label_loss: torch.Tensor) -> torch.Tensor:
        """``hard_label_loss * w + soft_loss * (1 - w)``, ``w`` from ``set_hard_label``; after a forward."""
        if self.distill_loss is None:
            raise DistillConfigError("get_total_loss: run the DistillDualModels on a batch first")
        weight = self.hard_label_loss_weight
        return hard_label_loss * weight + self.distill_loss * (1 - weight)

    def get_student_model(self) -> nn.Module:
        return self.student_model

    def set_train_state(self, is_teacher_train: bool = False) -> None:
        """Student in train mode; the teacher in train mode only if ``is_teacher_train`` (never cast to half)."""
        self.train_teacher = is_teacher_train
        self.train()

    def train(self, mode: bool = True) -> "DistillDualModels":
        super().train(mode)
        if not self.train_teacher:
            self.teacher_model.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What an optimizer should update: the student's parameters, those of every learned projection, and the
        teacher's after ``set_teacher_train``."""
        yield from self.student_model.parameters()
        for match in self.matches:
            if match.feature is not None and match.feature.projection is not None:
                yield from match.feature.projection.parameters()
        if self.train_teacher:
            yield from self.teacher_model.parameters()

    def table(self) -> str:
        rows = [[f"{m.kind.removeprefix('add_').removesuffix('_soft_label')} #{m.number}", m.source("t"),
                 m.source("s"), m.feature.describe() if m.feature is not None else "as they are",
                 ", ".join(f"{n} x{w}" + (f" T={t}" if t is not None else "")
                           for n, w, t in zip(m.names, m.weights, m.temperatures))]
                for m in self.matches]
        return tabulate(rows, headers=["match", "teacher", "student", "matched", "losses"], tablefmt="simple")

    def close(self) -> None:
        """Remove the forward hooks from the teacher's and student's modules."""
        for side in self._sides:
            side.modules.close()


def get_distill_model(teacher: nn.Module, student: nn.Module, config: KnowledgeDistillConfig, plan: Any = None,
                      example_inputs: Any = None, example_kwargs: dict | None = None) -> DistillDualModels:
    """Combine ``teacher`` and ``student`` as ``config`` says into a DistillDualModels to train.

    ``plan``: the student's index maps into the teacher (``result.plan`` of a compile, the TransferReport of
    ``load_big_into_small``): intermediate values are then matched through them (see fxsparse.distill.matching).
    ``example_inputs`` (needed to capture graph nodes): a batch that is run once, without gradients and in eval
    mode, so that every name and index in the config is checked and every projection made before you train.
    """
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise DistillConfigError(f"{name} must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(config, KnowledgeDistillConfig):
        raise DistillConfigError(f"config must be a KnowledgeDistillConfig, not {type(config).__name__}")
    if not config.output_matches and not config.inter_matches:
        raise DistillConfigError("config has no soft label: call add_output_soft_label or add_inter_soft_label")
    config.check_loss_names()
    args = kwargs = None
    if example_inputs is not None or example_kwargs:
        args, kwargs = normalize_example_inputs(example_inputs, example_kwargs)
    dual = DistillDualModels(teacher, student, config, plan, args, kwargs)
    if args is not None:
        try:
            _dry_run(dual, args, kwargs)
        except BaseException:
            dual.close()
            raise
    log.info("fxsparse distill:\n%s", dual.table())
    return dual


def _dry_run(dual: DistillDualModels, args: tuple, kwargs: dict) -> None:
    """One forward in eval mode without gradients (no running statistics change), every mode restored after."""
    modes = {module: module.training for module in dual.modules()}
    try:
        dual.eval()
        with torch.no_grad():
            dual(*args, **kwargs)
    finally:
        for module, training in modes.items():
            module.training = training
        dual.distill_loss, dual.unweighted_losses = None, {}
