"""Train an image classifier from a YAML config.

    python -m gatezoo.train.classify --config configs/vit_tiny.yaml
    python -m gatezoo.train.classify --config configs/vit_tiny.yaml --epochs 1 --model_args.depth 2
    python -m gatezoo.train.classify --resume runs/vit_tiny-20250101-120000

The image-classification task (:class:`ImageClassification`) on the shared loop
(:func:`gatezoo.train.core.loop.fit`). Each run writes ``<out>/<name or model>-<YYYYmmdd-HHMMSS>/``
holding

- ``config.yaml``: the resolved config (``model_args`` completed with the data set's
  ``in_chans``, ``img_size`` and ``num_classes``);
- ``metrics.csv``: one row per evaluation (every epoch, and where ``max_steps`` stops a run):
  epoch (fractional for a partial epoch), step, train_loss (the label-smoothed objective),
  train_acc, test_loss (plain cross-entropy), test_acc, lr (of the last step), img_per_s
  (over the time of forward, backward and optimizer steps; a process's first step, which pays for
  lazy initialisation, is not timed), seconds (wall time of the run so far, evaluations included);
- ``curves.png``: loss and accuracy against epoch;
- ``last.safetensors`` and ``best.safetensors`` (highest test accuracy; there is no separate
  validation split, so quote ``last``): weights with metadata that rebuild the model alone
  (:func:`gatezoo.train.core.checkpoint.load_checkpoint`, ``python -m gatezoo.train.evaluate``);
- ``checkpoints/step-<N>/``: the newest two snapshots for ``--resume`` (``model.safetensors``,
  ``state.pt`` with optimizer, scheduler, position in the run and every RNG state, and
  ``manifest.json`` with their sizes and SHA-256), one at every evaluation and, with
  ``checkpoint_every``, every that many optimizer steps in between;
- ``state.pt``: the newest snapshot's training state.

``--resume RUN_DIR`` reads ``RUN_DIR/config.yaml`` (overrides on the command line still apply,
e.g. ``--max_steps null`` to lift a smoke-test limit) and continues from the newest snapshot that
matches its manifest (an incomplete or damaged one is skipped with a warning naming the file),
mid-epoch included; the result equals an uninterrupted run's. The epoch order depends only on
(seed, epoch), so skipping ahead in an epoch needs no saved iterator. See docs/training.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import distributed
from .core.checkpoint import write_text
from .core.config import (
    ConfigError,
    check_resume_config,
    check_warmup_option,
    config_source,
    dump_config,
    given_keys,
    keys_help,
    load_config,
    parse_overrides,
    raise_all,
    warmup_steps,
)
from .core.factory import build_model, count_params, parse_model_spec
from .core.loop import STATE_FILE, Trainee, autocast, fit, steps_per_epoch
from .core.optim import build_optimizer, build_scheduler
from .core.runs import model_error, resolve_device, start_run_dir, wrap_for
from .data.images import FASHION_MNIST, Batches, DataFormatError, DataNotFoundError, Dataset, load_dataset

METRICS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "img_per_s", "seconds")
"""The columns of a classification run's ``metrics.csv``."""
RESUME_FIXED = ("model", "model_args", "data", "out", "name", "lr", "weight_decay", "batch_size", "accum_steps", "seed")
"""Keys a resumed classification run cannot change: the run's weights fix the model, its
``config.yaml`` the data set and the place, the saved optimizer state keeps its own learning rate
and weight decay, and the batches follow from ``batch_size``, ``accum_steps`` and ``seed``."""


def data_model_args(dataset: Dataset, model_args: Mapping[str, Any]) -> dict:
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


def data_spec(data: str) -> str:
    """The data spec as stored in configs and checkpoints: the name, or an absolute path."""
    if data.lower().replace("_", "-") in (FASHION_MNIST, "fashionmnist"):
        return FASHION_MNIST
    return str(Path(data).expanduser().resolve())


