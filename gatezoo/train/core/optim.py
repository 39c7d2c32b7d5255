"""Optimizers and learning-rate schedules shared by every training task.

- :func:`build_optimizer`: AdamW with two parameter groups: weight decay on matrices and kernels,
  none on biases, norm weights, other parameters with fewer than two dimensions, class/register
  tokens, position embeddings and whatever the model's ``no_weight_decay()`` lists.
- :func:`build_scheduler`: a ``LambdaLR`` stepped once per optimizer step, with the factor of
  :func:`warmup_cosine` (linear warm-up, then a cosine to 0: the image recipe) or
  :func:`inverse_sqrt` (linear warm-up, then ``sqrt(warmup / step)``: the Transformer translation
  recipe) or ``"constant"`` (linear warm-up, then the peak).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
"""Schedule names :func:`build_scheduler` takes."""

_TOKEN = re.compile(r"^(?:\w+_)?tokens?$")  # cls_token, reg_token, dist_token, mask_token, tokens
_POS = re.compile(r"^(?:pos|position|absolute_pos)_?(?:emb|embed|embedding|embeddings)$")


def no_weight_decay(name: str, param: torch.Tensor, skip: frozenset[str] = frozenset()) -> bool:
    """True for parameters AdamW should not decay: ndim < 2 (biases, norms, scalars), tokens,
    position embeddings, and names in ``skip`` (a model's ``no_weight_decay()``)."""
    parts = name.split(".")
    return (
        param.ndim < 2
        or name in skip
        or parts[-1] in skip
        or bool(_TOKEN.match(parts[-1]))
        or any(_POS.match(p) for p in parts)
    )


def param_groups(model: nn.Module, weight_decay: float, select=None) -> list[dict]:
    """Two AdamW groups: ``weight_decay`` on matrices/kernels, 0 on the rest (see :func:`no_weight_decay`).
    ``select(name, param)``, when given, keeps only the parameters it accepts (a part of the model
    with an optimizer of its own)."""
    skip = frozenset(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else frozenset()
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and (select is None or select(name, p)):
            (plain if no_weight_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, select=None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (of the parameters ``select`` accepts, when given)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return torch.optim.AdamW(param_groups(model, weight_decay, select), lr=lr, betas=tuple(betas), eps=eps)


def _check_steps(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The learning-rate factor of the step after ``s`` steps: ``(s+1)/warmup`` during warm-up,
    then ``(1 + cos(pi * (s - warmup) / (total - warmup))) / 2``."""
    _check_steps(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= warmup_steps:
            return 1.0
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def inverse_sqrt(warmup_steps: int):
    """The factor of the step after ``s`` steps in Vaswani et al.'s schedule, scaled to peak at 1:
    ``min(n / warmup, sqrt(warmup / n))`` with ``n = s + 1`` (``1 / sqrt(n)`` without warm-up)."""
    _check_steps(warmup_steps, 1)

    def factor(step: int) -> float:
        n = step + 1
        if warmup_steps == 0:
            return 1.0 / math.sqrt(n)
        return min(n / warmup_steps, math.sqrt(warmup_steps / n))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step: ``schedule`` is ``"cosine"``
    (:func:`warmup_cosine`), ``"inverse_sqrt"`` (:func:`inverse_sqrt`) or ``"constant"`` (linear
    warm-up, then the peak)."""
    if schedule == "cosine":
        factor = warmup_cosine(warmup_steps, total_steps)
    elif schedule == "inverse_sqrt":
        factor = inverse_sqrt(warmup_steps)
    elif schedule == "constant":
        _check_steps(warmup_steps, total_steps)

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
