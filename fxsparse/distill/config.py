"""KnowledgeDistillConfig: what to distil, in msModelSlim's format, checked field by field as it is written.

A *match* pairs a teacher value with a student value and lists the losses between them:

- ``add_output_soft_label``: the models' own outputs, ``t_output_idx`` / ``s_output_idx`` picking one item of a
  tuple, a dict or a Hugging Face ModelOutput (in order; a string key works too).
- ``add_inter_soft_label``: intermediate values, by module name (``t_module`` / ``s_module``, captured with forward
  hooks; ``t_call_idx`` / ``s_call_idx`` pick a call of a module that runs several times) or by graph node name
  (``t_node`` / ``s_node``, see :mod:`fxsparse.distill.capture`). Optional: ``s_param`` names the student parameter
  whose plan index map says which teacher channels the student's value keeps, ``s_head_param`` the query/key/value
  weight whose kept rows say which teacher heads an attention map keeps, and ``feature_dim`` which dim of the value
  holds those channels or heads (see :mod:`fxsparse.distill.matching`).

Every mistake is a :class:`DistillConfigError` naming the method and field, raised when the field is written or, for
what needs the models (module names, loss names, output indices), by ``get_distill_model`` and the first forward:
before any training step.
"""
from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from ..errors import BadArgumentError
from .losses import LOSSES


class DistillConfigError(BadArgumentError):
    """A distillation config names an unknown loss, module, node or index, or gives a value out of range."""


