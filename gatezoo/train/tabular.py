"""GG MoE against an MLP on tabular data (Chernov 2025, "(GG) MoE vs. MLP on Tabular Data"), and
the GRKAN gate of KAMoE against the softmax gate, with gradient-boosted trees as the reference.

    python -m gatezoo.train.tabular                                   # every data set and model, 5 seeds
    python -m gatezoo.train.tabular --datasets '[wine]' --models '[mlp, ggmoe_ple]' --seeds 1
    python -m gatezoo.train.tabular --copy_to benchmarks              # also write benchmarks/tabular*.csv, .png

**Data** (:data:`DATASETS`, no downloads): scikit-learn's bundled ``breast_cancer``, ``digits``,
``wine`` (classification) and ``diabetes`` (regression); ``fashion`` (Fashion-MNIST as a table of
784 pixel columns, ``fashion_rows`` rows drawn per seed from its training file, read with
:func:`gatezoo.train.data.images.load_dataset`); ``synth_class`` (scikit-learn's
``make_classification``: 3000 rows, 20 features of which 10 informative and 4 redundant,
3 classes, 2 clusters per class, 3% label noise) and ``synth_reg`` (Friedman #1: 3000 rows,
10 uniform features of which 5 enter ``10 sin(pi x1 x2) + 20 (x3 - 1/2)^2 + 10 x4 + 5 x5``,
Gaussian noise of sd 1), both generated with seed 0 (the same table for every run seed).

**Protocol**, per data set and seed: a 64/16/20 train/validation/test split (stratified for
classes), features standardised with the training rows' mean and sd (a constant column: sd 1),
regression targets likewise. Each network trains with AdamW (``lr``, ``weight_decay``) in
mini-batches of ``batch_size`` for at most ``epochs`` epochs, cross-entropy or MSE, and keeps the
weights of its best validation epoch (accuracy, ties broken by the lower validation loss;
RMSE), stopping after ``patience`` epochs without one. The test metric is accuracy or RMSE (in
the target's units). The reference, ``hgb``, is scikit-learn's HistGradientBoostingClassifier /
Regressor with its defaults (its early stopping is on, on its own 10% split, only above 10,000
rows), fitted on the training rows.

**Models** (``models``; :mod:`gatezoo.models.tabular`): ``mlp``, ``moe`` (softmax gate),
``ggmoe`` (Gumbel-softmax gate), ``grkan_moe`` (GRKAN gate), each also with ``_ple`` (the
piecewise-linear feature embedding, bin edges from the training rows' quantiles), and ``hgb``.

Each run writes ``<out>/tabular-<timestamp>/`` with ``config.yaml``, ``runs.csv`` (one row per
data set, model and seed: metric, parameters, best epoch, seconds), ``summary.csv`` (mean ± sd
over seeds), ``counts.csv`` (the comparisons of the two papers' claims), ``result.json`` and
``tabular.png``; ``copy_to`` copies the CSVs and the PNG to ``tabular.csv``,
``tabular-summary.csv`` and ``tabular.png`` there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.models import create_model

from .core.checkpoint import write_text
from .core.config import KEYS, ConfigError, Key, command_parser, dump_config, parse_command
from .core.factory import count_params
from .core.loop import write_metrics
from .core.runs import new_run_dir
from .data.images import DataFormatError, DataNotFoundError, derive_seed, load_dataset

DATASETS = ("breast_cancer", "digits", "wine", "diabetes", "synth_class", "synth_reg", "fashion")
"""The data sets of :func:`load_table`."""
NETWORKS = ("mlp", "mlp_ple", "moe", "moe_ple", "ggmoe", "ggmoe_ple", "grkan_moe", "grkan_moe_ple")
"""The networks (registry models ``tabular_<name>``)."""
MODELS = (*NETWORKS, "hgb")
"""Every model the command runs: the networks and the trees."""

TABULAR_KEYS: dict[str, Key] = {
    "datasets": Key(list(DATASETS), "list", f"data sets, any of {list(DATASETS)}"),
    "models": Key(list(MODELS), "list", f"models, any of {list(MODELS)}"),
    "seeds": Key(5, "int", "seeds per data set and model (seed, seed + 1, ...)", minimum=1),
    "seed": Key(0, "int", "the first seed", minimum=0),
    "epochs": Key(100, "int", "most epochs per network", minimum=1),
    "patience": Key(10, "int", "stop after this many epochs without a better validation score", minimum=1),
    "batch_size": Key(64, "int", "training batch size", minimum=1),
    "lr": Key(1e-3, "float", "AdamW learning rate", minimum=0.0),
    "weight_decay": Key(1e-4, "float", "AdamW weight decay", minimum=0.0),
    "width": Key(64, "int", "the stem's and the MLP's hidden width", minimum=1),
    "depth": Key(3, "int", "MLP layers, the stem included (the MoE: stem + one MoE layer)", minimum=2),
    "dropout": Key(0.1, "float", "dropout after every hidden layer", minimum=0.0, below=1.0),
    "experts": Key(4, "int", "experts of the MoE models", minimum=2),
    "bins": Key(16, "int", "piecewise-linear embedding: bins per feature", minimum=1),
    "emb_dim": Key(8, "int", "piecewise-linear embedding: width per feature", minimum=1),
    "fashion_rows": Key(5000, "int", "fashion: rows drawn from the training file per seed", minimum=50),
    "data": KEYS["data"],
    "out": KEYS["out"],
    "name": KEYS["name"],
    "copy_to": Key(None, "str", "also copy the CSVs and PNG here as tabular.csv, tabular-summary.csv, tabular.png",
                   optional=True),
    "threads": Key(1, "int", "torch (and the trees') threads", minimum=1),
    "progress": KEYS["progress"],
}


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Table:
    """One seed's split of a data set, standardised with the training rows: features ``x_*``
    (float32, (N, F)), targets ``y_*`` (int64 classes, or float32 standardised regression
    targets), the task, the classes (0 for regression) and the target's training mean and sd
    (0 and 1 for classification)."""

    name: str
    task: str  # "classification" or "regression"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    y_mean: float = 0.0
    y_sd: float = 1.0

    @property
    def metric(self) -> str:
        """``accuracy`` (higher is better) or ``rmse`` (lower is better)."""
        return "accuracy" if self.task == "classification" else "rmse"

    @property
    def num_outputs(self) -> int:
        """The networks' output width: the classes, or 1."""
        return self.classes if self.task == "classification" else 1


