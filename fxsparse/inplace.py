"""Applying a compile result to the user's own nn.Module tree, in place.

The rewritten GraphModule is the truth; this moves its tensors into the user's modules (same classes, same
attribute names), updates the size attributes those classes keep (``out_features``, ``num_features``, head counts
of attention modules, a Hugging Face config), makes the biases and border corrections folding needed, and checks
the result numerically against the GraphModule. Anything failing midway restores the module as it was.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

from .errors import FxsparseError, PlanMismatchError
from .graph_utils import get_attr_value, set_attr_value
from .growth.layout import apply_growth
from .modules import PaddedConstantCorrection, with_border_correction
from .plan import Plan
from .rewrite import gather_along, planned_gathers
from .trace import cache_disabled
from .verify import verify_equivalent

# size attributes of common layers, recomputed from their (already resized) parameters
_SIZE_ATTRIBUTES: list[tuple[type, Callable[[nn.Module], dict[str, Any]]]] = [
    (nn.Linear, lambda m: {"out_features": m.weight.shape[0], "in_features": m.weight.shape[1]}),
    (nn.Embedding, lambda m: {"embedding_dim": m.weight.shape[1]}),
    (nn.modules.batchnorm._BatchNorm, lambda m: {"num_features": _channels(m)}),
    (nn.modules.instancenorm._InstanceNorm, lambda m: {"num_features": _channels(m)}),
    (nn.PReLU, lambda m: {"num_parameters": m.weight.numel()}),
    (nn.LayerNorm, lambda m: _normalized_shape(m)),
    *([(nn.RMSNorm, lambda m: _normalized_shape(m))] if hasattr(nn, "RMSNorm") else []),
]
# attention modules keep head counts; these names cover torch and the Hugging Face families
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_SIZES = ("head_dim", "attention_head_size", "head_size")
_WIDTHS = ("all_head_size", "inner_dim", "split_size")
_QUERY = ("query", "q_proj", "q", "c_attn", "qkv", "q_lin")
_KEY = ("key", "k_proj", "k", "k_lin")


def _channels(module: nn.Module) -> int:
    for name in ("weight", "running_mean"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return getattr(module, "num_features")


def _normalized_shape(module: nn.Module) -> dict[str, Any]:
    """A LayerNorm/RMSNorm's normalized_shape from its affine weight (one without keeps the compiled twin's)."""
    weight = getattr(module, "weight", None)
    return {"normalized_shape": tuple(weight.shape)} if isinstance(weight, torch.Tensor) else {}


def _out_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    # HF's Conv1D stores its weight transposed ([in, out]) and keeps the out width in ``nf``
    return weight.shape[1] if hasattr(module, "nf") else weight.shape[0]


class _Snapshot:
    """Enough of every submodule's state to put it back: its dicts of parameters, buffers, children, attributes,
    and the values of its buffers, which a forward may change in place (BatchNorm's running statistics and
    ``num_batches_tracked``, a counter of one's own)."""

    def __init__(self, root: nn.Module):
        self.saved = [(m, type(m), {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in vars(m).items()})
                      for m in root.modules()]
        config = getattr(root, "config", None)
        self.config = (config, dict(vars(config))) if config is not None else None
        self.buffers = _BufferValues(root)

    def restore(self) -> None:
        for module, cls, state in self.saved:
            module.__class__ = cls  # a convolution given a border correction changed class
            vars(module).clear()
            vars(module).update(state)
        if self.config is not None:
            vars(self.config).clear()
            vars(self.config).update(self.config[1])
        self.buffers.restore()


class _BufferValues:
    """The values of a module's buffers, to write back into the same tensors after a forward changed them."""

    def __init__(self, root: nn.Module):
        self.saved = [(buffer, buffer.detach().clone()) for buffer in root.buffers() if buffer.device.type != "meta"]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, value in self.saved:
                if buffer.shape == value.shape:
                    buffer.copy_(value)


def _move_tensors(model: nn.Module, state: dict[str, torch.Tensor], plan: Plan) -> None:
    """Every tensor of ``state`` that changed shape, or that folding made, into ``model`` by name.

    A bias the plan's folding made, which ``state`` lacks (a fresh model whose removed channels carry nothing),
    is made as zeros, so a checkpoint of the pruned model loads.
    """
    made = {record["name"] for record in plan.folds if record["kind"] == "bias"}
    own = dict(model.state_dict(keep_vars=True))
    state = dict(state)
    for record in plan.folds:
        if record["kind"] == "bias" and record["name"] not in state:
            weight = state.get(f"{record['owner']}.weight", own.get(f"{record['owner']}.weight"))
            state[record["name"]] = torch.zeros(_out_width(model.get_submodule(record["owner"])) if weight.dim() == 2
                                                else weight.shape[0], dtype=weight.dtype)
    # weights a sparsity mask changed keep their shape; they are replaced too, once for all names of a shared one
    masked = {id(own[name]) for name in plan.masks if name in own}
    replaced: dict[int, torch.Tensor] = {}
    for name, value in state.items():
        if name in own and own[name].shape == value.shape and name not in made and id(own[name]) not in masked:
            continue
        if name not in own and name not in made:
            continue  # a border correction's kernel: moved with its module below
        old = own.get(name)
        if old is not None and id(old) in replaced:
            set_attr_value(model, name, replaced[id(old)])
            continue
        requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
        tensor = value.detach()  # no copy: the model and the compiled module compute the same, from the same memory
        if isinstance(old, nn.Parameter) or old is None:
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        set_attr_value(model, name, tensor)
        if old is not None:
            replaced[id(old)] = tensor


def _add_corrections(model: nn.Module, source: nn.Module, plan: Plan) -> None:
    """Border corrections inside the layer they correct: the convolution becomes its BorderCorrectedConv subclass
    (same object, same parameter names) holding the correction as a child."""
    for record in plan.folds:
        if record["kind"] != "correction":
            continue
        layer = model.get_submodule(record["owner"])
        try:
            correction = get_attr_value(source, record["name"])
        except AttributeError:  # a fresh model carries nothing there: a zero correction keeps the architecture
            correction = PaddedConstantCorrection(torch.zeros(layer.weight.shape[0], 1, *layer.weight.shape[2:]),
                                                  layer.stride, layer.padding, layer.dilation)
        if not isinstance(correction, PaddedConstantCorrection):
            raise FxsparseError(f"{record['name']!r} in the compiled module is not a border correction")
        prefix = f"{record['owner']}." if record["owner"] else ""
        child = record["name"][len(prefix):] if record["name"].startswith(prefix) else ""
        if not child or "." in child:
            raise FxsparseError(f"border correction {record['name']!r} is not a child of {record['owner']!r}")
        corrected = with_border_correction(layer, child, PaddedConstantCorrection(
            correction.weight.detach().clone(), correction.stride, correction.padding, correction.dilation))
        if corrected is None:
            raise FxsparseError(f"{record['owner'] or 'the model'} ({type(layer).__name__}) needs a border "
                                "correction, which only an nn.Conv1d/2d/3d can hold in place; use result.module")


def _resize_attributes(model: nn.Module, source: nn.Module) -> None:
    """Size attributes of every layer, from its new parameters (or the compiled module's twin)."""
    twins = dict(source.named_modules())
    for name, module in model.named_modules():
        twin = twins.get(name)
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(twin, nn.modules.conv._ConvNd):
            for attr in ("in_channels", "out_channels", "groups"):
                setattr(module, attr, getattr(twin, attr))
            continue
        if isinstance(module, (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))) and \
                getattr(module, "weight", None) is None and twin is not None:
            module.normalized_shape = tuple(twin.normalized_shape)
        for cls, sizes in _SIZE_ATTRIBUTES:
            if isinstance(module, cls):
                for attr, value in sizes(module).items():
                    setattr(module, attr, value)
        if hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.nf = module.weight.shape[1]
        _resize_attention(module)


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and _out_width(child) is not None:
            return child
    return None


