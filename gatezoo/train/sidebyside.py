"""Train several models side by side on identical batches and compare them.

    python -m gatezoo.train.sidebyside --models vit_tiny timm_vit_tiny ninformer_tiny --epochs 3
    python -m gatezoo.train.sidebyside --models vit_tiny vit_tiny:ffn=xatglu1 --seeds 0 1 2
    python -m gatezoo.train.sidebyside --models vit_tiny mixer_tiny --max_steps 50 --model_args '{depth: 2}'

The models train in turns on the shared loop (:func:`gatezoo.train.core.loop.fit` with one trainee per
model): one shuffled batch order (seeded), and at every step each model takes one optimizer step on
the same batch, the model that goes first rotating from step to step. Each model's throughput
counts only its own forward, backward and optimizer step (CUDA synchronised; the first step, which
pays for lazy initialisation, is not timed). Every model is initialised from the same seed and
trained with the task, optimizer, schedule and loss of :mod:`gatezoo.train.classify`, and
evaluated on the test split after every epoch. The options are those of the classify command (the
same config keys, ``--config`` file and ``--key value`` overrides), plus ``--models``, ``--seeds``
and ``--same_init``; the output directory ``out`` defaults to ``benchmarks``.

A model is a gatezoo registry name, a timm peer of :mod:`gatezoo.train.peers.vision`, or either with its
own overrides, ``NAME:key=value,key=value`` (:func:`gatezoo.train.core.factory.parse_model_spec`), so
that variants of one preset run side by side: ``vit_tiny:ffn=mlp-xatlu``.

``--seeds 0 1 2 3`` repeats the whole run once per seed (initial weights and batch order both
change with the seed) and summarises the final test accuracy as mean and standard deviation over
the seeds, which tells a real difference between two models from initialisation noise.
``--summary A.csv B.csv [--merged ALL.csv] [--pairs A1 B1 ...]`` trains nothing: it joins the
CSVs of separate runs (other seeds, or other models on the same seeds) and prints that table, and
with ``--pairs`` the paired differences A - B of final test accuracy, seed by seed.

Writes ``<out>/<data set>-sidebyside.csv`` (one row per seed, model and epoch: model, seed,
params, epoch, step, train_loss, train_acc, test_loss, test_acc, train_img_per_s, train_seconds,
lr, batch_size, device), ``<out>/<data set>-sidebyside.png`` (test accuracy against epoch, the mean
over seeds) and prints a markdown table (model | params | test acc | train img/s) at the end.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from gatezoo.eval.plots import pyplot, save_figure

from ..models import VisionTransformer, vit_state_dict_from_timm
from .classify import ImageClassification, data_model_args, fit_options, make_trainee
from .core.config import ConfigError, check, keys_help, load_config
from .core.loop import MOE_COLUMNS, Trainee, fit, steps_per_epoch
from .core.runs import resolve_device
from .data.images import DataFormatError, DataNotFoundError, load_dataset

# MOE_COLUMNS (from the loop): the mixture-of-experts columns, NaN for dense models
COLUMNS = ("model", "seed", "params", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
           "train_img_per_s", "train_seconds", "lr", "batch_size", "device", *MOE_COLUMNS)


def run_sidebyside(models: Sequence[str], cfg: Mapping, *, seeds: Sequence[int] | None = None,
                   same_init: bool = False) -> list[dict]:
    """Train ``models`` in turns on identical batches with the validated config ``cfg`` (its
    ``model`` key is ignored); write the CSV and PNG under ``cfg["out"]``; return the CSV rows.

    ``cfg["model_args"]`` (e.g. ``{"dim": 64, "depth": 2}``) go to every model, under each model
    spec's own overrides; ``in_chans``, ``img_size`` and ``num_classes`` come from the data set.
    ``max_steps`` stops every model after that many steps (smoke tests); the schedule still spans
    ``epochs``. ``seeds`` (default ``[cfg["seed"]]``) repeats the run once per seed, in order, into
    one CSV. ``same_init`` starts every gatezoo softmax / mlp-gelu ViT in the run from the initial
    weights of the ``timm_vit_tiny`` peer (which must be in ``models``), so that only the
    implementations differ, not the draws.
    """
    models = list(models)
    if not models:
        raise ConfigError("models: name at least one model")
    if len(set(models)) != len(models):
        raise ConfigError(f"models: each name once, got {models}")
    seeds = [cfg["seed"]] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: give at least one seed, each once, got {seeds}")
    seeds = [check("seed", sd) for sd in seeds]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = resolve_device(cfg["device"])
    dataset = load_dataset(cfg["data"])
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {str(out)!r} is a file, not a directory")
    args = data_model_args(dataset, cfg["model_args"])
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{dataset.name}-sidebyside.csv", out / f"{dataset.name}-sidebyside.png"
    load_path = out / f"{dataset.name}-expert-load.csv"
    rows: list[dict] = []
    loads: list[dict] = []  # per-expert load shares of the MoE models at each evaluation
    summaries = []
    log = tqdm.write if cfg["progress"] else print
    for sd in seeds:
        if len(seeds) > 1:
            log(f"seed {sd}")
        run_cfg = {**cfg, "seed": sd}
        task = ImageClassification(dataset, batch_size=cfg["batch_size"], eval_batch_size=cfg["eval_batch_size"],
                                   seed=sd, augment=cfg["augment"], label_smoothing=cfg["label_smoothing"],
                                   device=dev)
        per_epoch = steps_per_epoch(task, cfg["accum_steps"])
        trainees = [make_trainee(run_cfg, name, args, per_epoch, dev, dataset=dataset) for name in models]
        if same_init:
            share_timm_init(trainees)
        log(dataset.summary())
        log(", ".join(f"{t.spec}: {t.params:,} params" for t in trainees) + f"; {per_epoch} steps/epoch on {dev}")

        def record(results, sd=sd):
            for t, row in results:
                rows.append({"model": t.spec, "seed": sd, "params": t.params, "epoch": round(row["epoch"], 4),
                             "step": row["step"], "train_loss": row["train_loss"], "train_acc": row["train_acc"],
                             "test_loss": row["test_loss"], "test_acc": row["test_acc"],
                             "train_img_per_s": row["img_per_s"], "train_seconds": t.stats.seconds, "lr": row["lr"],
                             "batch_size": cfg["batch_size"], "device": str(dev),
                             **{k: row.get(k, float("nan")) for k in MOE_COLUMNS}})
                for layer, shares in t.expert_load.items():
                    loads.extend({"model": t.spec, "seed": sd, "step": row["step"], "layer": layer, "expert": e,
                                  "share": share} for e, share in enumerate(shares))
            write_csv(rows, csv_path)
            if loads:
                write_expert_load(loads, load_path)
                plot_expert_load(loads, load_path.with_suffix(".png"), title=f"{dataset.name}, seed {sd}")
            plot_accuracy(rows, png_path, title=f"{dataset.name}, batch {cfg['batch_size']}, {dev}")

        fit(task, trainees, on_eval=record, **fit_options(cfg, dev))
        summaries.append([{"model": t.spec, "params": t.params, "test_acc": t.last["test_acc"],
                           "train_img_per_s": t.rate} for t in trainees])
    print(markdown_table(summaries[0]) if len(seeds) == 1 else seeds_table(summaries, seeds))
    print(f"\nwrote {csv_path} and {png_path}")
    return rows


def share_timm_init(trainees: list[Trainee]) -> None:
    """Load the ``timm_vit_tiny`` trainee's weights into every gatezoo ViT trainee."""
    peer = next((t for t in trainees if t.spec == "timm_vit_tiny"), None)
    if peer is None:
        raise ConfigError("same_init: needs the peer timm_vit_tiny among the models")
    state = vit_state_dict_from_timm(peer.model.state_dict())
    others = [t for t in trainees if t is not peer]
    if not others:
        raise ConfigError("same_init: name at least one gatezoo ViT beside timm_vit_tiny")
    for t in others:
        try:
            if not isinstance(t.model, VisionTransformer):
                raise ValueError("not a VisionTransformer")
            t.model.load_state_dict(state)
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"same_init: {t.spec} cannot start from timm_vit_tiny's weights (it must be a "
                              f"softmax / mlp-gelu ViT of the same shape): {first}") from e


