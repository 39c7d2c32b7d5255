"""Pieces every training entry point shares: model building, optimizer and schedule, one training
step, evaluation, and checkpoints that rebuild their own model.

- :func:`build_model` builds a gatezoo registry model (``gatezoo.models.create_model``) or a timm
  peer (:mod:`gatezoo.train.peers`) by name.
- :func:`build_optimizer`: AdamW with two parameter groups; no weight decay on biases, norm
  weights, any other parameter with fewer than two dimensions, class/register tokens, position
  embeddings and whatever the model's ``no_weight_decay()`` lists.
- :func:`build_scheduler`: per-step linear warm-up from ``lr / warmup_steps`` to ``lr``, then a
  cosine to 0 at ``total_steps``.
- :func:`train_step`: forward (bf16 autocast optional), label-smoothed cross-entropy, backward,
  optimizer and scheduler step.
- :func:`evaluate_model`: plain cross-entropy, accuracy and per-class accuracy over a
  :class:`~gatezoo.train.data.Batches`.
- :func:`save_checkpoint` / :func:`load_checkpoint`: weights in safetensors, with string metadata
  ``model`` (the name), ``model_args`` (JSON of the constructor overrides), ``data``, ``classes``,
  ``mean``, ``std`` (JSON lists), ``epoch``, ``step``, ``test_acc`` and ``gatezoo_version``, so
  ``load_checkpoint(path)`` needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import peers
from .config import ConfigError

# --------------------------------------------------------------------------------------------
# devices and models


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; otherwise ``torch.device(device)``, checked."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), for honest wall-clock timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _registry():
    try:
        from gatezoo.models import create_model, list_models
    except ImportError:
        return None, []
    return create_model, list(list_models())


def model_names() -> list[str]:
    """Every name :func:`build_model` accepts: the gatezoo registry, then the timm peers."""
    return _registry()[1] + peers.list_peers()


def build_model(name: str, **overrides) -> nn.Module:
    """Build model ``name`` (gatezoo registry name or timm peer) with constructor ``overrides``.

    Raises ``ValueError`` for an unknown name (listing the known ones) or a bad override.
    """
    create_model, names = _registry()
    if name in peers.list_peers():
        return peers.create_peer(name, **overrides)
    if create_model is not None and name in names:
        return create_model(name, **overrides)
    raise ValueError(f"model must be one of {model_names()}, got {name!r}")


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def data_model_args(dataset, model_args: Mapping[str, Any]) -> dict:
    """``model_args`` completed with the data set's ``in_chans``, ``img_size`` and ``num_classes``.

    Values given in ``model_args`` must agree with the data set (``ConfigError`` otherwise).
    """
    h, w = dataset.image_size
    derived = {"in_chans": dataset.in_chans, "img_size": h if h == w else [h, w], "num_classes": dataset.num_classes}
    for key, value in derived.items():
        if key in model_args:
            given = list(model_args[key]) if isinstance(model_args[key], (list, tuple)) else model_args[key]
            if given != value and not (key == "img_size" and h == w and given == [h, w]):
                raise ConfigError(
                    f"model_args.{key}={model_args[key]!r} does not match the data set {dataset.name!r} "
                    f"({key}={value!r})"
                )
    return {**derived, **dict(model_args)}


# --------------------------------------------------------------------------------------------
# optimizer and schedule

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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``weight_decay`` on matrices/kernels, 0 on the rest (see :func:`no_weight_decay`)."""
    skip = frozenset(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else frozenset()
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_weight_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (betas 0.9/0.999, eps 1e-8)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)


