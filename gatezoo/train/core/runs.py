"""What every training and evaluation command shares around the loop: the device it runs on,
its run directory, and the wrapping of a model for a distributed run.

One home for these helpers, so that the image-classification, translation and side-by-side
commands (and the methods that wrap a model) make run directories, pick devices and report
model-building errors the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .config import ConfigError
from .factory import model_problems


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


def new_run_dir(out: str | Path, name: str) -> Path:
    """Create ``<out>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... appended if taken)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {str(out)!r} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('/', '_').replace(':', '_')}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        path = out / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory {out / stem}")


def wrap_for(model: nn.Module, env: distributed.DistEnv, device: torch.device, cfg: Mapping):
    """``(net, sharded)`` of a trainee: ``net`` the DDP wrapper (None when the model trains as
    is), ``sharded`` True when FSDP sharded ``model`` in place."""
    if not env.active:
        return None, False
    fsdp = bool(cfg.get("fsdp"))
    wrapped = distributed.wrap(model, env, device, fsdp)
    return (None if wrapped is model else wrapped), fsdp


def model_error(spec: str, model_args: Mapping, error: Exception) -> ConfigError:
    """A :class:`ConfigError` listing every problem of ``model_args`` for model ``spec`` (see
    :func:`~gatezoo.train.factory.model_problems`), ``error`` being the first build's."""
    problems = model_problems(spec, dict(model_args), error)
    if len(problems) == 1:
        return ConfigError(f"cannot build model {spec!r} with model_args {dict(model_args)}: {problems[0]}")
    return ConfigError(f"cannot build model {spec!r} with model_args {dict(model_args)}: {len(problems)} problems:\n"
                       + "\n".join(f"  - {p}" for p in problems))


def start_run_dir(env: distributed.DistEnv, out, name: str) -> Path:
    """A new run directory, made by rank 0 and named to every process (see :func:`new_run_dir`)."""
    made = None
    if env.main:
        try:
            made = new_run_dir(out, name)
        except ConfigError as e:
            made = e
    made = distributed.broadcast_object(env, made)
    if isinstance(made, Exception):
        raise made
    return made


