"""Self-Tuning Networks on image classifiers, and the hyperparameter searches to compare them with.

    python -m gatezoo.train.selftune --config configs/selftune.yaml                  # STN
    python -m gatezoo.train.selftune --config configs/selftune.yaml --search tpe     # Optuna TPE
    python -m gatezoo.train.selftune --config configs/selftune.yaml --search random  # Optuna random search
    python -m gatezoo.train.selftune --config configs/selftune.yaml --search none    # the untuned default

MacKay et al. 2019, "Self-Tuning Networks: Bilevel Optimization of Hyperparameters using
Structured Best-Response Functions" (ICLR). The training split is cut into a training and a
validation part (``valid_images``, seeded); the test split is only scored.

Tuned hyperparameters (``tune``, each with a ``ranges`` entry and a ``start`` value):

- ``dropout``: one rate per dropout site, a :class:`~gatezoo.blocks.RateDropout` after each of the
  model's ``blocks`` (per example; range within [0, 1));
- ``cutout``: the side in pixels of a square zeroed at a random place of each training image (a
  data-augmentation strength; discrete: the value is floored; per example);
- ``weight_decay``: the coefficient of ``0.5 * wd * sum ||W||^2`` over the weight matrices and
  kernels (log-scaled range; one value per batch).

Each hyperparameter lives in an unconstrained space ``h``: ``lo + (hi - lo) * sigmoid(h)``, or
its exponential on a log scale.

``search: stn`` (the paper). Every Linear and Conv2d of the model becomes hyper-gated
(:func:`~gatezoo.blocks.hyper_gate`); then ``train_steps`` steps on training batches and
``valid_steps`` on validation batches alternate (2 : 1 by default):

- a **training step** updates the weights (Adam, ``lr``) with the hyperparameters perturbed per
  example, ``h + softplus(sigma) * N(0, 1)``, applied as dropout rates, cutout sizes and weight
  decay, and fed to the gates;
- a **validation step** updates ``h`` and the perturbation scale ``sigma`` (Adam, ``hyper_lr``)
  on the validation cross-entropy in eval mode (no dropout, no cutout, no decay: the
  hyperparameters act only through the gates, the approximate best response), minus
  ``entropy_weight`` times the entropy of the perturbation, which keeps its scale alive.

The first ``warmup_epochs`` train the weights only, with perturbed hyperparameters.

``search: none`` trains the plain model once at the ``start`` values. ``tpe`` and ``random`` run
``trials`` Optuna trials of it, each with sampled values, and select by validation loss. Each
trial trains ``epochs`` epochs, so a search costs ``trials`` times the budget of one run.

Every run writes ``<out>/<name or model-search>-<timestamp>/`` with ``config.yaml``,
``metrics.csv`` (per epoch: train, validation and test loss and accuracy, and the current
hyperparameters), ``result.json`` (final test cross-entropy and accuracy, validation loss,
hyperparameters, wall-clock seconds) and ``last.safetensors``. STN adds ``schedule.csv`` (the
hyperparameters after every validation step) and ``schedule.png``; a search adds ``trials.csv``.
These runs cannot be resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks import HyperConv2d, HyperLinear, RateDropout, hyper_gate, set_hyperparameters
from gatezoo.eval.plots import pyplot, save_figure

from .classify import data_model_args, data_spec, evaluate_model
from .core.checkpoint import save_checkpoint, write_text
from .core.config import KEYS, ConfigError, Key, command_parser, dump_config, parse_command
from .core.factory import build_model, count_params
from .core.loop import write_metrics
from .core.runs import model_error, new_run_dir, resolve_device
from .data.images import Batches, DataFormatError, DataNotFoundError, derive_seed, holdout_split, load_dataset

SEARCHES = ("stn", "tpe", "random", "none")
"""What the command does (``search``)."""
HYPERPARAMETERS = ("dropout", "cutout", "weight_decay")
"""The hyperparameters the command can tune (``tune``)."""
LOG_SCALED = ("weight_decay",)
DISCRETE = ("cutout",)

_SHARED = ("model_args", "data", "epochs", "batch_size", "eval_batch_size", "lr", "seed", "out", "name", "device",
           "threads", "progress", "max_steps")
SELFTUNE_KEYS: dict[str, Key] = {
    "model": Key("cnn_small", "str", "model name (a gatezoo registry name with a 'blocks' stack, optionally "
                 "NAME:key=value,...)"),
    **{k: KEYS[k] for k in _SHARED},
    "search": Key("stn", "str", "stn (self-tuning network), tpe or random (Optuna search), none (the start values)",
                  choices=SEARCHES),
    "tune": Key(list(HYPERPARAMETERS), "list", f"the hyperparameters to tune, of {list(HYPERPARAMETERS)}"),
    "ranges": Key({"dropout": [0.0, 0.8], "cutout": [0.0, 14.0], "weight_decay": [1e-6, 1e-2]}, "dict",
                  "name -> [low, high] of every tuned hyperparameter (weight_decay: log scale)"),
    "start": Key({"dropout": 0.05, "cutout": 4.0, "weight_decay": 1e-4}, "dict",
                 "name -> start value (stn) and the untuned default (none)"),
    "valid_images": Key(10000, "int", "training images held out for validation (seeded)", minimum=1),
    "train_images": Key(None, "int", "train on a seeded subset of N of the images left after the validation "
                        "hold-out (null: all of them)", optional=True, minimum=1),
    "hyper_lr": Key(3e-3, "float", "stn: Adam learning rate of the hyperparameters and scales", minimum=0.0),
    "train_steps": Key(2, "int", "stn: weight steps per cycle", minimum=1),
    "valid_steps": Key(1, "int", "stn: hyperparameter steps per cycle", minimum=1),
    "entropy_weight": Key(1e-3, "float", "stn: weight of the perturbation entropy", minimum=0.0),
    "perturb_scale": Key(0.5, "float", "stn: initial perturbation scale softplus(sigma)", minimum=0.0),
    "warmup_epochs": Key(0.2, "float", "stn: epochs of weight steps only, before tuning", minimum=0.0),
    "gate": Key("linear", "str", "stn: hyper gate form, linear (the authors') or sigmoid", choices=("linear",
                                                                                                    "sigmoid")),
    "gate_layers": Key(".*", "str", "stn: a regular expression; the Linear / Conv2d layers whose full names match "
                       "it are hyper-gated"),
    "trials": Key(8, "int", "tpe / random: Optuna trials", minimum=1),
    "tpe_startup": Key(10, "int", "tpe: random trials before TPE models the results (Optuna's n_startup_trials; "
                       "with trials <= this, TPE is random search)", minimum=1),
}


class Space:
    """The tuned hyperparameters: names (dropout expanded per site), ranges, scales, and the maps
    between the unconstrained ``h`` and the values."""

    def __init__(self, cfg: Mapping, sites: int):
        problems = []
        tune = list(cfg["tune"])
        unknown = [t for t in tune if t not in HYPERPARAMETERS]
        if unknown:
            problems.append(f"tune: unknown hyperparameter(s) {unknown}; choose from {list(HYPERPARAMETERS)}")
        if not tune:
            problems.append("tune: give at least one hyperparameter")
        for t in tune:
            if t in HYPERPARAMETERS and t not in cfg["ranges"]:
                problems.append(f"ranges: the tuned hyperparameter {t!r} has no range; add ranges.{t}: [low, high]")
            if t in HYPERPARAMETERS and t not in cfg["start"]:
                problems.append(f"start: the tuned hyperparameter {t!r} has no start value")
        if problems:
            raise ConfigError("; ".join(problems))
        self.names, self.kinds, self.lo, self.hi = [], [], [], []
        for t in tune:
            r = cfg["ranges"][t]
            if not isinstance(r, (list, tuple)) or len(r) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r):
                raise ConfigError(f"ranges.{t} must be [low, high] (two finite numbers), got {r!r}")
            lo, hi = float(r[0]), float(r[1])
            if not lo < hi or (t in LOG_SCALED and lo <= 0) or (t == "dropout" and (lo < 0 or hi >= 1)) or (
                    t == "cutout" and lo < 0):
                raise ConfigError(f"ranges.{t} = {r!r} is not a valid range (low < high; dropout within [0, 1), "
                                  f"cutout >= 0, weight_decay > 0)")
            start = cfg["start"][t]
            if not isinstance(start, (int, float)) or isinstance(start, bool) or not lo <= start <= hi:
                raise ConfigError(f"start.{t} = {start!r} must be a number within ranges.{t} = {r!r}")
            for i in range(sites if t == "dropout" else 1):
                self.names.append(f"dropout{i}" if t == "dropout" else t)
                self.kinds.append(t)
                self.lo.append(lo)
                self.hi.append(hi)
        self.start = [float(cfg["start"][k]) for k in self.kinds]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """The hyperparameter values of unconstrained ``h`` (..., H); discrete ones floored."""
        cols = []
        for i, kind in enumerate(self.kinds):
            s = torch.sigmoid(h[..., i])
            if kind in LOG_SCALED:
                v = torch.exp(math.log(self.lo[i]) + (math.log(self.hi[i]) - math.log(self.lo[i])) * s)
            else:
                v = self.lo[i] + (self.hi[i] - self.lo[i]) * s
            cols.append(torch.floor(v + 1e-4) if kind in DISCRETE else v)  # an integer start stays itself
        return torch.stack(cols, dim=-1)

    def unconstrained(self, values) -> torch.Tensor:
        """``h`` of the given values (the inverse of :meth:`values` before flooring)."""
        out = []
        for i, (kind, v) in enumerate(zip(self.kinds, values)):
            if kind in LOG_SCALED:
                s = (math.log(v) - math.log(self.lo[i])) / (math.log(self.hi[i]) - math.log(self.lo[i]))
            else:
                s = (v - self.lo[i]) / (self.hi[i] - self.lo[i])
            s = min(max(s, 1e-4), 1 - 1e-4)
            out.append(math.log(s) - math.log1p(-s))
        return torch.tensor(out, dtype=torch.float32)


def add_dropout_sites(model: nn.Module) -> int:
    """Put a :class:`~gatezoo.blocks.RateDropout` after each of ``model.blocks`` (site i reads
    column i); returns the number of sites. Raises ConfigError for a model without ``blocks``."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ConfigError(f"{type(model).__name__} has no 'blocks' stack to put the tuned dropout after")
    for i in range(len(blocks)):
        blocks[i] = nn.Sequential(blocks[i], RateDropout(i))
    return len(blocks)


