"""Checkpoints that rebuild their own model, the training state, and the crash-safe snapshots
that ``--resume`` reads.

A checkpoint is a safetensors file of the model's weights whose metadata rebuilds the model and
says what it was trained for. Every metadata value is stored as JSON text:

- ``model``: the model name or spec (:func:`gatezoo.train.core.factory.build_model`);
- ``model_args``: the constructor overrides;
- ``task``: whatever the task needs to use the model again, a mapping whose ``name`` says the
  task (an image classifier stores its data set, class names and input mean/std);
- ``epoch``, ``step``, ``metrics`` (the evaluation at that point, absent from a snapshot taken
  between evaluations) and ``gatezoo_version``.

:func:`load_checkpoint` needs nothing but the file. The training state (``state.pt``: optimizer,
scheduler, running sums, position in the run, every RNG state) is a plain ``torch.save`` file.

Every file is written atomically (:func:`atomic_path`): to a temporary name in the same folder,
flushed and ``fsync``-ed, renamed over the destination, and the folder ``fsync``-ed, so a reader
(or a run killed at any instant) sees the old file or the new one, never half a file.

A *snapshot* (:func:`save_snapshot`) is what a run resumes from: ``RUN_DIR/checkpoints/step-<8
digits>/`` holding ``model.safetensors``, ``state.pt`` and, written last, ``manifest.json`` (the
size and SHA-256 of each file, the step and the snapshot format). It is assembled in
``step-<N>.partial/`` and renamed into place once complete; the newest two are kept, the older
ones deleted only after the new one is complete. :func:`verify_snapshot` checks a snapshot
against its manifest, naming the first file that is missing, truncated or corrupt.

``GATEZOO_FAULT`` (a testing aid, read by :func:`fault` only) makes a process kill itself with
SIGKILL: ``kill-at-step:N`` after its optimizer step N, ``kill-in-save:N`` while saving the
snapshot of step N, between its files and its manifest (several: comma-separated).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .factory import build_model

SNAPSHOT_DIR = "checkpoints"
"""The folder of a run directory that holds the snapshots."""
SNAPSHOT_FORMAT = 1
"""The format of ``manifest.json`` and of the snapshot layout that this version writes and reads."""
MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "manifest.json"
KEEP_SNAPSHOTS = 2
FAULT_ENV = "GATEZOO_FAULT"
FAULTS = ("kill-at-step", "kill-in-save")
_SNAPSHOT_NAME = re.compile(r"step-(\d{8,})")


class CheckpointError(ValueError):
    """A file is not a usable gatezoo checkpoint (not safetensors, truncated, corrupt, no model
    metadata); the message names the file."""


# ---------------------------------------------------------------------------------------------
# atomic files


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder, so that the renames in it survive a power cut (a no-op where folders
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block it is ``fsync``-ed and
    renamed over ``path``, and the folder ``fsync``-ed. On an exception it is removed and
    ``path`` left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` atomically: a hard link where the file system allows, else a copy."""
    with atomic_path(dst) as tmp:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------------
# checkpoints and state


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write ``model``'s weights to a safetensors file with ``metadata`` (each value as JSON), atomically.

    ``metadata`` must hold ``model`` and ``model_args`` for :func:`load_checkpoint`.
    """
    from safetensors.torch import save_model

    for key in ("model", "model_args"):
        if key not in metadata:
            raise ValueError(f"metadata must hold {key!r} so the checkpoint can rebuild its model")
    meta = {"format": "pt", "gatezoo_metadata": "json"}
    for key, value in metadata.items():
        meta[key] = json.dumps(value)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=meta)


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
        raise CheckpointError(f"{path}: not a safetensors file, or truncated ({e})") from e
    if "model" not in meta or "model_args" not in meta:
        raise CheckpointError(f"{path}: not a gatezoo checkpoint (no 'model'/'model_args' in its metadata)")
    try:
        return _decode(meta, {k for k in meta if k not in names and meta[k] in names})
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from e


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in a checkpoint's metadata, load its weights; returns (model, metadata)."""
    meta = read_checkpoint_metadata(path)
    model = build_model(meta["model"], **meta["model_args"])
    load_weights(model, path)
    return model.to(device), meta