def write_csv(rows: list[dict], path: Path) -> None:
    """Write side-by-side rows (columns :data:`COLUMNS`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in COLUMNS})


LOAD_COLUMNS = ("model", "seed", "step", "layer", "expert", "share")


def write_expert_load(loads: list[dict], path: Path) -> None:
    """Write the per-expert load shares of the MoE models (columns :data:`LOAD_COLUMNS`: each
    expert's share of a layer's routed assignments over the training steps before an evaluation)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOAD_COLUMNS)
        w.writeheader()
        for r in loads:
            w.writerow({k: f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in LOAD_COLUMNS})


def plot_expert_load(loads: list[dict], path: Path, title: str = "") -> None:
    """One panel per MoE model: each layer's per-expert load share at the model's last evaluation
    of the last seed, with the balanced share 1/E dashed."""
    plt = pyplot()

    seed = loads[-1]["seed"]
    models = list(dict.fromkeys(r["model"] for r in loads if r["seed"] == seed))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        mine = [r for r in loads if r["model"] == model and r["seed"] == seed]
        last = max(r["step"] for r in mine)
        layers = list(dict.fromkeys(r["layer"] for r in mine))
        for i, layer in enumerate(layers):
            pts = sorted((r["expert"], r["share"]) for r in mine if r["step"] == last and r["layer"] == layer)
            ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, lw=1, label=f"layer {i}")
        num = 1 + max(r["expert"] for r in mine)
        ax.axhline(1 / num, color="grey", ls="--", lw=0.8)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("share of routed tokens")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path, title)


