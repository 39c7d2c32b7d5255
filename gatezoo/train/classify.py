"""Train an image classifier from a YAML config.

    python -m gatezoo.train.classify --config configs/vit_tiny.yaml
    python -m gatezoo.train.classify --config configs/vit_tiny.yaml --epochs 1 --model_args.depth 2
    python -m gatezoo.train.classify --resume runs/vit_tiny-20250101-120000

Each run writes ``<out>/<name or model>-<YYYYmmdd-HHMMSS>/`` holding

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
  (:func:`gatezoo.train.engine.load_checkpoint`, ``python -m gatezoo.train.evaluate``);
- ``state.pt``: optimizer, scheduler, position in the run and RNG state for ``--resume``.

``--resume RUN_DIR`` reads ``RUN_DIR/config.yaml`` (overrides on the command line still apply,
e.g. ``--max_steps null`` to lift a smoke-test limit) and continues at the step where the run
stopped, mid-epoch included; the result equals an uninterrupted run's. The epoch order depends
only on (seed, epoch), so skipping ahead in an epoch needs no saved iterator.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ConfigError, dump_config, keys_help, load_config
from .data import FASHION_MNIST, Batches, DataFormatError, DataNotFoundError, load_dataset
from .engine import (
    RunningStats,
    build_model,
    build_optimizer,
    build_scheduler,
    count_params,
    data_model_args,
    evaluate_model,
    resolve_device,
    save_checkpoint,
    schedule_steps,
    train_step,
)

METRICS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "img_per_s", "seconds")
STATE_FILE = "state.pt"
STATE_VERSION = 1


def new_run_dir(out: str | Path, name: str) -> Path:
    """Create ``<out>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... appended if taken)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        path = out / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory {out / stem}")