def cutout(images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image with a ``sizes[b]``-pixel square zeroed at a uniformly drawn centre (clipped at
    the border; DeVries and Taylor 2017). ``sizes`` (B,), floored to integers."""
    b, _, h, w = images.shape
    cy = torch.randint(0, h, (b,), generator=generator).to(images.device)
    cx = torch.randint(0, w, (b,), generator=generator).to(images.device)
    size = sizes.detach().floor().to(images.device)
    top, left = cy - torch.div(size, 2, rounding_mode="floor"), cx - torch.div(size, 2, rounding_mode="floor")
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    rows = (ys >= top[:, None, None]) & (ys < (top + size)[:, None, None])
    cols = (xs >= left[:, None, None]) & (xs < (left + size)[:, None, None])
    inside = rows & cols
    return images * (~inside).unsqueeze(1).to(images.dtype)


def decay_penalty(model: nn.Module) -> torch.Tensor:
    """``0.5 * sum ||W||^2`` over the weight matrices and kernels (not biases, norms, gates' scalars)."""
    total = None
    for name, p in model.named_parameters():
        if p.dim() > 1 and "gate_proj" not in name:
            term = p.pow(2).sum()
            total = term if total is None else total + term
    return 0.5 * total


class _Data:
    def __init__(self, cfg: Mapping, device: torch.device):
        dataset = load_dataset(cfg["data"])
        n = len(dataset.train_labels)
        if not 0 < cfg["valid_images"] < n:
            raise ConfigError(f"valid_images must be in [1, {n - 1}] (the training split has {n} images), got "
                              f"{cfg['valid_images']}")
        train_idx, valid_idx = holdout_split(n, cfg["valid_images"] / n, seed=cfg["seed"])
        if cfg["train_images"] is not None and cfg["train_images"] < len(train_idx):
            keep = np.random.default_rng(derive_seed(cfg["seed"], 0x7A11)).permutation(len(train_idx))
            train_idx = np.sort(train_idx[keep[:cfg["train_images"]]])
        mean, std = dataset.mean_std()
        self.dataset, self.mean, self.std = dataset, mean, std
        common = dict(mean=mean, std=std, device=device)
        self.train = Batches(dataset.train_images[train_idx], dataset.train_labels[train_idx], cfg["batch_size"],
                             shuffle=True, seed=cfg["seed"], **common)
        self.valid_stream = Batches(dataset.train_images[valid_idx], dataset.train_labels[valid_idx],
                                    cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 1, **common)
        self.valid = Batches(dataset.train_images[valid_idx], dataset.train_labels[valid_idx],
                             cfg["eval_batch_size"], **common)
        self.test = Batches(dataset.test_images, dataset.test_labels, cfg["eval_batch_size"], **common)
        # cutout works in pixel space: zero pixels are (0 - mean) / std after normalisation
        self.zero = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)


def _augment(data: _Data, x: torch.Tensor, sizes: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    if sizes is None:
        return x
    masked = cutout(torch.ones_like(x[:, :1]), sizes, g)
    return x * masked + data.zero * (1 - masked)


def _build(cfg: Mapping, data: _Data, device: torch.device) -> tuple[nn.Module, dict]:
    model_args = data_model_args(data.dataset, cfg["model_args"])
    torch.manual_seed(cfg["seed"])
    try:
        model = build_model(cfg["model"], **model_args)
    except ValueError as e:
        raise model_error(cfg["model"], model_args, e) from e
    return model.to(device), model_args


class _Trainer:
    """One training run at fixed or self-tuned hyperparameters."""

    def __init__(self, cfg: Mapping, data: _Data, device: torch.device, stn: bool):
        self.cfg, self.data, self.stn = cfg, data, stn
        self.model, self.model_args = _build(cfg, data, device)
        sites = add_dropout_sites(self.model) if "dropout" in cfg["tune"] else 0
        self.space = Space(cfg, sites)
        if stn:
            pattern = re.compile(cfg["gate_layers"])
            try:
                hyper_gate(self.model, len(self.space), gate=cfg["gate"],
                           select=lambda name, module: pattern.fullmatch(name) is not None)
            except ValueError as e:
                raise ConfigError(f"{cfg['model']} has no layer to hyper-gate: no nn.Linear or nn.Conv2d whose name "
                                  f"matches gate_layers {cfg['gate_layers']!r}") from e
            self._probe(device)
        self.model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.h = nn.Parameter(self.space.unconstrained(self.space.start).to(device))
        scale = cfg["perturb_scale"]
        sigma = math.log(math.expm1(scale)) if scale > 0 else -30.0  # softplus^-1
        self.sigma = nn.Parameter(torch.full((len(self.space),), sigma, device=device))
        self.hyper_opt = torch.optim.Adam([self.h, self.sigma], lr=cfg["hyper_lr"])
        self.device = device
        self.schedule: list[dict] = []

    def _probe(self, device: torch.device) -> None:
        """Run one batch and refuse gated layers that never ran as modules (a parent that reads
        their ``weight`` directly, such as a fused token-mixing op, would bypass the gate)."""
        ran = set()
        gated = [(n, m) for n, m in self.model.named_modules() if isinstance(m, (HyperLinear, HyperConv2d))]
        handles = [m.register_forward_hook(lambda mod, *_: ran.add(id(mod))) for _, m in gated]
        x, _ = next(iter(self.data.valid))
        set_hyperparameters(self.model, torch.zeros(len(self.space), device=device))
        try:
            with torch.no_grad():
                self.model.to(device).eval()(x[:2])
        finally:
            for h in handles:
                h.remove()
            self.model.train()
        idle = [n for n, m in gated if id(m) not in ran]
        if idle:
            raise ConfigError(f"{self.cfg['model']}: the hyper-gated layers {idle} never run as modules (their parent "
                              f"uses their weights directly, which would bypass the gate); leave them out with "
                              f"gate_layers")

    def current(self) -> dict:
        values = self.space.values(self.h.detach()).tolist()
        return dict(zip(self.space.names, values))

    def _hyper_inputs(self, b: int, g: torch.Generator, perturb: bool):
        h = self.h.unsqueeze(0).expand(b, -1)
        if perturb:
            eps = torch.randn(b, len(self.space), generator=g).to(self.device)
            h = h + F.softplus(self.sigma) * eps
        for i in self.space.index("weight_decay"):  # one value per batch
            h = torch.cat([h[:, :i], h[:1, i:i + 1].expand(b, 1), h[:, i + 1:]], dim=1)
        return h, self.space.values(h)

    def train_step(self, x, y, step: int) -> tuple[float, int]:
        g = torch.Generator().manual_seed(derive_seed(self.cfg["seed"], step, 0x57))
        h, values = self._hyper_inputs(len(y), g, perturb=self.stn)
        h, values = h.detach(), values.detach()
        cut = self.space.index("cutout")
        x = _augment(self.data, x, values[:, cut[0]] if cut else None, g)
        set_hyperparameters(self.model, h if self.stn else None, values)
        self.model.train()
        logits = self.model(x).float()
        loss = F.cross_entropy(logits, y)
        total = loss
        wd = self.space.index("weight_decay")
        if wd:
            total = total + values[0, wd[0]] * decay_penalty(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(-1) == y).sum())

    def valid_step(self, x, y, step: int) -> None:
        g = torch.Generator().manual_seed(derive_seed(self.cfg["seed"], step, 0x5A))
        h, values = self._hyper_inputs(len(y), g, perturb=True)
        set_hyperparameters(self.model, h, values.detach())
        self.model.eval()
        loss = F.cross_entropy(self.model(x).float(), y)
        entropy = torch.log(F.softplus(self.sigma) * math.sqrt(2 * math.pi * math.e)).sum()
        self.hyper_opt.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        (loss - self.cfg["entropy_weight"] * entropy).backward()
        self.hyper_opt.step()
        self.model.train()

    def evaluate(self) -> dict:
        values = self.space.values(self.h.detach())
        set_hyperparameters(self.model, self.h.detach() if self.stn else None, values)
        classes = self.data.dataset.num_classes
        valid = evaluate_model(self.model, self.data.valid, classes)
        test = evaluate_model(self.model, self.data.test, classes)
        return {"valid_loss": valid["loss"], "valid_acc": valid["acc"], "test_loss": test["loss"],
                "test_acc": test["acc"]}

    def fit(self, progress_desc: str | None = None, on_epoch=None) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        per_epoch = len(self.data.train)
        total = cfg["epochs"] * per_epoch
        if cfg["max_steps"] is not None:
            total = min(total, cfg["max_steps"])
        warmup = round(cfg["warmup_epochs"] * per_epoch)
        bar = tqdm(total=total, disable=not cfg["progress"], unit="step", desc=progress_desc, dynamic_ncols=True)
        valid_iter = self._valid_batches()
        rows, step, cycle_pos, loss_sum, correct, seen = [], 0, 0, 0.0, 0, 0
        start = time.perf_counter()
        for epoch in range(cfg["epochs"]):
            for x, y in self.data.train.epoch(epoch):
                loss, ok = self.train_step(x, y, step)
                step += 1
                loss_sum, correct, seen = loss_sum + loss * len(y), correct + ok, seen + len(y)
                bar.update(1)
                if self.stn and step > warmup:
                    cycle_pos += 1
                    if cycle_pos == cfg["train_steps"]:
                        for _ in range(cfg["valid_steps"]):
                            xv, yv = next(valid_iter)
                            self.valid_step(xv, yv, step)
                            self.schedule.append({"step": step, "epoch": step / per_epoch, **self.current(),
                                                  **{f"{n}_scale": float(v) for n, v in zip(
                                                      self.space.names, F.softplus(self.sigma.detach()))}})
                        cycle_pos = 0
                if step >= total:
                    break
            row = {"epoch": step / per_epoch, "step": step, "train_loss": loss_sum / max(seen, 1),
                   "train_acc": correct / max(seen, 1), **self.evaluate(), **self.current(),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            if on_epoch is not None:
                on_epoch(rows)
            bar.write(f"epoch {row['epoch']:.2f}: valid {row['valid_loss']:.4f}, test {row['test_loss']:.4f} "
                      f"({row['test_acc']:.4f})")
            loss_sum, correct, seen = 0.0, 0, 0
            if step >= total:
                break
        bar.close()
        return rows

    def _valid_batches(self):
        epoch = 0
        while True:
            yield from self.data.valid_stream.epoch(epoch)
            epoch += 1


def _plot_schedule(schedule: list[dict], names: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([r["epoch"] for r in schedule], [r[name] for r in schedule])
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if name == "weight_decay":
            ax.set_yscale("log")
    save_figure(fig, path, title)


def run(cfg: dict) -> dict:
    """Run the search ``cfg`` describes; returns ``result.json``'s dict plus ``run_dir``."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    data = _Data(cfg, device)
    cfg = {**cfg, "data": data_spec(cfg["data"])}
    if cfg["search"] in ("tpe", "random"):
        try:
            import optuna  # noqa: F401
        except ImportError as e:
            raise ConfigError("search: tpe / random needs optuna (pip install 'gatezoo[selftune]'; make install "
                              "has it)") from e
    # a trainer first: it checks the model, the hyperparameters and their ranges before any run directory
    first = _Trainer(cfg, data, device, stn=cfg["search"] == "stn")
    run_dir = new_run_dir(cfg["out"], cfg["name"] or f"{cfg['model']}-{cfg['search']}")
    write_text(run_dir / "config.yaml", dump_config({**cfg, "model_args": first.model_args}, SELFTUNE_KEYS))
    print(f"{data.dataset.summary()}; {len(data.train.labels)} train / {len(data.valid.labels)} validation images")
    print(f"{cfg['model']} ({cfg['search']}): {count_params(first.model):,} parameters, tuning "
          f"{', '.join(first.space.names)}; run directory {run_dir}")
    start = time.perf_counter()
    if cfg["search"] in ("stn", "none"):
        trainer = first
        rows = trainer.fit(cfg["search"], lambda r: write_metrics(r, run_dir / "metrics.csv"))
        result = {"search": cfg["search"], **{k: rows[-1][k] for k in ("valid_loss", "valid_acc", "test_loss",
                                                                         "test_acc")},
                  "hyperparameters": trainer.current()}
        if trainer.schedule:
            write_metrics(trainer.schedule, run_dir / "schedule.csv")
            _plot_schedule(trainer.schedule, trainer.space.names, run_dir / "schedule.png",
                           f"{cfg['model']} self-tuned hyperparameters")
    else:
        trainer, result = _search(cfg, data, device, first, run_dir)
    result.update(model=cfg["model"], seed=cfg["seed"], seconds=time.perf_counter() - start,
                  params=count_params(trainer.model))
    save_checkpoint(trainer.model, run_dir / "last.safetensors",
                    {"model": cfg["model"], "model_args": trainer.model_args, "selftune": result})
    write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return {**result, "run_dir": str(run_dir)}


def _search(cfg: dict, data: _Data, device: torch.device, first: _Trainer, run_dir: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = first.space
    sampler = (optuna.samplers.TPESampler(seed=cfg["seed"], n_startup_trials=cfg["tpe_startup"])
               if cfg["search"] == "tpe"
               else optuna.samplers.RandomSampler(seed=cfg["seed"]))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    trials, best = [], {}

    def objective(trial):
        values = []
        for name, kind, lo, hi in zip(space.names, space.kinds, space.lo, space.hi):
            if kind == "cutout":
                values.append(float(trial.suggest_int(name, math.ceil(lo), math.floor(hi))))
            else:
                values.append(trial.suggest_float(name, lo, hi, log=kind in LOG_SCALED))
        trainer = _Trainer(cfg, data, device, stn=False)
        with torch.no_grad():
            trainer.h.copy_(space.unconstrained(values))
        rows = trainer.fit(f"trial {trial.number + 1}/{cfg['trials']}")
        last = rows[-1]
        trials.append({"trial": trial.number, **dict(zip(space.names, values)),
                       **{k: last[k] for k in ("valid_loss", "valid_acc", "test_loss", "test_acc")}})
        write_metrics(trials, run_dir / "trials.csv")
        if not best or last["valid_loss"] < best["row"]["valid_loss"]:
            best.update(row=last, trainer=trainer, rows=rows)
        return last["valid_loss"]

    study.optimize(objective, n_trials=cfg["trials"])
    write_metrics(best["rows"], run_dir / "metrics.csv")
    row = best["row"]
    result = {"search": cfg["search"], "trials": cfg["trials"],
              **{k: row[k] for k in ("valid_loss", "valid_acc", "test_loss", "test_acc")},
              "hyperparameters": {n: row[n] for n in space.names}}
    return best["trainer"], result


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``; every key of :data:`SELFTUNE_KEYS` as ``--key value``)."""
    return command_parser(
        "python -m gatezoo.train.selftune",
        "Self-Tuning Networks (hyper-gated layers, alternating weight and hyperparameter steps) on an "
        "image classifier, or an Optuna search (TPE, random) of the same hyperparameters, or the untuned default.",
        SELFTUNE_KEYS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parse_command(parser, argv, SELFTUNE_KEYS)
        result = run(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test cross-entropy {result['test_loss']:.4f} (accuracy {result['test_acc']:.4f}), validation "
          f"{result['valid_loss']:.4f}, {result['seconds']:.0f} s -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