def markdown_table(summary: list[dict]) -> str:
    """``model | params | test acc | train img/s`` from dicts with those values."""
    lines = ["| model | params | test acc | train img/s |", "|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['params']:,} | {s['test_acc']:.4f} | {s['train_img_per_s']:.0f} |")
    return "\n".join(lines)


def seeds_table(summaries: list[list[dict]], seeds: list[int]) -> str:
    """``model | params | test acc mean ± sd | per seed | train img/s`` over the runs of several seeds
    (``summaries[i]`` is the run of ``seeds[i]``: one dict per model with its ``model``, ``params``,
    ``test_acc`` and ``train_img_per_s``); the sd is the sample standard deviation over seeds."""
    lines = [f"| model | params | test acc, mean ± sd over {len(seeds)} seeds | per seed ({', '.join(map(str, seeds))})"
             " | train img/s |", "|---|---|---|---|---|"]
    for i, first in enumerate(summaries[0]):
        accs = [run[i]["test_acc"] for run in summaries]
        speed = statistics.mean(run[i]["train_img_per_s"] for run in summaries)
        per_seed = " / ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {first['model']} | {first['params']:,} | {statistics.mean(accs):.4f} ± "
                     f"{statistics.stdev(accs):.4f} | {per_seed} | {speed:.0f} |")
    return "\n".join(lines)


def read_csv(paths: Sequence[str | Path]) -> list[dict]:
    """The rows of side-by-side CSVs, joined in order, numbers as numbers (a missing file raises
    :class:`ConfigError`)."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--summary: no CSV at {str(path)!r}")
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                r.setdefault("seed", "0")  # CSVs of single-seed runs made before the column existed
                for k in MOE_COLUMNS:  # ... and before the mixture-of-experts columns
                    r.setdefault(k, "nan")
                missing = [k for k in COLUMNS if k not in r]
                if missing:
                    raise ConfigError(f"--summary: {path} is not a side-by-side CSV (no column {missing[0]!r})")
                rows.append({k: (r[k] if k in ("model", "device") else float(r[k]) if k not in
                                 ("seed", "params", "step", "batch_size") else int(r[k])) for k in COLUMNS})
    return rows


def summary_table(rows: Sequence[Mapping]) -> str:
    """``model | params | test acc, mean ± sd | seeds | per seed | train img/s``: each model's final
    evaluation (its last row) per seed, the sample sd over its seeds (— with one seed), and the mean
    over its seeds of each run's throughput (timed images over timed seconds, all epochs, as the
    table a run prints). Models keep the order of their first row; a later run of the same model
    and seed replaces an earlier one."""
    final: dict[str, dict[int, Mapping]] = {}
    images: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["model"] in final and r["seed"] in final[r["model"]] and r["step"] <= final[r["model"]][r["seed"]]["step"]:
            images[(r["model"], r["seed"])] = [0.0, 0.0]  # a new run of this model and seed starts
        final.setdefault(r["model"], {})[r["seed"]] = r
        acc = images.setdefault((r["model"], r["seed"]), [0.0, 0.0])
        if math.isfinite(r["train_img_per_s"]) and r["train_seconds"] > 0:
            acc[0] += r["train_img_per_s"] * r["train_seconds"]
            acc[1] += r["train_seconds"]
    lines = ["| model | params | test acc, mean ± sd | seeds | test acc per seed | train img/s |",
             "|---|---|---|---|---|---|"]
    for model, by_seed in final.items():
        accs = [r["test_acc"] for r in by_seed.values()]
        sd = f"{statistics.stdev(accs):.4f}" if len(accs) > 1 else "—"
        rates = [im / sec for im, sec in (images[(model, sd)] for sd in by_seed) if sec > 0]
        speed = statistics.mean(rates) if rates else float("nan")
        params = next(iter(by_seed.values()))["params"]
        lines.append(f"| {model} | {params:,} | {statistics.mean(accs):.4f} ± {sd} | "
                     f"{', '.join(map(str, by_seed))} | {' / '.join(f'{a:.4f}' for a in accs)} | {speed:.0f} |")
    return "\n".join(lines)


def _final_acc(rows: Sequence[Mapping]) -> dict[str, dict[int, float]]:
    """Each model's final test accuracy per seed (the last row of each model and seed)."""
    final: dict[str, dict[int, float]] = {}
    for r in rows:
        final.setdefault(r["model"], {})[r["seed"]] = r["test_acc"]
    return final