def schedule_steps(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> tuple[int, int]:
    """(warm-up steps, total steps): ``round(warmup_epochs * steps_per_epoch)``, ``epochs * steps_per_epoch``."""
    return round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The learning-rate factor of the step after ``s`` steps: ``(s+1)/warmup`` during warm-up,
    then ``(1 + cos(pi * (s - warmup) / (total - warmup))) / 2``."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= warmup_steps:
            return 1.0
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """A ``LambdaLR`` stepping :func:`warmup_cosine` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# steps and evaluation


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the (detached) mean loss and the number correct."""
    with autocast(images.device, bf16):
        logits = model(images)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise RuntimeError(
            f"model must return logits (B, num_classes) = ({labels.shape[0]}, C), got {tuple(logits.shape)}"
        )
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (logits.detach().argmax(-1) == labels).sum()


@torch.no_grad()
def evaluate_model(model: nn.Module, batches, num_classes: int, *, bf16: bool = False) -> dict:
    """Plain cross-entropy, accuracy and per-class accuracy of ``model`` over ``batches``.

    Returns ``{"loss", "acc", "count", "per_class_acc" (list, NaN for absent classes),
    "per_class_count"}``. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    try:
        for x, y in batches:
            with autocast(x.device, bf16):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            hit = logits.argmax(-1) == y
            total += torch.bincount(y, minlength=num_classes).cpu()[:num_classes]
            correct += torch.bincount(y[hit], minlength=num_classes).cpu()[:num_classes]
    finally:
        model.train(was_training)
    count = int(total.sum())
    per_class = [c / t if t else float("nan") for c, t in zip(correct.tolist(), total.tolist())]
    return {
        "loss": float(loss_sum) / max(count, 1),
        "acc": int(correct.sum()) / max(count, 1),
        "count": count,
        "per_class_acc": per_class,
        "per_class_count": total.tolist(),
    }


class RunningStats:
    """Sums over the training steps of one epoch: loss, correct predictions, images, seconds.

    Throughput counts only timed steps: a step recorded with ``timed=False`` (the first step of a
    process, which pays for lazy initialisation) adds to loss and accuracy but not to img/s.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.loss_sum, self.correct, self.seen, self.timed, self.seconds = 0.0, 0, 0, 0, 0.0

    def add(self, loss: float, correct: int, n: int, seconds: float, timed: bool = True) -> None:
        """Record one step: its mean loss, number correct, batch size and time."""
        self.loss_sum += float(loss) * n
        self.correct += int(correct)
        self.seen += n
        if timed:
            self.timed += n
            self.seconds += seconds

    @property
    def loss(self) -> float:
        """Mean training loss so far."""
        return self.loss_sum / self.seen if self.seen else float("nan")

    @property
    def acc(self) -> float:
        """Training accuracy so far."""
        return self.correct / self.seen if self.seen else float("nan")

    @property
    def img_per_s(self) -> float:
        """Training throughput so far (images per second of timed step time)."""
        return self.timed / self.seconds if self.seconds > 0 else float("nan")

    def state_dict(self) -> dict:
        """The sums, for a training state file."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "timed": self.timed,
                "seconds": self.seconds}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""
        self.loss_sum, self.correct = float(state["loss_sum"]), int(state["correct"])
        self.seen, self.timed, self.seconds = int(state["seen"]), int(state["timed"]), float(state["seconds"])


# --------------------------------------------------------------------------------------------
# checkpoints

class CheckpointError(ValueError):
    """A file is not a gatezoo checkpoint (not safetensors, or no model metadata)."""


_JSON_KEYS = ("model_args", "classes", "mean", "std", "epoch", "step", "test_acc")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write ``model``'s weights to a safetensors file with ``metadata`` (non-strings as JSON).

    ``metadata`` must hold ``model`` (the name) and ``model_args`` (constructor overrides) for
    :func:`load_checkpoint`. The file is written beside ``path`` and renamed into place.
    """
    from safetensors.torch import save_model

    for key in ("model", "model_args"):
        if key not in metadata:
            raise ValueError(f"metadata must hold {key!r} so the checkpoint can rebuild its model")
    meta = {"format": "pt"}
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) and key not in _JSON_KEYS else json.dumps(value)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint written by :func:`save_checkpoint`, JSON values decoded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    if "model" not in meta or "model_args" not in meta:
        raise CheckpointError(f"{path}: not a gatezoo checkpoint (no 'model'/'model_args' in its metadata)")
    for key in _JSON_KEYS:
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in a checkpoint's metadata, load its weights; returns (model, metadata)."""
    from safetensors.torch import load_model

    meta = read_checkpoint_metadata(path)
    model = build_model(meta["model"], **meta["model_args"])
    load_model(model, str(path), strict=True)
    return model.to(device), meta