def load_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into ``model`` (strict); :class:`CheckpointError` naming the
    file when it cannot be read or does not fit the model."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except Exception as e:  # safetensors' own errors (truncated, not safetensors), RuntimeError (keys, shapes)
        raise CheckpointError(f"{path}: cannot load its weights ({e})") from e


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` the training state, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_state(path: str | os.PathLike) -> dict:
    """The training state saved by :func:`save_state` (tensors on the CPU); :class:`CheckpointError`
    naming the file when it is truncated or not a state file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and EOF errors of a damaged file
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> dict:
    """Every random-number generator state a run may draw from: torch's CPU and CUDA generators,
    Python's ``random`` and numpy's global generator (lists and tensors, for ``weights_only`` loading)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: Mapping) -> None:
    """Restore :func:`rng_state` (a state without the Python or numpy entries leaves those as they are)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# snapshots


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def snapshot_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``RUN_DIR/checkpoints/step-<step, 8 digits>``."""
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{int(step):08d}"


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every snapshot folder of a run (complete or not), newest first."""
    root = Path(run_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _SNAPSHOT_NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_snapshot(run_dir: str | os.PathLike, model: nn.Module, metadata: Mapping[str, Any],
                  state: Mapping[str, Any], step: int, keep: int = KEEP_SNAPSHOTS) -> Path:
    """Write the snapshot of ``step``: ``model.safetensors`` (with ``metadata``), ``state.pt`` and,
    last, ``manifest.json``, assembled in ``step-<N>.partial`` and renamed into place. Then make
    ``RUN_DIR/state.pt`` the snapshot's state (a hard link, else a copy) and delete the snapshots
    beyond the newest ``keep`` (and any of a later step, left by a run that was resumed from an
    earlier one). Returns the snapshot's folder."""
    run_dir = Path(run_dir)
    final = snapshot_dir(run_dir, step)
    final.parent.mkdir(exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    save_checkpoint(model, partial / MODEL_FILE, metadata)
    save_state(state, partial / STATE_FILE)
    fault("kill-in-save", step)
    manifest = {"format": SNAPSHOT_FORMAT, "step": int(step),
                "files": {name: _digest(partial / name) for name in (MODEL_FILE, STATE_FILE)}}
    write_text(partial / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    if final.exists():  # one of this step from an earlier attempt that did not verify
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)
    _link_or_copy(final / STATE_FILE, run_dir / STATE_FILE)
    for other in final.parent.glob("*.partial"):
        shutil.rmtree(other, ignore_errors=True)
    kept = 0
    for s, folder in list_snapshots(run_dir):  # newest first
        if s <= step:
            kept += 1
            if kept <= keep:
                continue
        shutil.rmtree(folder, ignore_errors=True)
    return final


def verify_snapshot(folder: str | os.PathLike) -> dict:
    """The manifest of a complete snapshot whose files match it (size and SHA-256); otherwise
    :class:`CheckpointError` naming the file that is missing, truncated or corrupt."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the snapshot was not completed)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        fmt = manifest["format"]
        entries = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from e
    if fmt != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path}: snapshot format {fmt!r}; this version reads format {SNAPSHOT_FORMAT}")
    for name in (MODEL_FILE, STATE_FILE):
        if name not in entries:
            raise CheckpointError(f"{path}: lists no {name}")
    for name, (size, sha) in entries.items():
        file = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{path}: bad file name {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: truncated or overwritten ({actual} bytes, the manifest says {size})")
        if _digest(file)["sha256"] != sha:
            raise CheckpointError(f"{file}: corrupt (its SHA-256 differs from the manifest's)")
    return manifest


# ---------------------------------------------------------------------------------------------
# fault injection (a testing aid)


def faults() -> list[tuple[str, int]]:
    """The faults that ``GATEZOO_FAULT`` asks for, as ``(kind, step)``; ``ValueError`` when malformed."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, at = item.partition(":")
        if kind not in FAULTS or not at.isdigit():
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill-at-step:N or kill-in-save:N (comma-separated)")
        out.append((kind, int(at)))
    return out


def fault(kind: str, step: int) -> None:
    """Kill this process with SIGKILL if ``GATEZOO_FAULT`` asks for fault ``kind`` at ``step``
    (the crash-safety tests' hook; nothing happens when the variable is unset)."""
    if FAULT_ENV not in os.environ or (kind, step) not in faults():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover (no SIGKILL on this platform)
