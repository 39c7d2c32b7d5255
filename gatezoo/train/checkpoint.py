"""Checkpoints that rebuild their own model, and the training state that ``--resume`` reads.

A checkpoint is a safetensors file of the model's weights whose metadata rebuilds the model and
says what it was trained for. Every metadata value is stored as JSON text:

- ``model``: the model name or spec (:func:`gatezoo.train.factory.build_model`);
- ``model_args``: the constructor overrides;
- ``task``: whatever the task needs to use the model again, a mapping whose ``name`` says the
  task (an image classifier stores its data set, class names and input mean/std);
- ``epoch``, ``step``, ``metrics`` (the evaluation at that point) and ``gatezoo_version``.

:func:`load_checkpoint` needs nothing but the file. The training state (``state.pt``: optimizer,
scheduler, running sums, position in the run, RNG states) is a plain ``torch.save`` file. Both are
written beside their destination and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .factory import build_model


class CheckpointError(ValueError):
    """A file is not a gatezoo checkpoint (not safetensors, or no model metadata)."""


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write ``model``'s weights to a safetensors file with ``metadata`` (each value as JSON).

    ``metadata`` must hold ``model`` and ``model_args`` for :func:`load_checkpoint`.
    """
    from safetensors.torch import save_model

    for key in ("model", "model_args"):
        if key not in metadata:
            raise ValueError(f"metadata must hold {key!r} so the checkpoint can rebuild its model")
    meta = {"format": "pt", "gatezoo_metadata": "json"}
    for key, value in metadata.items():
        meta[key] = json.dumps(value)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _decode(meta: dict, aliases: set[str] = frozenset()) -> dict:
    """``aliases``: metadata keys that safetensors' ``save_model`` wrote for tied tensors (a dropped
    tensor name mapped to the name it is stored under); kept apart from gatezoo's JSON values."""
    aliases = [k for k in meta if k in aliases]
    if meta.pop("gatezoo_metadata", None) == "json":
        out = {k: (v if k == "format" else json.loads(v)) for k, v in meta.items() if k not in aliases}
        if aliases:  # safetensors' save_model stores each tied tensor once, naming the others here
            out["tied_tensors"] = {k: meta[k] for k in aliases}
        return out
    # gatezoo 0.1 wrote strings raw, other values as JSON, and the image fields at the top level
    out = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value) if key not in ("model", "data", "dataset", "gatezoo_version") else value
        except json.JSONDecodeError:
            out[key] = value
    if "task" not in out:
        out["task"] = {"name": "image_classification",
                       **{k: out[k] for k in ("data", "dataset", "classes", "mean", "std") if k in out}}
    if "metrics" not in out and "test_acc" in out:
        out["metrics"] = {"test_acc": out["test_acc"]}
    return out


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint written by :func:`save_checkpoint`, decoded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    if "model" not in meta or "model_args" not in meta:
        raise CheckpointError(f"{path}: not a gatezoo checkpoint (no 'model'/'model_args' in its metadata)")
    try:
        return _decode(meta, {k for k in meta if k not in names and meta[k] in names})
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from e


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in a checkpoint's metadata, load its weights; returns (model, metadata)."""
    from safetensors.torch import load_model

    meta = read_checkpoint_metadata(path)
    model = build_model(meta["model"], **meta["model_args"])
    load_model(model, str(path), strict=True)
    return model.to(device), meta


def load_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into ``model`` (strict)."""
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True, device=str(device))


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` the training state, written beside ``path`` and renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    """The training state saved by :func:`save_state` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """The CPU and CUDA random-number generator states."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
