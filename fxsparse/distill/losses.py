"""The distillation losses, registered by name so a config can ask for them as ``{"func_name": ...}``.

Every loss is called ``loss(student_value, teacher_value)`` or, when the config gives a temperature,
``loss(student_value, teacher_value, temperature)`` (msModelSlim's convention, which custom losses follow too). A loss
whose class says ``takes_temperature = False`` refuses a temperature in the config instead of receiving it as some
other argument.

Temperature and T²: softening both distributions by T shrinks the soft loss's gradients by about 1/T², so Hinton et
al. (and Hugging Face's DistilBERT recipe) multiply the soft loss by T² to keep its scale independent of T.
``KLDiv`` does that by default (``t_squared=True``); ``KDCrossEntropy`` does not, so that it computes exactly what
msModelSlim's does; both take ``func_param: [True]`` or ``[False]`` to change it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPSILON = 1e-12  # keeps log() finite where a probability is exactly zero (a masked attention position)


def _soften(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float):
    """Both logits in float32 (a half-precision teacher is never a reason for a half-precision loss), over T."""
    return logits_s.float() / temperature, logits_t.float() / temperature


class KDCrossEntropy(nn.Module):
    """Soft cross-entropy ``-sum(softmax(t/T) * log_softmax(s/T))`` over the last dim, averaged over the rest."""

    takes_temperature = True

    def __init__(self, t_squared: bool = False):
        super().__init__()
        self.t_squared = t_squared

    def forward(self, logits_s, logits_t, temperature: float = 1.0):
        s, t = _soften(logits_s, logits_t, temperature)
        loss = -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(dim=-1).mean()
        return loss * temperature ** 2 if self.t_squared else loss


class KLDiv(nn.Module):
    """``KL(softmax(t/T) || softmax(s/T))`` over the last dim, averaged over the rest, times T² (DistilBERT)."""

    takes_temperature = True

    def __init__(self, t_squared: bool = True):
        super().__init__()
        self.t_squared = t_squared

    def forward(self, logits_s, logits_t, temperature: float = 1.0):
        s, t = _soften(logits_s, logits_t, temperature)
        loss = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="none", log_target=True)
        loss = loss.sum(dim=-1).mean()
        return loss * temperature ** 2 if self.t_squared else loss


class KDMse(nn.Module):
    """Mean squared error of the logits, both divided by T (logits MSE at T = 1)."""

    takes_temperature = True

    def forward(self, logits_s, logits_t, temperature: float = 1.0):
        s, t = _soften(logits_s, logits_t, temperature)
        return F.mse_loss(s, t)


class HardKDCrossEntropy(nn.Module):
    """Cross-entropy against the teacher's top class (hard labels from the teacher); classes on the last dim, so
    token logits ``(batch, tokens, vocabulary)`` work as well as ``(batch, classes)``."""

    takes_temperature = False

    def forward(self, logits_s, logits_t):
        classes = logits_s.shape[-1]
        return F.cross_entropy(logits_s.float().reshape(-1, classes), logits_t.argmax(dim=-1).reshape(-1))


class HiddenMse(nn.Module):
    """Mean squared error of two hidden states of one shape (TinyBERT's hidden-state and attention-score loss)."""

    takes_temperature = False

    def forward(self, state_s, state_t):
        return F.mse_loss(state_s.float(), state_t.float())


class HiddenCosine(nn.Module):
    """``1 - cos(student, teacher)`` along ``dim`` (-1: a transformer's hidden size; give ``func_param: [1]`` for a
    CNN's channels), averaged over every other position (DistilBERT's cosine embedding loss)."""

    takes_temperature = False

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, state_s, state_t):
        return (1 - F.cosine_similarity(state_s.float(), state_t.float(), dim=self.dim, eps=1e-8)).mean()


class AttentionKL(nn.Module):
    """MiniLM's attention transfer: ``KL(teacher's attention || student's)`` per query position, averaged over batch,
    heads and queries. Inputs are attention probabilities ``(batch, heads, queries, keys)`` of the same shape."""

    takes_temperature = False

    def forward(self, attention_s, attention_t):
        s, t = attention_s.float(), attention_t.float()
        return (t * (t.clamp_min(EPSILON).log() - s.clamp_min(EPSILON).log())).sum(dim=-1).mean()


class HiddenRelation(nn.Module):
    """MiniLMv2's self-attention relation transfer: split each hidden state ``(batch, tokens, width)`` into
    ``relation_heads`` parts, take ``softmax(x x^T / sqrt(part width))`` per part, and average
    ``KL(teacher relation || student relation)``. The relations are ``tokens x tokens``, so the student's and
    teacher's widths may differ (each must divide by ``relation_heads``)."""

    takes_temperature = False
    compares_any_widths = True  # so the values are compared as they are: no plan gather, no projection

    def __init__(self, relation_heads: int = 1):
        super().__init__()
        self.relation_heads = relation_heads

    def _log_relation(self, state: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = state.shape
        if width % self.relation_heads:
            raise ValueError(f"HiddenRelation: width {width} does not divide into {self.relation_heads} relation heads")
        part = width // self.relation_heads
        heads = state.float().reshape(batch, tokens, self.relation_heads, part).transpose(1, 2)
        return F.log_softmax(heads @ heads.transpose(-1, -2) / math.sqrt(part), dim=-1)

    def forward(self, state_s, state_t):
        log_s, log_t = self._log_relation(state_s), self._log_relation(state_t)
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=-1).mean()


class MMD(nn.Module):
    """msModelSlim's "MMD": the mean squared difference of the token Gram matrices ``x x^T / width`` of the student
    and teacher hidden states ``(batch, tokens, width)``, a linear-kernel match of how tokens relate, so the widths
    may differ. A 2-D state ``(batch * tokens, width)`` is read as ``batch_size`` sequences (``func_param:
    [batch_size]``)."""

    takes_temperature = False
    compares_any_widths = True

    def __init__(self, batch_size: int | None = None):
        super().__init__()
        self.batch_size = batch_size

    def _gram(self, state: torch.Tensor) -> torch.Tensor:
        if state.dim() == 2:
            if self.batch_size is None:
                raise ValueError("MMD: a 2-D hidden state needs func_param [batch_size] to be split into sequences")
            state = state.reshape(self.batch_size, -1, state.shape[-1])
        state = state.float()
        return state @ state.transpose(1, 2) / state.shape[-1]

    def forward(self, state_s, state_t):
        return F.mse_loss(self._gram(state_s), self._gram(state_t))


LOSSES: dict[str, Callable[..., nn.Module]] = {
    cls.__name__: cls for cls in (KDCrossEntropy, KLDiv, KDMse, HardKDCrossEntropy, HiddenMse, HiddenCosine,
                                  AttentionKL, HiddenRelation, MMD)
}


def register_loss(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``name`` usable as a ``func_name`` in every config; ``factory(*func_param)`` builds the loss module."""
    if not isinstance(name, str) or not name:
        from .config import DistillConfigError

        raise DistillConfigError(f"register_loss: name must be a non-empty string, not {name!r}")
    LOSSES[name] = factory


def takes_temperature(loss: nn.Module) -> bool:
    """Whether ``loss`` may be given a temperature: built-ins say so; a custom loss is trusted to take one."""
    return getattr(loss, "takes_temperature", True)
