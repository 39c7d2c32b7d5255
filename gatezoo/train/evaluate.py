"""Evaluate a checkpoint on a data set's test split.

    python -m gatezoo.train.evaluate runs/vit_tiny-20250101-120000            # its last.safetensors
    python -m gatezoo.train.evaluate runs/vit_tiny-20250101-120000 --which best
    python -m gatezoo.train.evaluate model.safetensors --data my_data.npz

The model is rebuilt from the checkpoint's metadata (``model`` and ``model_args``); the images are
normalised with the mean/std stored there (those of the training set it was trained on). Without
``--data`` the data set recorded in the checkpoint is used. Prints the test accuracy and the
accuracy of each class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import ConfigError
from .data import Batches, DataFormatError, DataNotFoundError, load_dataset
from .engine import CheckpointError, data_model_args, evaluate_model, load_checkpoint, resolve_device


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

    Returns :func:`~gatezoo.train.engine.evaluate_model`'s dict plus ``"checkpoint"``,
    ``"model"``, ``"data"`` and ``"classes"``. Raises ``ConfigError`` when the data set's image
    shape or class count does not fit the checkpoint's model.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = resolve_checkpoint(checkpoint, which)
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    spec = data if data is not None else meta.get("data", "fashion-mnist")
    dataset = load_dataset(spec)
    data_model_args(dataset, meta["model_args"])  # raises if the shapes or class count differ
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None or len(mean) != dataset.in_chans:
        mean, std = dataset.mean_std()
    batches = Batches(dataset.test_images, dataset.test_labels, batch_size, mean=mean, std=std, device=dev)
    result = evaluate_model(model, batches, dataset.num_classes, bf16=bf16)
    classes = meta.get("classes") if data is None and meta.get("classes") else dataset.classes
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
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m gatezoo.train.evaluate",
        description="Rebuild a model from a gatezoo checkpoint's metadata and print its test accuracy and "
        "per-class accuracy.",
        epilog="exit status: 0 on success, 2 on a missing checkpoint or data set, or a data set that does not fit.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help="a .safetensors checkpoint or a run directory")
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="checkpoint of a run directory to use (default: last)")
    p.add_argument("--data", default=None,
                   help="data set: 'fashion-mnist', idx directory, .npz or image folder (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (default: 512)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, which=args.which, batch_size=args.batch_size,
                                     device=args.device, bf16=args.bf16)
    except (ConfigError, CheckpointError, DataNotFoundError, DataFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