def _sklearn(module: str):
    """The scikit-learn module ``module`` (ConfigError naming the ``tabular`` extra when missing)."""
    import importlib

    try:
        return importlib.import_module(f"sklearn.{module}")
    except ImportError as e:
        raise ConfigError(f"the tabular command needs scikit-learn: pip install 'gatezoo[tabular]' ({e})") from e


def raw_table(name: str, seed: int = 0, fashion_rows: int = 5000,
              data: str = "fashion-mnist") -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, task)`` of data set ``name`` before any split (float64 features; int classes or
    float targets). Only ``fashion`` depends on ``seed`` (its rows are drawn per seed)."""
    skd = _sklearn("datasets")

    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; choose from {list(DATASETS)}")
    if name in ("breast_cancer", "digits", "wine", "diabetes"):
        x, y = getattr(skd, f"load_{name}")(return_X_y=True)
        return x.astype(np.float64), y, "regression" if name == "diabetes" else "classification"
    if name == "synth_class":
        x, y = skd.make_classification(n_samples=3000, n_features=20, n_informative=10, n_redundant=4,
                                       n_classes=3, n_clusters_per_class=2, flip_y=0.03, random_state=0)
        return x, y, "classification"
    if name == "synth_reg":
        x, y = skd.make_friedman1(n_samples=3000, n_features=10, noise=1.0, random_state=0)
        return x, y, "regression"
    ds = load_dataset(data)
    images, labels = ds.train_images, ds.train_labels
    if fashion_rows > len(labels):
        raise ConfigError(f"fashion_rows ({fashion_rows}) exceeds the {len(labels)} training images of {ds.name}")
    rng = np.random.default_rng(derive_seed(seed, 0xFA5))
    idx = np.sort(rng.choice(len(labels), fashion_rows, replace=False))
    x = images[torch.as_tensor(idx)].flatten(1).numpy().astype(np.float64) / 255.0
    return x, labels[torch.as_tensor(idx)].numpy(), "classification"


def standardise(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every array minus the training mean over its sd (columns; a constant column's sd is 1)."""
    mean = train.mean(0)
    sd = train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return tuple((a - mean) / sd for a in (train, *others))