OUTPUT_KEYS = {"t_output_idx", "s_output_idx", "loss_func"}
INTER_SIDE_KEYS = {"t_module", "s_module", "t_node", "s_node"}
# "shape" is MindSpore's (accepted, not needed here)
INTER_OPTIONAL_KEYS = {"t_call_idx", "s_call_idx", "s_param", "s_head_param", "feature_dim", "shape"}
LOSS_KEYS = {"func_name", "func_weight", "temperature", "func_param"}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class KnowledgeDistillConfig:
    """Hard-label weight, output and intermediate soft labels, custom losses; see the module docstring.

    ``total = hard_loss * hard_label_loss_weight + soft_loss * (1 - hard_label_loss_weight)``, where ``soft_loss``
    sums ``func_weight * loss`` over every match.
    """

    def __init__(self):
        self.train_teacher = False
        self.hard_label_loss_weight = 0.5
        self.output_replace_idx = 0
        self.inter_matches: list[dict[str, Any]] = []
        self.output_matches: list[dict[str, Any]] = []
        self.custom_loss_func: dict[str, nn.Module] = {}

    # -- msModelSlim's methods ------------------------------------------------------------------------------------
    def set_hard_label(self, weight: float, index: int = 0) -> "KnowledgeDistillConfig":
        """The hard (task) loss's share of the total, strictly between 0 and 1; ``index``: which student output the
        hard loss is computed from (kept for msModelSlim compatibility: you compute the hard loss yourself)."""
        if not _is_number(weight) or not 0 < weight < 1:
            raise DistillConfigError(f"set_hard_label: weight must be a number strictly between 0 and 1, "
                                     f"got {weight!r}")
        if not _is_index(index):
            raise DistillConfigError(f"set_hard_label: index must be an int >= 0, got {index!r}")
        self.hard_label_loss_weight = float(weight)
        self.output_replace_idx = index
        return self

    def add_output_soft_label(self, config: dict) -> "KnowledgeDistillConfig":
        """Losses between the teacher's output ``t_output_idx`` and the student's output ``s_output_idx``."""
        where = "add_output_soft_label"
        self._check_keys(config, where, required=OUTPUT_KEYS, optional=set())
        for side in ("t", "s"):
            self._check_output_index(config[f"{side}_output_idx"], f'{where}: config["{side}_output_idx"]')
        self.output_matches.append(self._normalized(config, where))
        return self

    def add_inter_soft_label(self, config: dict) -> "KnowledgeDistillConfig":
        """Losses between an intermediate value of the teacher and one of the student (by module or node name)."""
        where = "add_inter_soft_label"
        self._check_keys(config, where, required={"t_output_idx", "s_output_idx", "loss_func"},
                         optional=INTER_SIDE_KEYS | INTER_OPTIONAL_KEYS)
        for side in ("t", "s"):
            named = [key for key in (f"{side}_module", f"{side}_node") if key in config]
            if len(named) != 1:
                raise DistillConfigError(f'{where}: give exactly one of "{side}_module" (a module name) and '
                                         f'"{side}_node" (a graph node name), got {named or "neither"}')
            name = config[named[0]]
            if not isinstance(name, str) or (named[0].endswith("node") and not name):
                raise DistillConfigError(f'{where}: config["{named[0]}"] must be a name, got {name!r}')
            self._check_output_index(config[f"{side}_output_idx"], f'{where}: config["{side}_output_idx"]')
            call = config.get(f"{side}_call_idx")
            if call is not None and not _is_index(call):
                raise DistillConfigError(f'{where}: config["{side}_call_idx"] must be an int >= 0, got {call!r}')
        for key in ("s_param", "s_head_param"):
            if key in config and not isinstance(config[key], str):
                raise DistillConfigError(f'{where}: config["{key}"] must be a parameter name, got {config[key]!r}')
        if "s_param" in config and "s_head_param" in config:
            raise DistillConfigError(f'{where}: give one of "s_param" and "s_head_param"')
        if "feature_dim" in config and not isinstance(config["feature_dim"], int):
            raise DistillConfigError(f'{where}: config["feature_dim"] must be an int, got {config["feature_dim"]!r}')
        self.inter_matches.append(self._normalized(config, where))
        return self

    def add_custom_loss_func(self, name: str, instance: nn.Module) -> "KnowledgeDistillConfig":
        """Make ``name`` usable as a ``func_name`` in this config; ``instance`` is called ``instance(s, t)`` or,
        with a temperature in the config, ``instance(s, t, temperature)``. It replaces a built-in of that name."""
        if not isinstance(name, str) or not name:
            raise DistillConfigError(f"add_custom_loss_func: name must be a non-empty string, got {name!r}")
        if not isinstance(instance, nn.Module):
            raise DistillConfigError(f"add_custom_loss_func: instance for {name!r} must be a torch.nn.Module, not "
                                     f"{type(instance).__name__}")
        self.custom_loss_func[name] = instance
        return self

    def set_teacher_train(self) -> "KnowledgeDistillConfig":
        """Train the teacher too: it runs in train mode with gradients, and its parameters are among
        ``DistillDualModels.trainable_parameters()``. Without this the teacher is frozen, in eval mode."""
        self.train_teacher = True
        return self

    # -- checks -----------------------------------------------------------------------------------------------------
    def known_loss_names(self) -> list[str]:
        return sorted(set(LOSSES) | set(self.custom_loss_func))

    def check_loss_names(self) -> None:
        """DistillConfigError for a ``func_name`` that is neither registered nor added as a custom loss, and for a
        temperature given to a loss that takes none."""
        known = set(self.known_loss_names())
        for kind, matches in (("add_output_soft_label", self.output_matches),
                              ("add_inter_soft_label", self.inter_matches)):
            for number, match in enumerate(matches):
                for index, loss in enumerate(match["loss_func"]):
                    where = f'{kind} #{number}: loss_func[{index}]["func_name"]'
                    if loss["func_name"] not in known:
                        raise DistillConfigError(f"{where}: unknown loss {loss['func_name']!r}; known losses: "
                                                 f"{', '.join(self.known_loss_names())} (or add_custom_loss_func)")

    @staticmethod
    def _check_keys(config: Any, where: str, required: set[str], optional: set[str]) -> None:
        if not isinstance(config, dict):
            raise DistillConfigError(f"{where}: config must be a dict, not {type(config).__name__}")
        missing = sorted(required - set(config))
        if missing:
            raise DistillConfigError(f"{where}: config is missing {missing}")
        unknown = sorted(set(config) - required - optional)
        if unknown:
            raise DistillConfigError(f"{where}: unknown config key(s) {unknown}; known keys: "
                                     f"{sorted(required | optional)}")

    @staticmethod
    def _check_output_index(value: Any, where: str) -> None:
        if not (_is_index(value) or isinstance(value, str) and value):
            raise DistillConfigError(f"{where} must be an int >= 0 (or a key of a dict output), got {value!r}")

    @staticmethod
    def _normalized(config: dict, where: str) -> dict:
        """A copy of ``config`` with every loss checked and its optional fields filled in."""
        losses = config["loss_func"]
        if not isinstance(losses, (list, tuple)) or not losses:
            raise DistillConfigError(f'{where}: config["loss_func"] must be a non-empty list of loss dicts')
        checked = []
        for index, loss in enumerate(losses):
            field = f'{where}: loss_func[{index}]'
            KnowledgeDistillConfig._check_keys(loss, field, required={"func_name", "func_weight"},
                                               optional=LOSS_KEYS)
            if not isinstance(loss["func_name"], str) or not loss["func_name"]:
                raise DistillConfigError(f'{field}["func_name"] must be a loss name, got {loss["func_name"]!r}')
            weight = loss["func_weight"]
            if not _is_number(weight) or weight <= 0:
                raise DistillConfigError(f'{field}["func_weight"] must be a number > 0, got {weight!r}')
            temperature = loss.get("temperature")
            if temperature is not None and (not _is_number(temperature) or temperature <= 0):
                raise DistillConfigError(f'{field}["temperature"] must be a number > 0, got {temperature!r}')
            param = loss.get("func_param", [])
            if not isinstance(param, (list, tuple)):
                raise DistillConfigError(f'{field}["func_param"] must be a list of the loss\'s arguments, '
                                         f"got {param!r}")
            checked.append({"func_name": loss["func_name"], "func_weight": weight, "temperature": temperature,
                            "func_param": list(param)})
        return {**config, "loss_func": checked}