def write_metrics(rows: list[dict], path: Path) -> None:
    """Write the metric rows as CSV (columns :data:`METRICS`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row[k]) for k in METRICS})
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.csv`` as dicts of floats (``[]`` when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) < 1e6 else f"{v:.1f}"
    return str(v)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """``curves.png``: train/test loss and accuracy against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train (label-smoothed)")
    ax1.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax2.plot(epochs, [r["test_acc"] for r in rows], "s-", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _data_spec(data: str) -> str:
    """The data spec as stored in checkpoints: the name, or an absolute path."""
    if data.lower().replace("_", "-") in (FASHION_MNIST, "fashionmnist"):
        return FASHION_MNIST
    return str(Path(data).expanduser().resolve())


def train(cfg: dict, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes (see :mod:`gatezoo.train.config`).

    Returns ``{"run_dir", "test_acc" (last evaluation), "best_acc", "step", "epoch"}``.
    """
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    data = load_dataset(cfg["data"])
    mean, std = data.mean_std()
    model_args = data_model_args(data, cfg["model_args"])
    cfg = {**cfg, "model_args": model_args, "data": _data_spec(cfg["data"])}

    torch.manual_seed(cfg["seed"])
    try:
        model = build_model(cfg["model"], **model_args)
    except ValueError as e:
        raise ConfigError(f"cannot build model {cfg['model']!r} with model_args {model_args}: {e}") from e
    model.to(device)
    train_batches = Batches(data.train_images, data.train_labels, cfg["batch_size"], mean=mean, std=std, shuffle=True,
                            seed=cfg["seed"], augment=cfg["augment"], device=device)
    test_batches = Batches(data.test_images, data.test_labels, cfg["eval_batch_size"], mean=mean, std=std,
                           device=device)
    steps_per_epoch = len(train_batches)
    warmup_steps, total_steps = schedule_steps(cfg["epochs"], steps_per_epoch, cfg["warmup_epochs"])
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"])
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps)
    stats = RunningStats()

    pos = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_acc": -1.0, "last_acc": float("nan"),
           "elapsed": 0.0}
    if resume is None:
        run_dir = new_run_dir(cfg["out"], cfg["name"] or cfg["model"])
        rows = []
    else:
        run_dir = Path(resume)
        state_path = run_dir / STATE_FILE
        if not state_path.is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: no {STATE_FILE} there (not a run directory, or it never "
                              f"finished an epoch)")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ConfigError(f"--resume: the run had {state['steps_per_epoch']} steps per epoch, this config gives "
                              f"{steps_per_epoch} (batch_size or data changed)")
        from safetensors.torch import load_model

        load_model(model, str(run_dir / "last.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stats.load_state_dict(state["running"])
        _set_rng_state(state["rng"])
        pos.update({k: state[k] for k in pos})
        rows = read_metrics(run_dir / "metrics.csv")
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    meta_base = {"model": cfg["model"], "model_args": model_args, "data": cfg["data"],
                 "dataset": data.name, "classes": data.classes, "mean": mean, "std": std}
    try:
        from gatezoo import __version__ as version
    except ImportError:  # pragma: no cover
        version = "unknown"
    meta_base["gatezoo_version"] = version

    def log(msg: str) -> None:
        tqdm.write(msg) if progress else print(msg)

    if resume is None:
        log(f"{data.summary()}")
        log(f"{cfg['model']}: {count_params(model):,} parameters, {steps_per_epoch} steps/epoch on {device}; "
            f"run directory {run_dir}")
    else:
        log(f"resuming {run_dir} at epoch {pos['epoch'] + 1}, step {pos['global_step']}")

    session_start = time.perf_counter()
    elapsed0 = pos["elapsed"]
    max_steps = cfg["max_steps"]
    epochs = cfg["epochs"]
    stopped = max_steps is not None and pos["global_step"] >= max_steps
    lr_used = optimizer.param_groups[0]["lr"]
    session_steps = 0  # the first step of a process is not timed (lazy initialisation)
    model.train()
    while pos["epoch"] < epochs and not stopped:
        epoch, start = pos["epoch"], pos["step_in_epoch"]
        bar = tqdm(train_batches.epoch(epoch, start), total=steps_per_epoch, initial=start, disable=not progress,
                   desc=f"epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True, leave=False)
        for x, y in bar:
            t0 = time.perf_counter()
            lr_used = optimizer.param_groups[0]["lr"]
            loss, correct = train_step(model, optimizer, scheduler, x, y, label_smoothing=cfg["label_smoothing"],
                                       bf16=cfg["bf16"])
            loss, correct = loss.item(), correct.item()  # also waits for the device
            stats.add(loss, correct, len(y), time.perf_counter() - t0, timed=session_steps > 0)
            session_steps += 1
            pos["step_in_epoch"] += 1
            pos["global_step"] += 1
            if pos["step_in_epoch"] % 10 == 0 or pos["step_in_epoch"] == steps_per_epoch:
                bar.set_postfix(loss=f"{stats.loss:.4f}", img_s=f"{stats.img_per_s:.0f}", refresh=False)
            if max_steps is not None and pos["global_step"] >= max_steps:
                stopped = True
                break
        bar.close()

        ev = evaluate_model(model, test_batches, data.num_classes, bf16=cfg["bf16"])
        pos["elapsed"] = elapsed0 + time.perf_counter() - session_start
        row = {"epoch": pos["global_step"] / steps_per_epoch, "step": pos["global_step"], "train_loss": stats.loss,
               "train_acc": stats.acc, "test_loss": ev["loss"], "test_acc": ev["acc"], "lr": lr_used,
               "img_per_s": stats.img_per_s, "seconds": pos["elapsed"]}
        rows.append(row)
        log(f"epoch {row['epoch']:.4g}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | test loss "
            f"{row['test_loss']:.4f} acc {row['test_acc']:.4f} | {row['img_per_s']:.0f} img/s")
        if pos["step_in_epoch"] >= steps_per_epoch:
            pos["epoch"] += 1
            pos["step_in_epoch"] = 0
            stats.reset()
        pos["last_acc"] = ev["acc"]
        meta = {**meta_base, "epoch": row["epoch"], "step": pos["global_step"], "test_acc": ev["acc"]}
        save_checkpoint(model, run_dir / "last.safetensors", meta)
        if ev["acc"] > pos["best_acc"]:
            pos["best_acc"] = ev["acc"]
            save_checkpoint(model, run_dir / "best.safetensors", meta)
        state = {"version": STATE_VERSION, **pos, "steps_per_epoch": steps_per_epoch,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "running": stats.state_dict(), "rng": _rng_state()}
        torch.save(state, run_dir / (STATE_FILE + ".tmp"))
        (run_dir / (STATE_FILE + ".tmp")).replace(run_dir / STATE_FILE)
        write_metrics(rows, run_dir / "metrics.csv")
        plot_curves(rows, run_dir / "curves.png", title=f"{cfg['model']} on {data.name}")

    if stopped and pos["epoch"] < epochs:
        log(f"stopped at max_steps={max_steps} (step {pos['global_step']} of {total_steps}); continue with "
            f"--resume {run_dir} --max_steps null")
    return {"run_dir": run_dir, "test_acc": pos["last_acc"], "best_acc": pos["best_acc"], "step": pos["global_step"],
            "epoch": pos["global_step"] / steps_per_epoch}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``, ``--resume``; every config key as ``--key value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.classify",
        description="Train an image classifier (gatezoo model or timm peer) from a YAML config. Every config key can "
        "be overridden as --key VALUE (VALUE parsed as YAML; dotted keys reach into model_args, e.g. "
        "--model_args.depth 2). Writes <out>/<name or model>-<timestamp>/ with config.yaml, metrics.csv, "
        "curves.png, last.safetensors, best.safetensors and state.pt.",
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
                        help="continue the run in RUN_DIR from its state.pt, with RUN_DIR/config.yaml as the config")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.resume is not None:
            if args.config is not None:
                raise ConfigError("give --config or --resume, not both (a resumed run uses RUN_DIR/config.yaml)")
            config_path = Path(args.resume) / "config.yaml"
            if not config_path.is_file():
                raise ConfigError(f"--resume {args.resume!r}: no config.yaml there (not a run directory)")
        else:
            config_path = args.config
        cfg = load_config(config_path, rest)
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"final test accuracy: {result['test_acc']:.4f} (best {result['best_acc']:.4f}) -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
