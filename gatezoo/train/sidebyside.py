"""Train several models side by side on identical batches and compare them.

    python -m gatezoo.train.sidebyside --models vit_tiny timm_vit_tiny ninformer_tiny --epochs 3 --batch-size 128
    python -m gatezoo.train.sidebyside --models vit_tiny mixer_tiny --max-steps 50 --model-args '{depth: 2}'

The models train in turns: one shuffled batch order (seeded), and at every step each model takes
one optimizer step on the same batch, the model that goes first rotating from step to step. Each
model's throughput counts only its own forward, backward and optimizer step (``time.perf_counter``,
CUDA synchronised; the first step, which pays for lazy initialisation, is not timed). Every model
is initialised from the same seed and trained with the optimizer, schedule and loss of
:mod:`gatezoo.train.classify` (shared through :mod:`gatezoo.train.engine`), and evaluated on the
test split after every epoch.

``--seeds 0 1 2 3`` repeats the whole run once per seed (initial weights and batch order both
change with the seed) and summarises the final test accuracy as mean and standard deviation over
the seeds, which tells a real difference between two models from initialisation noise.

Writes ``<out>/<data set>-sidebyside.csv`` (one row per seed, model and epoch: model, seed,
params, epoch, step, train_loss, train_acc, test_loss, test_acc, train_img_per_s, train_seconds,
lr, batch_size, device), ``<out>/<data set>-sidebyside.png`` (test accuracy against epoch, the mean
over seeds) and prints a markdown table (model | params | test acc | train img/s) at the end. Model
names are gatezoo registry names or the timm peers of :mod:`gatezoo.train.peers`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..models import VisionTransformer, vit_state_dict_from_timm
from .config import KEYS, ConfigError, check, parse_value
from .data import Batches, DataFormatError, DataNotFoundError, load_dataset
from .engine import (
    RunningStats,
    build_model,
    build_optimizer,
    build_scheduler,
    count_params,
    data_model_args,
    evaluate_model,
    resolve_device,
    schedule_steps,
    synchronize,
    train_step,
)

COLUMNS = ("model", "seed", "params", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
           "train_img_per_s", "train_seconds", "lr", "batch_size", "device")


@dataclass
class Contender:
    """One model in a side-by-side run, with its optimizer, schedule and running sums."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: int
    stats: RunningStats = field(default_factory=RunningStats)
    images: int = 0
    seconds: float = 0.0
    lr: float = 0.0