class ImageClassification:
    """The image-classification task of :func:`gatezoo.train.core.loop.fit`: label-smoothed
    cross-entropy on shuffled batches of ``dataset``'s training split, plain cross-entropy and
    accuracy on its test split.

    Args:
        dataset: a :class:`~gatezoo.train.data.images.Dataset`.
        batch_size, eval_batch_size: batch sizes.
        seed: seed of the epoch order (and of the augmentation).
        augment: light augmentation (random shifts, flips).
        label_smoothing: of the training loss.
        device: where the batches go.
        data: the data spec recorded in checkpoints (default: the data set's name).
    """

    unit = "img"
    score = "test_acc"
    curves = (("cross-entropy", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc")))

    def __init__(self, dataset: Dataset, *, batch_size: int, eval_batch_size: int = 512, seed: int = 0,
                 augment: bool = False, label_smoothing: float = 0.0, device: torch.device | str = "cpu",
                 data: str | None = None):
        device = torch.device(device)
        self.dataset, self.label_smoothing, self.data = dataset, label_smoothing, data or dataset.name
        self.mean, self.std = dataset.mean_std()
        self.train_batches = Batches(dataset.train_images, dataset.train_labels, batch_size, mean=self.mean,
                                     std=self.std, shuffle=True, seed=seed, augment=augment, device=device)
        self.test_batches = Batches(dataset.test_images, dataset.test_labels, eval_batch_size, mean=self.mean,
                                    std=self.std, device=device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int, dict]:
        """Label-smoothed cross-entropy of a batch (computed in float32), its size and the number correct."""
        images, labels = batch
        logits = model(images)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise RuntimeError(
                f"model must return logits (B, num_classes) = ({labels.shape[0]}, C), got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, len(labels), {"correct": (logits.detach().argmax(-1) == labels).sum()}

    def train_metrics(self, stats) -> dict:
        """``train_acc`` over the epoch so far."""
        return {"train_acc": stats.total("correct") / stats.items if stats.items else float("nan")}

    def evaluate(self, model: nn.Module) -> dict:
        """``test_loss`` (plain cross-entropy) and ``test_acc`` on the test split."""
        ev = evaluate_model(model, self.test_batches, self.dataset.num_classes)
        return {"test_loss": ev["loss"], "test_acc": ev["acc"]}

    def checkpoint_info(self) -> dict:
        """What a checkpoint needs to classify again: the data set, class names, input mean/std."""
        return {"name": "image_classification", "data": self.data, "dataset": self.dataset.name,
                "classes": list(self.dataset.classes), "mean": list(self.mean), "std": list(self.std)}


def make_trainee(cfg: Mapping, spec: str, model_args: Mapping, per_epoch: int, device: torch.device,
                 run_dir: Path | None = None, dataset: Dataset | None = None,
                 env: distributed.DistEnv = distributed.SINGLE) -> Trainee:
    """Model ``spec`` seeded with ``cfg["seed"]``, its AdamW and schedule from ``cfg``, as a
    :class:`~gatezoo.train.core.loop.Trainee`. With ``dataset``, the spec's own overrides must fit it
    too (image shape, classes). In a distributed run (``env``) the model is wrapped for data
    parallelism (DDP, or FSDP with ``cfg["fsdp"]``) before its optimizer is made."""
    try:
        _, own = parse_model_spec(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if dataset is not None and own:
        data_model_args(dataset, own)
    torch.manual_seed(cfg["seed"])
    try:
        model = build_model(spec, **model_args).to(device)
    except ValueError as e:
        raise model_error(spec, model_args, e) from e
    params = count_params(model)
    net, sharded = wrap_for(model, env, device, cfg)
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"])
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, per_epoch), cfg["epochs"] * per_epoch, cfg["schedule"])
    return Trainee(spec, model, optimizer, scheduler, model_args=dict(model_args), run_dir=run_dir,
                   params=params, net=net, sharded=sharded)


def fit_options(cfg: Mapping, device: torch.device) -> dict:
    """The keyword arguments of :func:`~gatezoo.train.core.loop.fit` that a config sets."""
    return dict(epochs=cfg["epochs"], device=device, bf16=cfg["bf16"], grad_clip=cfg["grad_clip"],
                accum_steps=cfg["accum_steps"], max_steps=cfg["max_steps"], progress=cfg["progress"],
                checkpoint_every=cfg.get("checkpoint_every"), nonfinite=cfg.get("nonfinite", "stop"))


def train(cfg: dict, resume: str | Path | None = None) -> dict:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes (see :mod:`gatezoo.train.core.config`).

    Returns ``{"run_dir", "test_acc" (last evaluation), "best_acc", "step", "epoch"}``.
    """
    if resume is not None:
        check_resume_config(resume, load_config(config_source(None, resume)), cfg, RESUME_FIXED,
                            normalise={"data": data_spec})
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    env = distributed.setup(device)
    device = distributed.device_for(env, device)
    dataset = load_dataset(cfg["data"])
    model_args = data_model_args(dataset, cfg["model_args"])
    cfg = {**cfg, "model_args": model_args, "data": data_spec(cfg["data"])}
    task = ImageClassification(dataset, batch_size=cfg["batch_size"], eval_batch_size=cfg["eval_batch_size"],
                               seed=cfg["seed"], augment=cfg["augment"], label_smoothing=cfg["label_smoothing"],
                               device=device, data=cfg["data"])
    per_epoch = steps_per_epoch(task, cfg["accum_steps"])
    fresh = resume is None
    if cfg["fsdp"] and not env.active:
        raise ConfigError("fsdp: true needs several processes; launch with torchrun --nproc_per_node=N")
    run_dir = start_run_dir(env, cfg["out"], cfg["name"] or cfg["model"]) if fresh else Path(resume)
    try:
        trainee = make_trainee(cfg, cfg["model"], model_args, per_epoch, device, run_dir, dataset=dataset, env=env)
        if env.rank > 0:  # dropout noise of its own
            torch.manual_seed(cfg["seed"] * 1_000_003 + env.rank)
        if fresh and env.main:
            print(dataset.summary())
            where = f"{device}" + (f", {env.world} processes" if env.active else "")
            print(f"{cfg['model']}: {trainee.params:,} parameters, {per_epoch} steps/epoch on {where}; "
                f"run directory {run_dir}")
        def write_config() -> None:
            # once fit has accepted the run (a resume restored): a refused resume keeps RUN_DIR as it was
            if env.main:
                write_text(run_dir / "config.yaml", dump_config(cfg))

        pos = fit(task, [trainee], resume=not fresh, title=f"{cfg['model']} on {dataset.name}", env=env,
                  on_start=write_config, **fit_options(cfg, device))
    except BaseException:
        if fresh and env.main and not (run_dir / STATE_FILE).exists():  # no half-made run directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        distributed.teardown(env)
    if not env.main:
        return {"run_dir": run_dir, "rank": env.rank}
    if pos["stopped"] and pos["epoch"] < cfg["epochs"]:
        print(f"stopped at max_steps={cfg['max_steps']} (step {pos['global_step']} of {cfg['epochs'] * per_epoch}); "
              f"continue with --resume {run_dir} --max_steps null")
    last = trainee.rows[-1] if trainee.rows else {}
    return {"run_dir": run_dir, "test_acc": last.get("test_acc", float("nan")), "best_acc": trainee.best,
            "step": pos["global_step"], "epoch": pos["global_step"] / per_epoch}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``, ``--resume``; every config key as ``--key value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.classify",
        description="Train an image classifier (gatezoo model or timm peer) from a YAML config. Every config key can "
        "be overridden as --key VALUE (VALUE parsed as YAML; dotted keys reach into model_args, e.g. "
        "--model_args.depth 2). Writes <out>/<name or model>-<timestamp>/ with config.yaml, metrics.csv, "
        "curves.png, last.safetensors, best.safetensors, checkpoints/ (snapshots for --resume) and state.pt.",
        epilog=keys_help() + "\n\nexamples:\n"
        "  python -m gatezoo.train.classify --config configs/vit_tiny.yaml\n"
        "  python -m gatezoo.train.classify --config configs/demo.yaml --max_steps 20 --data my.npz\n"
        "  python -m gatezoo.train.classify --resume runs/vit_tiny-20250101-120000 --max_steps null\n"
        "\nexit status: 0 on success, 2 on a bad config or missing/unreadable data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="YAML", help="config file (keys below; omitted keys take their defaults)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest intact snapshot (RUN_DIR/checkpoints/), "
                        "with RUN_DIR/config.yaml as the config")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        config_path = config_source(args.config, args.resume)
        overrides = parse_overrides(rest)
        cfg = load_config(config_path, overrides)
        raise_all(check_warmup_option(cfg, given_keys(overrides)))
        result = train(cfg, resume=args.resume)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "rank" in result:  # a distributed run's other processes: rank 0 reports
        return 0
    print(f"final test accuracy: {result['test_acc']:.4f} (best {result['best_acc']:.4f}) -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
