"""L-infinity adversarial examples and the losses of adversarial training: PGD and TRADES.

All images live in pixel space, ``[0, 1]`` (``bounds``); a model that wants normalised input
takes it through :class:`Normalized`. Every attack runs the model in eval mode (BatchNorm on its
running statistics, no dropout, MoE layers counting nothing) and restores its mode; the
gradients are taken with respect to the input only, so no parameter gradient is touched.

- :func:`pgd`: Madry et al. 2018, projected gradient ascent on the cross-entropy,
  ``x <- clip_[x0 - eps, x0 + eps] clip_bounds (x + step * sign(grad))``, from a uniform random
  start in the ball (``random_start``) or from ``x0``.
- :func:`trades_examples`: Zhang et al. 2019 (TRADES), the same steps on
  ``KL(f(x0) || f(x))`` from ``x0 + 0.001 N(0, 1)``.
- :func:`trades_loss`: ``CE(f(x0), y) + beta * KL(f(x0) || f(x_adv))`` (KL summed over classes,
  averaged over the batch), the objective AdvMoE trains with (beta = 6).
- :func:`pgd_loss`: ``CE(f(x_adv), y)``, Madry's adversarial training objective.
- :func:`robust_accuracy`: clean and PGD-k accuracy over batches (:func:`attack_accuracy` scores
  any attack the same way).

Randomness (the start points) comes from a ``torch.Generator`` passed in, so an attack is
reproducible and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks.checks import ArgumentTypeError, check_int

__all__ = ["Normalized", "attack_accuracy", "pgd", "pgd_loss", "robust_accuracy", "trades_examples", "trades_loss"]


class Normalized(nn.Module):
    """``model((x - mean) / std)`` per channel: a model trained on normalised images, seen from
    pixel space (where an attack's ``eps`` is measured)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must have one value per channel (std > 0), got {list(mean)}, {list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _check(eps, step_size, steps, bounds) -> None:
    for name, value, minimum in (("eps", eps, 0.0), ("step_size", step_size, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentTypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value) or (value < 0 if minimum is not None else value <= 0):
            raise ValueError(f"{name} must be a finite number {'>= 0' if minimum is not None else '> 0'}, "
                             f"got {value!r}")
    check_int("steps", steps)
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float, bounds) -> torch.Tensor:
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(*bounds)


def _ascend(model: nn.Module, x0: torch.Tensor, start: torch.Tensor, objective, eps: float, step_size: float,
            steps: int, bounds) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        x = _project(start, x0, eps, bounds).detach()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                loss = objective(model(x))
            (grad,) = torch.autograd.grad(loss, [x])
            x = _project(x.detach() + step_size * grad.sign(), x0, eps, bounds).detach()
    finally:
        model.train(was_training)
    return x


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, step_size: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None,
        bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """PGD-``steps`` L-infinity adversarial examples of ``images`` (B, C, H, W) in pixel space
    against the cross-entropy of ``labels``: each step moves ``step_size`` along the sign of the
    input gradient and projects onto the ``eps`` ball around the images and onto ``bounds``.
    ``random_start``: begin at a uniform point of the ball (drawn from ``generator``)."""
    _check(eps, step_size, steps, bounds)
    x0 = images.detach()
    start = x0
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
        start = x0 + (2 * noise - 1) * eps
    return _ascend(model, x0, start, lambda logits: F.cross_entropy(logits.float(), labels, reduction="sum"),
                   eps, step_size, steps, bounds)


def trades_examples(model: nn.Module, images: torch.Tensor, *, eps: float, step_size: float, steps: int,
                    generator: torch.Generator | None = None, bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """TRADES's inner maximisation: ``steps`` sign-gradient steps on ``KL(f(x0) || f(x))`` from
    ``x0 + 0.001 N(0, 1)`` (drawn from ``generator``), projected as in :func:`pgd`."""
    _check(eps, step_size, steps, bounds)
    x0 = images.detach()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = F.softmax(model(x0).float(), dim=-1)
    finally:
        model.train(was_training)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)

    def kl(logits):
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), clean, reduction="sum")

    return _ascend(model, x0, x0 + 0.001 * noise, kl, eps, step_size, steps, bounds)


def trades_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, adversarial: torch.Tensor,
                beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / B, logits of x)`` in the model's current
    mode (training: the update's forward)."""
    logits = model(images).float()
    adv = model(adversarial).float()
    kl = F.kl_div(F.log_softmax(adv, dim=-1), F.softmax(logits, dim=-1), reduction="sum") / max(len(images), 1)
    return F.cross_entropy(logits, labels) + beta * kl, logits


def pgd_loss(model: nn.Module, labels: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE(f(x_adv), y), logits of x_adv)``: Madry's adversarial training objective."""
    logits = model(adversarial).float()
    return F.cross_entropy(logits, labels), logits


def attack_accuracy(model: nn.Module, batches: Iterable, attack) -> dict:
    """Clean accuracy and accuracy under ``attack(images, labels) -> adversarial images`` of
    ``model`` over ``batches`` of (pixel images, labels), model in eval mode (restored after):
    ``{"clean_acc", "robust_acc", "count"}``. An image counts as robust when it is classified
    correctly both clean and attacked."""
    clean = robust = count = 0
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            with torch.no_grad():
                ok = model(images).argmax(-1) == labels
            x = attack(images, labels)
            with torch.no_grad():
                ok_adv = (model(x).argmax(-1) == labels) & ok
            clean += int(ok.sum())
            robust += int(ok_adv.sum())
            count += len(labels)
    finally:
        model.train(was_training)
    return {"clean_acc": clean / max(count, 1), "robust_acc": robust / max(count, 1), "count": count}


def robust_accuracy(model: nn.Module, batches: Iterable, *, eps: float, step_size: float, steps: int,
                    random_start: bool = True, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Clean and PGD-``steps`` accuracy of ``model`` over ``batches`` of (pixel images, labels)
    (:func:`attack_accuracy` with :func:`pgd`, start points from a generator seeded with ``seed``)."""
    _check(eps, step_size, steps, bounds)
    g = torch.Generator().manual_seed(seed)
    return attack_accuracy(model, batches, lambda images, labels: pgd(
        model, images, labels, eps=eps, step_size=step_size, steps=steps, random_start=random_start, generator=g,
        bounds=bounds))