def run_sidebyside(
    models: list[str],
    *,
    data: str = "fashion-mnist",
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.3,
    label_smoothing: float = 0.1,
    model_args: dict | None = None,
    augment: bool = False,
    bf16: bool = False,
    seed: int | Sequence[int] = 0,
    device: str = "auto",
    eval_batch_size: int = 512,
    max_steps: int | None = None,
    out: str | Path = "benchmarks",
    progress: bool = True,
    same_init: bool = False,
) -> list[dict]:
    """Train ``models`` in turns on identical batches; write the CSV and PNG; return the CSV rows.

    ``model_args`` (e.g. ``{"dim": 64, "depth": 2}``) are passed to every model; ``in_chans``,
    ``img_size`` and ``num_classes`` come from the data set. ``max_steps`` stops every model after
    that many steps (smoke tests); the schedule still spans ``epochs``. ``same_init`` starts every
    gatezoo softmax / mlp-gelu ViT in the run from the initial weights of the ``timm_vit_tiny``
    peer (which must be in ``models``), so that only the implementations differ, not the draws.
    ``seed`` may be a list of seeds: the whole run is repeated for each, in order, into one CSV.
    """
    if not models:
        raise ConfigError("models: name at least one model")
    if len(set(models)) != len(models):
        raise ConfigError(f"models: each name once, got {models}")
    hyper = dict(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
                 weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                 max_steps=max_steps)
    hyper = {k: check(k, v) for k, v in hyper.items()}
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: give at least one seed, each once, got {seeds}")
    for sd in seeds:
        check("seed", sd)
    dev = resolve_device(device)
    dataset = load_dataset(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{dataset.name}-sidebyside.csv", out / f"{dataset.name}-sidebyside.png"
    rows: list[dict] = []
    summaries = []
    for sd in seeds:
        if len(seeds) > 1:
            (tqdm.write if progress else print)(f"seed {sd}")
        summaries.append(_train_seed(models, dataset, rows, csv_path, png_path, seed=sd, hyper=hyper, dev=dev,
                                     model_args=model_args, augment=augment, bf16=bf16, progress=progress,
                                     same_init=same_init))
    if len(seeds) == 1:
        print(markdown_table(summaries[0]))
    else:
        print(seeds_table(summaries, seeds))
    print(f"\nwrote {csv_path} and {png_path}")
    return rows


def _train_seed(models, dataset, rows, csv_path, png_path, *, seed, hyper, dev, model_args, augment, bf16, progress,
                same_init) -> list[dict]:
    """One side-by-side run with ``seed``; appends to ``rows`` (rewriting the CSV and PNG after every epoch) and
    returns the run's summary (model, params, test_acc, train_img_per_s per model)."""
    epochs, batch_size, max_steps = hyper["epochs"], hyper["batch_size"], hyper["max_steps"]
    mean, std = dataset.mean_std()
    args = data_model_args(dataset, model_args or {})
    train_batches = Batches(dataset.train_images, dataset.train_labels, batch_size, mean=mean, std=std, shuffle=True,
                            seed=seed, augment=augment, device=dev)
    test_batches = Batches(dataset.test_images, dataset.test_labels, hyper["eval_batch_size"], mean=mean, std=std,
                           device=dev)
    steps_per_epoch = len(train_batches)
    warmup_steps, total_steps = schedule_steps(epochs, steps_per_epoch, hyper["warmup_epochs"])

    contenders = []
    for name in models:
        torch.manual_seed(seed)
        base, own = parse_model_spec(name)
        try:
            model = build_model(base, **{**args, **own}).to(dev)
        except ValueError as e:
            raise ConfigError(f"cannot build model {name!r} with model_args {({**args, **own})}: {e}") from e
        optimizer = build_optimizer(model, hyper["lr"], hyper["weight_decay"])
        contenders.append(Contender(name, model, optimizer, build_scheduler(optimizer, warmup_steps, total_steps),
                                    count_params(model)))
    if same_init:
        share_timm_init(contenders)
    log = tqdm.write if progress else print
    log(dataset.summary())
    log(", ".join(f"{c.name}: {c.params:,} params" for c in contenders) + f"; {steps_per_epoch} steps/epoch on {dev}")

    step = 0
    for epoch in range(epochs):
        for c in contenders:
            c.model.train()
            c.stats.reset()
        bar = tqdm(train_batches.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                   dynamic_ncols=True, leave=False, disable=not progress)
        done = False
        for x, y in bar:
            n = len(contenders)
            for k in range(n):
                c = contenders[(step + k) % n]
                c.lr = c.optimizer.param_groups[0]["lr"]
                synchronize(dev)
                t0 = time.perf_counter()
                loss, correct = train_step(c.model, c.optimizer, c.scheduler, x, y,
                                           label_smoothing=hyper["label_smoothing"], bf16=bf16)
                synchronize(dev)
                dt = time.perf_counter() - t0
                c.stats.add(loss.item(), correct.item(), len(y), dt, timed=step > 0)
            step += 1
            if step % 10 == 0:
                bar.set_postfix_str(" ".join(f"{c.name}={c.stats.loss:.3f}" for c in contenders), refresh=False)
            if max_steps is not None and step >= max_steps:
                done = True
                break
        bar.close()
        for c in contenders:
            ev = evaluate_model(c.model, test_batches, dataset.num_classes, bf16=bf16)
            c.images += c.stats.timed
            c.seconds += c.stats.seconds
            rows.append({
                "model": c.name, "seed": seed, "params": c.params, "epoch": round(step / steps_per_epoch, 4),
                "step": step,
                "train_loss": c.stats.loss, "train_acc": c.stats.acc, "test_loss": ev["loss"], "test_acc": ev["acc"],
                "train_img_per_s": c.stats.img_per_s, "train_seconds": c.stats.seconds, "lr": c.lr,
                "batch_size": batch_size, "device": str(dev),
            })
            log(f"epoch {rows[-1]['epoch']:g} {c.name}: test acc {ev['acc']:.4f}, train loss {c.stats.loss:.4f}, "
                f"{c.stats.img_per_s:.0f} img/s")
        write_csv(rows, csv_path)
        plot_accuracy(rows, png_path, title=f"{dataset.name}, batch {batch_size}, {dev}")
        if done:
            break
    return [{"model": c.name, "params": c.params, "test_acc": last_row(rows, c.name)["test_acc"],
             "train_img_per_s": c.images / c.seconds if c.seconds > 0 else float("nan")} for c in contenders]


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"vit_tiny:ffn=xatglu1,depth=2"`` -> ``("vit_tiny", {"ffn": "xatglu1", "depth": 2})``: a model
    name with its own constructor overrides (values read as YAML); a bare name has none."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"model {spec!r}: expected NAME or NAME:key=value,key=value, got the item {item!r}")
        overrides[key.strip()] = parse_value(text.strip())
    if not name:
        raise ConfigError(f"model {spec!r}: no model name before ':'")
    return name, overrides


def share_timm_init(contenders: list[Contender]) -> None:
    """Load the ``timm_vit_tiny`` contender's weights into every gatezoo ViT contender."""
    peer = next((c for c in contenders if c.name == "timm_vit_tiny"), None)
    if peer is None:
        raise ConfigError("same_init: needs the peer timm_vit_tiny among the models")
    state = vit_state_dict_from_timm(peer.model.state_dict())
    others = [c for c in contenders if c is not peer]
    if not others:
        raise ConfigError("same_init: name at least one gatezoo ViT beside timm_vit_tiny")
    for c in others:
        try:
            if not isinstance(c.model, VisionTransformer):
                raise ValueError("not a VisionTransformer")
            c.model.load_state_dict(state)
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"same_init: {c.name} cannot start from timm_vit_tiny's weights (it must be a "
                              f"softmax / mlp-gelu ViT of the same shape): {first}") from e