def load_table(name: str, seed: int, fashion_rows: int = 5000, data: str = "fashion-mnist") -> Table:
    """Data set ``name`` split 64/16/20 (train/validation/test) by ``seed``, stratified for
    classes, features (and regression targets) standardised with the training rows."""
    train_test_split = _sklearn("model_selection").train_test_split
    x, y, task = raw_table(name, seed, fashion_rows, data)
    strat = y if task == "classification" else None
    split_seed = derive_seed(seed, 0x7AB) % 2**31
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=split_seed, stratify=strat)
    x_tr, x_val, y_tr, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=split_seed,
                                                stratify=y_rest if task == "classification" else None)
    x_tr, x_val, x_test = standardise(x_tr, x_val, x_test)
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    if task == "classification":
        classes = int(y.max()) + 1
        ys = [torch.as_tensor(a, dtype=torch.int64) for a in (y_tr, y_val, y_test)]
        return Table(name, task, f32(x_tr), ys[0], f32(x_val), ys[1], f32(x_test), ys[2], classes)
    mean, sd = float(y_tr.mean()), float(y_tr.std()) or 1.0
    ys = [f32((a - mean) / sd) for a in (y_tr, y_val, y_test)]
    return Table(name, task, f32(x_tr), ys[0], f32(x_val), ys[1], f32(x_test), ys[2], 0, mean, sd)


# --------------------------------------------------------------------------------------------
# training


class EarlyStopping:
    """Keeps the best epoch's weights: a score is better when it is higher (``mode="max"``) or
    lower (``"min"``), ties broken by the lower ``loss``; :meth:`step` returns True once
    ``patience`` epochs in a row were not better."""

    def __init__(self, patience: int, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode = patience, mode
        self.best_epoch, self.best_score, self.best_loss = -1, None, math.inf
        self.best_state: dict | None = None
        self.bad = 0

    def better(self, score: float, loss: float) -> bool:
        """Whether (score, loss) beats the best so far."""
        if self.best_score is None:
            return True
        if score != self.best_score:
            return score > self.best_score if self.mode == "max" else score < self.best_score
        return loss < self.best_loss

    def step(self, epoch: int, score: float, loss: float, model: nn.Module | None = None) -> bool:
        """Record epoch ``epoch``; returns True when training should stop."""
        if self.better(score, loss):
            self.best_epoch, self.best_score, self.best_loss, self.bad = epoch, score, loss, 0
            if model is not None:
                self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.bad += 1
        return self.bad >= self.patience


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, table: Table,
             chunk: int = 1024) -> tuple[float, float]:
    """``(metric, loss)`` of ``model`` (in eval mode) on (x, y): accuracy and cross-entropy, or
    RMSE in the target's units and the MSE of the standardised targets."""
    model.eval()
    out = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    if table.task == "classification":
        return float((out.argmax(-1) == y).float().mean()), float(F.cross_entropy(out, y))
    mse = float(F.mse_loss(out.squeeze(-1), y))
    return math.sqrt(mse) * table.y_sd, mse