def pairs_table(rows: Sequence[Mapping], pairs: Sequence[tuple[str, str]]) -> str:
    """``A − B | seeds | mean ± sd | per seed`` for each pair of models: the difference of their
    final test accuracies in points, seed by seed (the seeds both have), the sample sd over seeds.
    Raises :class:`ConfigError` for a model without rows or a pair without a common seed."""
    final = _final_acc(rows)
    lines = ["| difference | seeds | test acc points, mean ± sd | per seed |", "|---|---|---|---|"]
    for a, b in pairs:
        for m in (a, b):
            if m not in final:
                raise ConfigError(f"--pairs: no rows for model {m!r}; the CSVs hold {list(final)}")
        seeds = [sd for sd in final[a] if sd in final[b]]
        if not seeds:
            raise ConfigError(f"--pairs: {a!r} and {b!r} share no seed")
        diffs = [100 * (final[a][sd] - final[b][sd]) for sd in seeds]
        sd = f"{statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "—"
        lines.append(f"| {a} − {b} | {', '.join(map(str, seeds))} | {statistics.mean(diffs):+.2f} ± {sd} | "
                     f"{' / '.join(f'{d:+.2f}' for d in diffs)} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: Path, title: str = "") -> None:
    """PNG of test accuracy against epoch, one line per model (the mean over the seeds of the rows,
    with each seed's run drawn faintly when there are several)."""
    plt = pyplot()

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
    ax.legend(fontsize="small")
    save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: ``--models``, ``--seeds``, ``--same_init``, ``--config``; every
    config key as ``--key value``."""
    p = argparse.ArgumentParser(
        prog="python -m gatezoo.train.sidebyside",
        description="Train several models in turns on identical batches (same seed, same order; each model's own "
        "forward+backward+step timed) and compare test accuracy and training throughput. Every config key of the "
        "classify command is an option here too (--key VALUE, VALUE parsed as YAML).",
        epilog=keys_help() + "\n\nWrites <out>/<data set>-sidebyside.csv and .png (out defaults to benchmarks) and "
        "prints a markdown table. Exit status 2 on a bad argument or missing data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="gatezoo registry names (vit_tiny, ninformer_tiny, ...), timm peers (timm_vit_tiny, "
                   "timm_mixer_tiny), or NAME:key=value,... with the model's own overrides (default: the config's "
                   "model)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="repeat the run once per seed and report mean ± sd of the test accuracy (default: --seed)")
    p.add_argument("--same_init", action="store_true",
                   help="start the gatezoo ViTs from timm_vit_tiny's initial weights (needs timm_vit_tiny in --models)")
    p.add_argument("--config", metavar="YAML", help="config file of the classify command's keys")
    p.add_argument("--summary", nargs="+", metavar="CSV",
                   help="train nothing: print the table of side-by-side CSVs joined (mean ± sd over each model's "
                   "seeds)")
    p.add_argument("--merged", metavar="CSV", help="with --summary: also write the joined rows there, and its PNG")
    p.add_argument("--pairs", nargs="+", metavar="MODEL",
                   help="with --summary: models in pairs A1 B1 A2 B2 ...; prints A - B (final test accuracy, "
                   "points) seed by seed with mean ± sd, the paired comparison that cancels the seed's luck")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.summary:
            if rest or args.models or args.seeds or args.config or args.same_init:
                raise ConfigError("--summary reads CSVs and trains nothing: give it no other option but --merged "
                                  "and --pairs")
            if args.pairs and len(args.pairs) % 2:
                raise ConfigError(f"--pairs takes models in pairs (A1 B1 A2 B2 ...), got {len(args.pairs)} names")
            rows = read_csv(args.summary)
            print(summary_table(rows))
            if args.pairs:
                print()
                print(pairs_table(rows, list(zip(args.pairs[::2], args.pairs[1::2]))))
            if args.merged:
                merged = Path(args.merged)
                merged.parent.mkdir(parents=True, exist_ok=True)
                write_csv(rows, merged)
                plot_accuracy(rows, merged.with_suffix(".png"), title=f"{merged.stem}")
                print(f"\nwrote {merged} and {merged.with_suffix('.png')}")
            return 0
        if args.merged or args.pairs:
            raise ConfigError("--merged and --pairs go with --summary")
        base = {"out": "benchmarks"}
        if args.models:
            base["model"] = args.models[0]
        cfg = load_config(args.config, rest, base=base)
        if args.seeds is not None and any(w == "--seed" or w.startswith("--seed=") for w in rest):
            raise ConfigError("give --seed or --seeds, not both")
        run_sidebyside(args.models or [cfg["model"]], cfg, seeds=args.seeds, same_init=args.same_init)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