def last_row(rows: list[dict], model: str) -> dict:
    """The last row of ``model`` in ``rows``."""
    return [r for r in rows if r["model"] == model][-1]


def write_csv(rows: list[dict], path: Path) -> None:
    """Write side-by-side rows (columns :data:`COLUMNS`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in COLUMNS})


def markdown_table(summary: list[dict]) -> str:
    """``model | params | test acc | train img/s`` from dicts with those values."""
    lines = ["| model | params | test acc | train img/s |", "|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['params']:,} | {s['test_acc']:.4f} | {s['train_img_per_s']:.0f} |")
    return "\n".join(lines)


def seeds_table(summaries: list[list[dict]], seeds: list[int]) -> str:
    """``model | params | test acc mean ± sd | per seed | train img/s`` over the runs of several seeds
    (``summaries[i]`` is the run of ``seeds[i]``, as :func:`_train_seed` returns it); the sd is the
    sample standard deviation over seeds."""
    lines = [f"| model | params | test acc, mean ± sd over {len(seeds)} seeds | per seed ({', '.join(map(str, seeds))})"
             " | train img/s |", "|---|---|---|---|---|"]
    for i, first in enumerate(summaries[0]):
        accs = [run[i]["test_acc"] for run in summaries]
        speed = statistics.mean(run[i]["train_img_per_s"] for run in summaries)
        per_seed = " / ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {first['model']} | {first['params']:,} | {statistics.mean(accs):.4f} ± "
                     f"{statistics.stdev(accs):.4f} | {per_seed} | {speed:.0f} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: Path, title: str = "") -> None:
    """PNG of test accuracy against epoch, one line per model (the mean over the seeds of the rows,
    with each seed's run drawn faintly when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = list(dict.fromkeys(r.get("seed", 0) for r in rows))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        epochs = sorted({r["epoch"] for r in mine})
        mean = [statistics.mean(r["test_acc"] for r in mine if r["epoch"] == e) for e in epochs]
        line, = ax.plot(epochs, mean, "o-", label=name)
        if len(seeds) > 1:
            for sd in seeds:
                run = [r for r in mine if r.get("seed", 0) == sd]
                ax.plot([r["epoch"] for r in run], [r["test_acc"] for r in run], "-", color=line.get_color(),
                        alpha=0.25, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (defaults are those of :mod:`gatezoo.train.config`)."""
    d = {k: v.default for k, v in KEYS.items()}
    p = argparse.ArgumentParser(
        prog="python -m gatezoo.train.sidebyside",
        description="Train several models in turns on identical batches (same seed, same order; each model's own "
        "forward+backward+step timed) and compare test accuracy and training throughput.",
        epilog="Writes <out>/<data set>-sidebyside.csv and .png and prints a markdown table. Exit status 2 on a bad "
        "argument or missing data.",
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME",
                   help="gatezoo registry names (vit_tiny, ninformer_tiny, ...) and/or timm peers (timm_vit_tiny, "
                   "timm_mixer_tiny)")
    p.add_argument("--data", default=d["data"], help=f"data set (default: {d['data']})")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs (default: {d['epochs']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"batch size (default: {d['batch_size']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak AdamW learning rate (default: {d['lr']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help=f"AdamW weight decay (default: {d['weight_decay']})")
    p.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                   help=f"linear warm-up in epochs, then cosine to 0 (default: {d['warmup_epochs']})")
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"],
                   help=f"label smoothing (default: {d['label_smoothing']})")
    p.add_argument("--model-args", default=None, metavar="YAML",
                   help="constructor overrides for every model, as a YAML mapping, e.g. '{dim: 64, depth: 2}'")
    p.add_argument("--augment", action="store_true", help="light augmentation (random shifts, flips)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=d["seed"], help=f"seed (default: {d['seed']})")
    seed.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                      help="repeat the run once per seed and report mean ± sd of the test accuracy")
    p.add_argument("--device", default=d["device"], help="'auto', 'cpu', 'cuda', 'cuda:N' (default: auto)")
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"],
                   help=f"evaluation batch size (default: {d['eval_batch_size']})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--same-init", action="store_true",
                   help="start the gatezoo ViTs from timm_vit_tiny's initial weights (needs timm_vit_tiny in --models)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    a = build_parser().parse_args(argv)
    try:
        model_args = parse_value(a.model_args) if a.model_args is not None else {}
        if not isinstance(model_args, dict):
            raise ConfigError(f"--model-args must be a YAML mapping such as '{{dim: 64}}', got {a.model_args!r}")
        if a.threads is not None:
            if a.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {a.threads}")
            torch.set_num_threads(a.threads)
        seed = a.seeds if a.seeds is not None else a.seed
        run_sidebyside(
            a.models, data=a.data, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
            warmup_epochs=a.warmup_epochs, label_smoothing=a.label_smoothing, model_args=model_args,
            augment=a.augment, bf16=a.bf16, seed=seed, device=a.device, eval_batch_size=a.eval_batch_size,
            max_steps=a.max_steps, out=a.out, progress=not a.no_progress, same_init=a.same_init,
        )
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