def train_network(name: str, table: Table, cfg: Mapping, seed: int) -> dict:
    """Train network ``name`` (of :data:`NETWORKS`) on ``table``; returns its test metric,
    parameter count, best epoch and epochs run."""
    torch.manual_seed(derive_seed(seed, 0x1417) % 2**63)
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xBA7C) % 2**63)
    model = create_model(f"tabular_{name}", num_features=table.x_train.shape[1], num_outputs=table.num_outputs,
                         width=cfg["width"], depth=cfg["depth"], dropout=cfg["dropout"], num_experts=cfg["experts"],
                         bins=cfg["bins"], emb_dim=cfg["emb_dim"])
    model.fit_embedding(table.x_train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    stop = EarlyStopping(cfg["patience"], "max" if table.task == "classification" else "min")
    n, bs = len(table.y_train), cfg["batch_size"]
    epochs = 0
    for epoch in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            b = order[i:i + bs]
            out = model(table.x_train[b])
            if table.task == "classification":
                loss = F.cross_entropy(out, table.y_train[b])
            else:
                loss = F.mse_loss(out.squeeze(-1), table.y_train[b])
            aux = getattr(model, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs = epoch + 1
        score, val_loss = evaluate(model, table.x_val, table.y_val, table)
        if stop.step(epoch, score, val_loss, model):
            break
    model.load_state_dict(stop.best_state)
    metric, _ = evaluate(model, table.x_test, table.y_test, table)
    return {"metric": metric, "params": count_params(model), "best_epoch": stop.best_epoch + 1,
            "epochs_run": epochs}


def train_trees(table: Table, seed: int) -> dict:
    """scikit-learn's HistGradientBoostingClassifier / Regressor with its defaults, fitted on the
    training rows; returns its test metric (the validation rows are not used)."""
    ensemble = _sklearn("ensemble")
    x, y = table.x_train.numpy(), table.y_train.numpy()
    if table.task == "classification":
        model = ensemble.HistGradientBoostingClassifier(random_state=seed % 2**31).fit(x, y)
        metric = float((model.predict(table.x_test.numpy()) == table.y_test.numpy()).mean())
    else:
        model = ensemble.HistGradientBoostingRegressor(random_state=seed % 2**31).fit(x, y)
        err = model.predict(table.x_test.numpy()) - table.y_test.numpy()
        metric = float(np.sqrt(np.mean(err ** 2))) * table.y_sd
    return {"metric": metric, "params": math.nan, "best_epoch": int(model.n_iter_), "epochs_run": int(model.n_iter_)}


# --------------------------------------------------------------------------------------------
# summaries


def summarize(rows: Sequence[Mapping]) -> list[dict]:
    """Per data set and model (in order of appearance): the metric's mean and sd over seeds,
    the parameter count, the mean best epoch (``epochs``) and seconds."""
    keys = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    out = []
    for ds, model in keys:
        runs = [r for r in rows if r["dataset"] == ds and r["model"] == model]
        vals = [float(r["metric"]) for r in runs]
        out.append({"dataset": ds, "model": model, "embedding": runs[0]["embedding"],
                    "metric_name": runs[0]["metric_name"], "seeds": len(runs), "mean": statistics.fmean(vals),
                    "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "params": runs[0]["params"],
                    "epochs": statistics.fmean(float(r["epochs"]) for r in runs),
                    "seconds": statistics.fmean(float(r["seconds"]) for r in runs)})
    return out


COMPARISONS = (("ggmoe_ple", "mlp"), ("ggmoe", "mlp"), ("ggmoe", "moe"), ("ggmoe_ple", "moe_ple"),
               ("grkan_moe", "moe"), ("grkan_moe_ple", "moe_ple"), ("mlp_ple", "mlp"))
"""The pairs (model, baseline) that :func:`count_wins` compares."""


def count_wins(summary: Sequence[Mapping], pairs: Sequence[tuple[str, str]] = COMPARISONS) -> list[dict]:
    """Per pair (a, b) whose both models ran: on how many data sets a's mean metric is at least
    b's (accuracy; at most for RMSE), on how many the gap exceeds the larger seed sd of the two
    (either way), and the data sets; and where the trees (``hgb``) beat every network's mean."""
    by = {(s["dataset"], s["model"]): s for s in summary}
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    out = []
    for a, b in pairs:
        common = [d for d in datasets if (d, a) in by and (d, b) in by]
        if not common:
            continue
        ge, clear_win, clear_loss = [], [], []
        for d in common:
            sa, sb = by[d, a], by[d, b]
            sign = 1.0 if sa["metric_name"] == "accuracy" else -1.0
            gap = sign * (sa["mean"] - sb["mean"])
            if gap >= 0:
                ge.append(d)
            if abs(gap) > max(sa["sd"], sb["sd"]):
                (clear_win if gap > 0 else clear_loss).append(d)
        out.append({"comparison": f"{a} >= {b}", "datasets": len(common), "at_least": len(ge),
                    "clear_wins": len(clear_win), "clear_losses": len(clear_loss), "where": " ".join(ge),
                    "clear_win_where": " ".join(clear_win), "clear_loss_where": " ".join(clear_loss)})
    trees = [d for d in datasets if (d, "hgb") in by]
    nets = {d: [s for s in summary if s["dataset"] == d and s["model"] != "hgb"] for d in trees}
    wins = []
    for d in trees:
        if not nets[d]:
            continue
        t = by[d, "hgb"]
        sign = 1.0 if t["metric_name"] == "accuracy" else -1.0
        if all(sign * (t["mean"] - s["mean"]) > 0 for s in nets[d]):
            wins.append(d)
    if any(nets.values()):
        out.append({"comparison": "hgb > every network", "datasets": sum(bool(v) for v in nets.values()),
                    "at_least": len(wins), "clear_wins": math.nan, "clear_losses": math.nan, "where": " ".join(wins),
                    "clear_win_where": "", "clear_loss_where": ""})
    return out


def markdown_table(summary: Sequence[Mapping]) -> str:
    """Data sets as rows, models as columns: ``mean ± sd`` of the metric over seeds."""
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    models = list(dict.fromkeys(s["model"] for s in summary))
    by = {(s["dataset"], s["model"]): s for s in summary}
    lines = ["| data set (metric) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for d in datasets:
        name = next(s["metric_name"] for s in summary if s["dataset"] == d)
        cells = []
        for m in models:
            s = by.get((d, m))
            cells.append("" if s is None else f"{s['mean']:.4f} ± {s['sd']:.4f}")
        lines.append(f"| {d} ({name}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Sequence[Mapping], rows: Sequence[Mapping], path: Path, title: str = "") -> None:
    """One panel per data set: a bar per model (the mean, ± sd), each seed as a dot."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    cols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, d in zip(axes.flat, datasets):
        items = [s for s in summary if s["dataset"] == d]
        for i, s in enumerate(items):
            ax.bar(i, s["mean"], 0.7, yerr=s["sd"], capsize=2, color="tab:green" if s["model"] == "hgb" else
                   "tab:orange" if s["model"].startswith("ggmoe") else "tab:blue")
            vals = [float(r["metric"]) for r in rows if r["dataset"] == d and r["model"] == s["model"]]
            ax.plot([i] * len(vals), vals, "k.", ms=3, zorder=3)
        lo = min(min(s["mean"] - s["sd"] for s in items), min(float(r["metric"]) for r in rows if r["dataset"] == d))
        hi = max(max(s["mean"] + s["sd"] for s in items), max(float(r["metric"]) for r in rows if r["dataset"] == d))
        pad = 0.1 * (hi - lo) or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(items)), [s["model"] for s in items], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{d} ({items[0]['metric_name']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    save_figure(fig, path, title)


# --------------------------------------------------------------------------------------------
# the command


def check_config(cfg: Mapping) -> None:
    """ConfigError for an unknown or repeated data set or model."""
    problems = []
    for key, allowed in (("datasets", DATASETS), ("models", MODELS)):
        items = cfg[key]
        bad = [x for x in items if x not in allowed]
        if not items:
            problems.append(f"{key} must name at least one of {list(allowed)}")
        if bad:
            problems.append(f"unknown {key} {bad}; choose from {list(allowed)}")
        if len(set(map(str, items))) < len(items):
            problems.append(f"{key} lists a name twice: {items}")
    if problems:
        raise ConfigError("; ".join(problems))


def run(cfg: dict) -> dict:
    """Every data set x model x seed of ``cfg``; writes the run directory and returns the result."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    check_config(cfg)
    torch.set_num_threads(cfg["threads"])
    t_all = time.perf_counter()
    run_dir = new_run_dir(cfg["out"], cfg["name"] or "tabular")
    write_text(run_dir / "config.yaml", dump_config(cfg, TABULAR_KEYS))
    seeds = range(cfg["seed"], cfg["seed"] + cfg["seeds"])
    rows = []
    bar = tqdm(total=len(cfg["datasets"]) * len(cfg["models"]) * len(seeds), disable=not cfg["progress"],
               desc="tabular", unit="run")
    with threadpool_limits(cfg["threads"]):
        for ds in cfg["datasets"]:
            for seed in seeds:
                table = load_table(ds, seed, cfg["fashion_rows"], cfg["data"])
                for model in cfg["models"]:
                    bar.set_postfix_str(f"{ds} {model} seed {seed}")
                    t0 = time.perf_counter()
                    res = train_trees(table, seed) if model == "hgb" else train_network(model, table, cfg, seed)
                    rows.append({"dataset": ds, "model": model,
                                 "embedding": "ple" if model.endswith("_ple") else "none", "seed": seed,
                                 "metric_name": table.metric, "metric": res["metric"], "params": res["params"],
                                 "epochs": res["best_epoch"], "epochs_run": res["epochs_run"],
                                 "seconds": time.perf_counter() - t0, "rows_train": len(table.y_train),
                                 "features": table.x_train.shape[1]})
                    write_metrics(rows, run_dir / "runs.csv")  # so far: an interrupted run keeps its rows
                    bar.update()
    bar.close()
    order = {m: i for i, m in enumerate(cfg["models"])}
    rows.sort(key=lambda r: (cfg["datasets"].index(r["dataset"]), order[r["model"]], r["seed"]))
    summary = summarize(rows)
    counts = count_wins(summary)
    write_metrics(rows, run_dir / "runs.csv")
    write_metrics(summary, run_dir / "summary.csv")
    if counts:
        write_metrics(counts, run_dir / "counts.csv")
    plot(summary, rows, run_dir / "tabular.png",
         f"tabular: test accuracy / RMSE, mean ± sd over {cfg['seeds']} seed(s)")
    result = {"datasets": cfg["datasets"], "models": cfg["models"], "seeds": list(seeds), "counts": counts,
              "seconds": time.perf_counter() - t_all, "run_dir": str(run_dir)}
    write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    if cfg["copy_to"]:
        dest = Path(cfg["copy_to"])
        dest.mkdir(parents=True, exist_ok=True)
        for src, name in (("runs.csv", "tabular.csv"), ("summary.csv", "tabular-summary.csv"),
                          ("tabular.png", "tabular.png")):
            shutil.copyfile(run_dir / src, dest / name)
    result["table"] = markdown_table(summary)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``; every key of :data:`TABULAR_KEYS` as ``--key value``)."""
    return command_parser(
        "python -m gatezoo.train.tabular",
        "An MLP, a softmax-gated MoE, GG MoE (Gumbel-softmax gate) and a GRKAN-gated MoE, with and without a "
        "piecewise-linear feature embedding, against gradient-boosted trees on bundled and synthetic tables.",
        TABULAR_KEYS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parse_command(parser, argv, TABULAR_KEYS)
        check_config(cfg)
        result = run(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    for c in result["counts"]:
        print(f"{c['comparison']}: {c['at_least']} of {c['datasets']} data sets ({c['where'] or 'none'})")
    print(f"-- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