def _resize_attention(module: nn.Module) -> None:
    """Head counts and widths of an attention module, from its query/key projections' new widths."""
    query = _child(module, _QUERY)
    head_size = next((getattr(module, a) for a in _HEAD_SIZES if isinstance(getattr(module, a, None), int)), None)
    if query is None or not head_size:
        return
    width = _out_width(query)
    if getattr(query, "nf", None) is not None and query is getattr(module, "c_attn", None):
        width //= 3  # GPT-2's fused q, k, v projection
    for attr in _HEAD_COUNTS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, width // head_size)
    for attr in _WIDTHS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, width)
    key = _child(module, _KEY)
    if key is not None:
        for attr in _KV_HEAD_COUNTS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, _out_width(key) // head_size)


_CONFIG_HEADS = ("num_attention_heads", "n_head")
_CONFIG_KV_HEADS = ("num_key_value_heads",)
_CONFIG_INTERMEDIATE = ("intermediate_size", "n_inner")
_CONFIG_HIDDEN = ("hidden_size", "n_embd", "d_model")
log = logging.getLogger("fxsparse")
_MLP_UP = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "intermediate")


def _update_config(model: nn.Module) -> None:
    """A Hugging Face config follows the new sizes where every layer agrees on them, so that
    ``save_pretrained`` / ``from_pretrained`` round-trip; sizes that differ per layer are left as they were."""
    config = getattr(model, "config", None)
    if config is None:
        return
    heads, kv_heads, widths = set(), set(), set()
    hidden = {m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)}  # a grown residual width
    for module in model.modules():
        query = _child(module, _QUERY)
        head_size = next((getattr(module, a) for a in _HEAD_SIZES if isinstance(getattr(module, a, None), int)), None)
        if query is not None and head_size:
            width = _out_width(query) // (3 if query is getattr(module, "c_attn", None) else 1)
            heads.add(width // head_size)
            key = _child(module, _KEY)
            if key is not None:
                kv_heads.add(_out_width(key) // head_size)
        up = _child(module, _MLP_UP) or _child(getattr(module, "intermediate", None) or nn.Module(), ("dense",))
        if up is not None and module is not model:
            widths.add(_out_width(up))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatches = _config_mismatches(model, config, shapes)
    for names, values in ((_CONFIG_HIDDEN, hidden), (_CONFIG_HEADS, heads), (_CONFIG_KV_HEADS, kv_heads),
                          (_CONFIG_INTERMEDIATE, widths)):
        if len(values) != 1 or mismatches == 0:
            continue
        present = [n for n in names if hasattr(config, n)]
        before = {n: getattr(config, n) for n in present}
        for name in present:
            setattr(config, name, next(iter(values)))
        after = _config_mismatches(model, config, shapes)
        if after < mismatches:
            mismatches = after
        else:  # this config cannot express the change (GPT-2 derives its head size from n_head)
            for name, value in before.items():
                setattr(config, name, value)
    if mismatches:
        log.warning("fxsparse: %s's config cannot describe the pruned sizes (%d tensors differ): reload its "
                    "weights with fxsparse.apply_plan on a fresh model, not from_pretrained", type(model).__name__,
                    mismatches)


def _config_mismatches(model: nn.Module, config: Any, shapes: dict[str, tuple]) -> int:
    """How many tensors of a model rebuilt from ``config`` (on the meta device) differ from ``shapes``."""
    try:
        with torch.device("meta"):
            twin = type(model)(config)
    except Exception:  # noqa: BLE001 - a model that cannot be rebuilt from its config: nothing to check against
        return len(shapes)
    twin_shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    return sum(1 for k, shape in shapes.items() if twin_shapes.get(k) != shape)


def apply_result(model: nn.Module, source: nn.Module, plan: Plan, args: tuple, kwargs: dict,
                 tolerance: float | str | None = "auto") -> nn.Module:
    """Make ``model`` compute what ``source`` (the compiled GraphModule) computes, by resizing it in place.

    ``tolerance``: the largest relative difference accepted (None: measure only). The check runs ``model``
    itself, as it was traced (without a Hugging Face cache), and puts back the buffer values it changes."""
    if not isinstance(model, nn.Module):
        raise PlanMismatchError(f"can only apply a plan to an nn.Module, not {type(model).__name__}")
    plan.check_fits(model)
    snapshot = _Snapshot(model)
    was_training = model.training
    try:
        apply_growth(model, plan)  # blocks a growth inserted, so that their tensors have a place to go
        with torch.no_grad():
            _move_tensors(model, source.state_dict(), plan)
        _add_corrections(model, source, plan)
        _resize_attributes(model, source)
        _update_config(model)
        model.eval()
        checked_buffers = _BufferValues(model)
        try:
            with cache_disabled(model):
                verify_equivalent(source, model, args, kwargs, tolerance=tolerance, what="applying the plan in place")
        finally:
            checked_buffers.restore()
    except Exception:
        snapshot.restore()
        raise
    model.train(was_training)
    return model


def _resize_convolutions(model: nn.Module, before: dict[str, tuple[int, int, int]]) -> None:
    """Conv sizes after a replayed gather: whole groups are repeated or moved, so a group keeps its width and a
    depthwise convolution stays depthwise (``before``: out_channels, groups per conv, by name)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or name not in before:
            continue
        old_out, old_groups = before[name]
        transposed = module.transposed
        out = module.weight.shape[1] * old_groups if transposed else module.weight.shape[0]
        module.groups = max(1, out // (old_out // old_groups)) if old_groups > 1 else 1
        module.out_channels = module.weight.shape[1] * module.groups if transposed else module.weight.shape[0]
        module.in_channels = module.weight.shape[0] if transposed else module.weight.shape[1] * module.groups


def replay_gathers(model: nn.Module, plan: Plan, args: tuple, kwargs: dict,
                   tolerance: float | None = 1e-4) -> nn.Module:
    """Apply a plan that reorders or repeats channels to a fresh instance, in place: each recorded gather (and
    scale) is applied to the model's own tensors, its modules are resized, and, since a permutation or a growth
    keeps the function, the result is checked against the model as it was. Anything failing restores it."""
    plan.check_fits(model)
    reference = copy.deepcopy(model).eval()
    snapshot = _Snapshot(model)
    was_training = model.training
    convs = {n: (m.out_channels, m.groups) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    names_of: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(tensor), []).append(name)
    try:
        with torch.no_grad():
            for name in plan.kept:
                old = get_attr_value(model, name)
                new = gather_along(old.detach(), planned_gathers(plan, name))
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
                for alias in names_of.get(id(old), [name]):  # tied weights stay one tensor
                    set_attr_value(model, alias, new)
        _resize_convolutions(model, convs)
        _resize_attributes(model, model)
        _update_config(model)
        shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
        wrong = next((n for n, shape in plan.shapes_after.items() if n in shapes and shapes[n] != shape), None)
        if wrong is not None:
            raise PlanMismatchError(f"after replaying the plan, {wrong} has shape {shapes[wrong]}, the plan says "
                                    f"{plan.shapes_after[wrong]}")
        model.eval()
        verify_equivalent(reference, model, args, kwargs, tolerance=tolerance, what="replaying the plan")
    except Exception:
        snapshot.restore()
        raise
    model.train(was_training)
    return model


def permute_in_place(model: nn.Module, plan: Plan, optimizers: tuple = (),
                     companions: dict[str, list[torch.Tensor]] | None = None) -> list[str]:
    """Reorder ``model``'s own tensors by a plan whose index maps keep every shape (a channel permutation): each
    parameter and buffer is written in place (the same Parameter objects, so optimizers and hooks keep them), and so
    is every optimizer state tensor of a parameter's shape (momentum, Adam's moments) and every tensor in
    ``companions[name]`` (e.g. a sparsity mask kept beside a weight). Returns the names of the tensors moved."""
    state = dict(model.state_dict(keep_vars=True))
    moved = []
    with torch.no_grad():
        for name, dims in plan.kept.items():
            tensor = state.get(name)
            if tensor is None:
                continue
            if any(len(index) != tensor.shape[dim] for dim, index in dims.items()):
                raise PlanMismatchError(f"permute_in_place: the plan changes the shape of {name!r}; it is no "
                                        "permutation (use apply_plan)")
            related = [tensor] + list((companions or {}).get(name, []))
            for optimizer in optimizers:
                related += [value for value in optimizer.state.get(tensor, {}).values()
                            if isinstance(value, torch.Tensor) and value.shape == tensor.shape]
            for target in related:
                target.copy_(gather_along(target, planned_gathers(plan, name)))
            moved.append(name)
    return moved
