"""Evaluate a checkpoint on a data set's test split.

    python -m gatezoo.train.evaluate runs/vit_tiny-20250101-120000            # its last.safetensors
    python -m gatezoo.train.evaluate runs/vit_tiny-20250101-120000 --which best
    python -m gatezoo.train.evaluate model.safetensors --data my_data.npz --eval_batch_size 256

The model is rebuilt from the checkpoint's metadata (``model`` and ``model_args``); the images are
normalised with the mean/std stored there (those of the training set it was trained on). Without
``--data`` the data set recorded in the checkpoint is used. Prints the test accuracy and the
accuracy of each class. Options use the config keys' names and checks (:mod:`gatezoo.train.core.config`):
``--data``, ``--eval_batch_size``, ``--device``, ``--bf16``, ``--threads``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .classify import data_model_args, evaluate_model
from .core.checkpoint import CheckpointError, load_checkpoint
from .core.config import KEYS, ConfigError, check, parse_overrides
from .core.runs import resolve_device
from .data.images import Batches, DataFormatError, DataNotFoundError, load_dataset

OPTIONS = ("data", "eval_batch_size", "device", "bf16", "threads")
"""Config keys the evaluate command takes as ``--key value``."""


def resolve_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A ``.safetensors`` path as is; a run directory -> its ``<which>.safetensors``."""
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    path = Path(path)
    if path.is_dir():
        path = path / f"{which}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    return path


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    which: str = "last",
    batch_size: int = 512,
    device: str = "auto",
    bf16: bool = False,
) -> dict:
    """Test-split metrics of a checkpoint (file or run directory).

    Returns :func:`~gatezoo.train.classify.evaluate_model`'s dict plus ``"checkpoint"``,
    ``"model"``, ``"data"`` and ``"classes"``. Raises ``ConfigError`` when the data set's image
    shape or class count does not fit the checkpoint's model.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = resolve_checkpoint(checkpoint, which)
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    info = meta.get("task", {})
    if info.get("name", "image_classification") != "image_classification":
        raise ConfigError(f"{path} was trained for the task {info.get('name')!r}, not image classification")
    spec = data if data is not None else info.get("data", "fashion-mnist")
    dataset = load_dataset(spec)
    data_model_args(dataset, meta["model_args"])  # raises if the shapes or class count differ
    mean, std = info.get("mean"), info.get("std")
    if mean is None or std is None or len(mean) != dataset.in_chans:
        mean, std = dataset.mean_std()
    batches = Batches(dataset.test_images, dataset.test_labels, batch_size, mean=mean, std=std, device=dev)
    result = evaluate_model(model, batches, dataset.num_classes, bf16=bf16)
    classes = info.get("classes") if data is None and info.get("classes") else dataset.classes
    return {**result, "checkpoint": str(path), "model": meta["model"], "data": dataset.name, "classes": list(classes)}


def format_report(result: dict) -> str:
    """The evaluation as text: overall accuracy, then one line per class."""
    lines = [
        f"{result['model']} on {result['data']} ({result['count']} test images, {result['checkpoint']})",
        f"test accuracy: {result['acc']:.4f}   test loss: {result['loss']:.4f}",
        "per-class accuracy:",
    ]
    width = max((len(c) for c in result["classes"]), default=5)
    for name, acc, n in zip(result["classes"], result["per_class_acc"], result["per_class_count"]):
        lines.append(f"  {name:<{width}}  {acc:.4f}  ({n})" if n else f"  {name:<{width}}  -       (0)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--which``; the config keys of :data:`OPTIONS` as ``--key value``)."""
    p = argparse.ArgumentParser(
        prog="python -m gatezoo.train.evaluate",
        description="Rebuild a model from a gatezoo checkpoint's metadata and print its test accuracy and "
        "per-class accuracy.",
        epilog="options (config keys, --key VALUE): --data (default: the checkpoint's data set), --eval_batch_size "
        "(512), --device (auto), --bf16 (false), --threads.\n"
        "exit status: 0 on success, 2 on a missing checkpoint or data set, or a data set that does not fit.",
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help="a .safetensors checkpoint or a run directory")
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="checkpoint of a run directory to use (default: last)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args, rest = build_parser().parse_known_args(argv)
    try:
        opts = {"data": None, "eval_batch_size": KEYS["eval_batch_size"].default, "device": "auto", "bf16": False,
                "threads": None}
        for key, value in parse_overrides(rest):
            if key not in OPTIONS:
                hint = key.replace("-", "_")
                hint = f" (did you mean --{hint}?)" if hint in OPTIONS else ""
                raise ConfigError(f"unknown option --{key}{hint}; evaluate takes --which and --{', --'.join(OPTIONS)}")
            opts[key] = check(key, value)
        if opts["threads"]:
            torch.set_num_threads(opts["threads"])
        result = evaluate_checkpoint(args.checkpoint, opts["data"], which=args.which,
                                     batch_size=opts["eval_batch_size"], device=opts["device"], bf16=opts["bf16"])
    except (ConfigError, CheckpointError, DataNotFoundError, DataFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
