"""Parameter-efficient fine-tuning: AdaMoLE against LoRA (peft), a top-k mixture of LoRAs, full
fine-tuning and a linear probe, on a pretrained ViT moved to a shifted image task.

    python -m gatezoo.train.adapters                                   # the experiment (docs/adapters.md)
    python -m gatezoo.train.adapters --pretrained runs/adapters-...    # reuse that run's pretrained model
    python -m gatezoo.train.adapters --bench benchmarks/adapters       # also write the benchmark CSV / PNG

Liu and Luo 2024, "AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture of Low-Rank
Adaptation Experts"; LoRA: Hu et al. 2022. The claim: a mixture of LoRA experts whose experts are
switched on by an adaptive threshold fine-tunes better than one LoRA and than a fixed top-k
mixture at a similar number of trainable parameters.

**Setting** (fixed before any result was seen; docs/adapters.md says why):

- *pretraining*: ``model`` (default ``vit_tiny``) trained from scratch on the training images of
  ``pretrain_classes`` (default Fashion-MNIST 0-4: T-shirt, trouser, pullover, dress, coat),
  upright, ``pretrain_epochs`` epochs (AdamW, warm-up and cosine; label smoothing 0.1). The model
  is saved as ``<run>/pretrain/last.safetensors``; ``pretrained`` reuses one.
- *the shifted task*: the classes held out of pretraining (``finetune_classes``, default 5-9:
  sandal, shirt, sneaker, bag, ankle boot), every image rotated by ``rotate`` degrees (default 90)
  and, with ``invert``, contrast-inverted; ``train_images`` training images (a seeded subset of
  that split, the same for every method and seed), ``valid_images`` more for the per-epoch
  validation curve, and the whole test split of those classes, scored once at the end. Images are
  normalised with the pretraining statistics, as a pretrained model's users would.

**Methods** (``methods``), each starting from the same pretrained weights with a fresh
``len(finetune_classes)``-way head (the same initial head for every method at a seed), the head
trainable in all:

- ``head``: the linear probe (only the head trains);
- ``full``: every parameter trains (learning rate ``full_lr``);
- ``lora``: peft's LoRA (``peft.inject_adapter_in_model``) of rank ``lora_rank`` on the targets;
- ``mole_topk``: :class:`~gatezoo.blocks.MoLELinear` with ``num_experts`` experts of rank
  ``expert_rank`` and a top-``top_k`` softmax router;
- ``adamole``: the same experts with AdaMoLE's adaptive-threshold router and the authors'
  auxiliary loss (coefficient ``adamole_aux_coef``).

The targets (``targets``) are the ``nn.Linear`` layers whose last name is one of the list (the
ViT's attention ``q``, ``kv``, ``proj`` and MLP ``fc1``, ``fc2``; never the head): the very same
layers for peft and gatezoo. Every adapter scales its update by ``scaling`` (LoRA's
``alpha / rank``), so the methods differ only in their structure. The base weights of the
adapter methods are frozen (norms, embeddings and patch projection included). The adapter
methods share ``lr``; LoRA's rank defaults to 10 so that AdaMoLE (4 experts of rank 2 plus its
routers) has at most 1.1 times LoRA's trainable parameters; the command reports the counts.

All methods of a seed train together on identical batches (``epochs`` epochs of ``batch_size``,
AdamW, warm-up then cosine), one seed after the other (``seeds``).

**Output**: ``<out>/<name or adapters>-<timestamp>/`` with ``config.yaml``, ``pretrain/`` (the
pretraining run: ``metrics.csv``, ``curves.png``, ``last.safetensors``), ``metrics.csv`` (per
seed, method and epoch: train loss / accuracy, validation loss / accuracy, the MoE columns),
``results.csv`` (per seed and method: trainable parameters, their ratio to LoRA's, test accuracy
and loss, training throughput; for the two mixtures the mean number of active experts per token
and the share of tokens with none, from a training-mode pass over the validation images), ``summary.csv``
(per method: mean ± sd over seeds, and the paired difference to LoRA), ``result.json`` (the
summary and the goal check) and ``adapters.png``. With ``bench`` the results, summary and figure
are also written to ``<bench>.csv``, ``<bench>-summary.csv`` and ``<bench>.png``.

peft (the ``adapters`` extra) is imported only when LoRA runs, and this is the one module that
imports it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gatezoo.blocks import MoLELinear
from gatezoo.blocks.moe import moe_stats, reset_moe_stats
from gatezoo.eval.plots import pyplot, save_figure

from .classify import ImageClassification, data_model_args, data_spec, evaluate_model
from .core.checkpoint import load_weights, read_checkpoint_metadata, write_text
from .core.config import KEYS, ConfigError, Key, command_parser, dump_config, parse_command, raise_all
from .core.factory import build_model, count_params
from .core.loop import Trainee, fit, steps_per_epoch
from .core.optim import build_optimizer, build_scheduler
from .core.runs import model_error, new_run_dir, resolve_device
from .data.images import Batches, DataFormatError, DataNotFoundError, Dataset, derive_seed, load_dataset

METHODS = ("head", "full", "lora", "mole_topk", "adamole")
"""The fine-tuning methods (``methods``)."""
ADAPTER_METHODS = ("lora", "mole_topk", "adamole")
ROTATIONS = (0, 90, 180, 270)
CURVES = (("cross-entropy", ("train_loss", "valid_loss")), ("accuracy", ("train_acc", "valid_acc")))

ADAPTER_KEYS: dict[str, Key] = {
    "model": Key("vit_tiny", "str", "the pretrained model: a gatezoo registry name with a linear 'head'"),
    "model_args": KEYS["model_args"],
    "data": KEYS["data"],
    "pretrain_classes": Key([0, 1, 2, 3, 4], "list", "the classes of the pretraining task"),
    "finetune_classes": Key([5, 6, 7, 8, 9], "list", "the classes of the shifted task (held out of pretraining)"),
    "rotate": Key(90, "int", "the shifted task's images are rotated by this many degrees (0, 90, 180, 270)"),
    "invert": Key(False, "bool", "the shifted task's images are also contrast-inverted (255 - pixel)"),
    "pretrained": Key(None, "str", "reuse a pretrained model: a run directory of this command (its "
                      "pretrain/last.safetensors) or a .safetensors checkpoint (null: pretrain)", optional=True),
    "pretrain_epochs": Key(2, "int", "pretraining epochs", minimum=1),
    "pretrain_lr": Key(1e-3, "float", "pretraining peak AdamW learning rate", minimum=0.0),
    "pretrain_batch_size": Key(128, "int", "pretraining batch size", minimum=1),
    "pretrain_seed": Key(0, "int", "seed of the pretraining (initialisation, batch order)"),
    "train_images": Key(1000, "int", "training images of the shifted task (a seeded subset)", minimum=1),
    "valid_images": Key(500, "int", "validation images of the shifted task (from the rest of its training split)",
                        minimum=1),
    "data_seed": Key(0, "int", "seed of the shifted task's training / validation subsets"),
    "methods": Key(list(METHODS), "list", f"the fine-tuning methods, of {list(METHODS)}"),
    "seeds": Key([0, 1], "list", "fine-tuning seeds (head and adapter initialisation, batch order)"),
    "epochs": Key(10, "int", "fine-tuning epochs", minimum=1),
    "batch_size": Key(64, "int", "fine-tuning batch size", minimum=1),
    "eval_batch_size": KEYS["eval_batch_size"],
    "lr": Key(3e-3, "float", "peak AdamW learning rate of head, lora, mole_topk and adamole", minimum=0.0),
    "full_lr": Key(5e-4, "float", "peak AdamW learning rate of full fine-tuning", minimum=0.0),
    "weight_decay": Key(0.0, "float", "fine-tuning AdamW weight decay (matrices only)", minimum=0.0),
    "warmup_epochs": Key(1.0, "float", "fine-tuning linear warm-up in epochs, then cosine to 0", minimum=0.0),
    "label_smoothing": KEYS["label_smoothing"],
    "targets": Key(["q", "kv", "proj", "fc1", "fc2"], "list", "the last names of the nn.Linear layers that get "
                   "adapters (the head never does)"),
    "lora_rank": Key(10, "int", "lora: the rank", minimum=1),
    "num_experts": Key(4, "int", "mole_topk / adamole: LoRA experts per layer", minimum=1),
    "expert_rank": Key(2, "int", "mole_topk / adamole: each expert's rank", minimum=1),
    "top_k": Key(2, "int", "mole_topk: experts per token", minimum=1),
    "adamole_aux_coef": Key(1e-3, "float", "adamole: the coefficient of the authors' auxiliary loss", minimum=0.0),
    "scaling": Key(2.0, "float", "every adapter's alpha / rank (alpha = scaling * rank)", minimum=0.0),
    "bench": Key(None, "str", "also write <bench>.csv, <bench>-summary.csv and <bench>.png (e.g. "
                 "benchmarks/adapters)", optional=True),
    "out": KEYS["out"],
    "name": KEYS["name"],
    "device": KEYS["device"],
    "threads": Key(1, "int", "torch.set_num_threads for CPU runs", minimum=1),
    "max_steps": Key(None, "int", "stop the pretraining and each fine-tuning after this many optimizer steps "
                     "(smoke tests)", optional=True, minimum=1),
    "progress": KEYS["progress"],
}



# --- the data --------------------------------------------------------------------------------------


def shift_images(images: torch.Tensor, rotate: int = 0, invert: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) rotated counter-clockwise by ``rotate`` degrees (a multiple of 90)
    and, with ``invert``, contrast-inverted (``255 - x``)."""
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    out = torch.rot90(images, rotate // 90, dims=(2, 3)) if rotate else images
    if invert:
        out = 255 - out
    return out.contiguous()


def _select(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``classes``, relabelled 0.. in the order of ``classes``."""
    relabel = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64)
    for i, c in enumerate(classes):
        relabel[c] = i
    new = relabel[labels]
    keep = new >= 0
    return images[keep], new[keep]


class Tasks:
    """The pretraining data set and the shifted task's training, validation and test images."""

    def __init__(self, cfg: Mapping):
        full = load_dataset(cfg["data"])
        self.source = full
        problems = []
        for key in ("pretrain_classes", "finetune_classes"):
            cls = cfg[key]
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in cls):
                problems.append(f"{key} must be a list of class indices, got {cls!r}")
            elif len(cls) < (1 if key == "pretrain_classes" else 2) or len(set(cls)) != len(cls):
                least = "one or more" if key == "pretrain_classes" else "at least two"
                problems.append(f"{key} must list distinct classes ({least}), got {cls!r}")
            elif min(cls) < 0 or max(cls) >= full.num_classes:
                problems.append(f"{key}: the data set {full.name!r} has classes 0..{full.num_classes - 1}, got {cls!r}")
        h, w = full.image_size
        if cfg["rotate"] not in ROTATIONS:
            problems.append(f"rotate must be one of {list(ROTATIONS)}, got {cfg['rotate']!r}")
        elif cfg["rotate"] in (90, 270) and h != w:
            problems.append(f"rotate {cfg['rotate']} needs square images, the data set's are {h}x{w}")
        raise_all(problems)
        pre_x, pre_y = _select(full.train_images, full.train_labels, cfg["pretrain_classes"])
        pre_tx, pre_ty = _select(full.test_images, full.test_labels, cfg["pretrain_classes"])
        names = [full.classes[c] for c in cfg["pretrain_classes"]]
        self.pretrain = Dataset(f"{full.name} classes {cfg['pretrain_classes']}", pre_x, pre_y, pre_tx, pre_ty, names)
        self.mean, self.std = self.pretrain.mean_std()

        ft_x, ft_y = _select(full.train_images, full.train_labels, cfg["finetune_classes"])
        need = cfg["train_images"] + cfg["valid_images"]
        if need > len(ft_y):
            raise ConfigError(f"train_images + valid_images = {need} but the classes {cfg['finetune_classes']} have "
                              f"only {len(ft_y)} training images")
        order = torch.from_numpy(np.random.default_rng(derive_seed(cfg["data_seed"], 0xADA)).permutation(len(ft_y)))
        train, valid = order[:cfg["train_images"]].sort().values, order[cfg["train_images"]:need].sort().values
        ft_x = shift_images(ft_x, cfg["rotate"], cfg["invert"])
        test_x, test_y = _select(full.test_images, full.test_labels, cfg["finetune_classes"])
        self.classes = [full.classes[c] for c in cfg["finetune_classes"]]
        self.train = (ft_x[train], ft_y[train])
        self.valid = (ft_x[valid], ft_y[valid])
        self.test = (shift_images(test_x, cfg["rotate"], cfg["invert"]), test_y)

    def summary(self) -> str:
        return (f"pretraining: {self.pretrain.summary()}; shifted task: classes {self.classes}, "
                f"{len(self.train[1])} train / {len(self.valid[1])} validation / {len(self.test[1])} test images")


class FineTuning(ImageClassification):
    """The shifted task for :func:`~gatezoo.train.core.loop.fit`: the loss of
    :class:`~gatezoo.train.classify.ImageClassification` on its training images; each evaluation
    scores the validation images (``valid_loss``, ``valid_acc``); :meth:`test` the test images."""

    score = "valid_acc"
    curves = CURVES

    def __init__(self, tasks: Tasks, *, batch_size: int, eval_batch_size: int, seed: int, label_smoothing: float,
                 device: torch.device):
        self.label_smoothing, self.data, self.num_classes = label_smoothing, "shifted", len(tasks.classes)
        self.mean, self.std = tasks.mean, tasks.std
        common = dict(mean=tasks.mean, std=tasks.std, device=device)
        self.train_batches = Batches(*tasks.train, batch_size, shuffle=True, seed=seed, **common)
        self.valid_batches = Batches(*tasks.valid, eval_batch_size, **common)
        self.test_batches = Batches(*tasks.test, eval_batch_size, **common)
        self.classes = tasks.classes

    def evaluate(self, model: nn.Module) -> dict:
        ev = evaluate_model(model, self.valid_batches, self.num_classes)
        return {"valid_loss": ev["loss"], "valid_acc": ev["acc"]}

    def test(self, model: nn.Module) -> dict:
        ev = evaluate_model(model, self.test_batches, self.num_classes)
        return {"test_loss": ev["loss"], "test_acc": ev["acc"]}

    def checkpoint_info(self) -> dict:
        return {"name": "adapters_finetuning", "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std)}


# --- the adapters ----------------------------------------------------------------------------------


def target_linears(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the ``nn.Linear`` layers of ``model`` whose last name is in ``targets``
    (never ``head``); ConfigError naming the linear layers there are when none matches."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    chosen = [n for n in names if n.rsplit(".", 1)[-1] in set(targets)]
    if not chosen:
        last = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"targets {list(targets)} match no nn.Linear layer of the model; its linear layers are "
                          f"named {last}")
    return chosen


def freeze_except(model: nn.Module, trainable) -> None:
    """``requires_grad`` on the parameters whose full name ``trainable(name)`` accepts, off elsewhere."""
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))


def _is_head(name: str) -> bool:
    return name.startswith("head.")


def add_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """peft's LoRA (rank ``rank``, ``lora_alpha`` ``alpha``, no dropout) on exactly the modules
    ``names``, injected into ``model`` in place; only the LoRA factors and the head stay trainable."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("the lora method needs peft: pip install 'gatezoo[adapters]' (make install has it)") from e
    pattern = "|".join(re.escape(n) for n in names)  # peft full-matches a string against each module name
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=pattern)
    model = peft.inject_adapter_in_model(config, model)
    freeze_except(model, lambda n: "lora_" in n or _is_head(n))
    return model


def add_mole(model: nn.Module, names: Sequence[str], *, num_experts: int, rank: int, alpha: float, router: str,
             router_args: dict | None = None) -> nn.Module:
    """Each linear layer ``names`` of ``model`` replaced in place by an :class:`~gatezoo.blocks.MoLELinear` around
    it (base frozen); only the experts, the routers and the head stay trainable."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoLELinear.from_linear(getattr(parent, child), freeze_base=True, num_experts=num_experts, rank=rank,
                                        alpha=alpha, router=router, router_args=router_args)
        setattr(parent, child, layer)
    freeze_except(model, lambda n: ".lora_" in n or ".router." in n or _is_head(n))
    return model


def prepare(model: nn.Module, method: str, cfg: Mapping) -> nn.Module:
    """``model`` (pretrained, with its new head) made ready for ``method`` (in place)."""
    if method == "head":
        freeze_except(model, _is_head)
        return model
    if method == "full":
        freeze_except(model, lambda n: True)
        return model
    names = target_linears(model, cfg["targets"])
    if method == "lora":
        return add_lora(model, names, cfg["lora_rank"], cfg["scaling"] * cfg["lora_rank"])
    mole = dict(num_experts=cfg["num_experts"], rank=cfg["expert_rank"], alpha=cfg["scaling"] * cfg["expert_rank"])
    if method == "mole_topk":
        return add_mole(model, names, router="topk", router_args={"k": cfg["top_k"]}, **mole)
    if method == "adamole":
        return add_mole(model, names, router="adaptive_threshold",
                        router_args={"aux_loss_coef": cfg["adamole_aux_coef"]}, **mole)
    raise ConfigError(f"unknown method {method!r}; choose from {list(METHODS)}")


# --- the runs --------------------------------------------------------------------------------------


def _check(cfg: Mapping) -> None:
    problems = []
    methods = cfg["methods"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        problems.append(f"methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not methods or len(set(map(str, methods))) != len(methods):
        problems.append(f"methods must list distinct methods (at least one), got {methods!r}")
    seeds = cfg["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(
            seeds):
        problems.append(f"seeds must be a list of distinct integers (at least one), got {seeds!r}")
    targets = cfg["targets"]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"targets must be a list of layer names (at least one), got {targets!r}")
    if cfg["top_k"] > cfg["num_experts"] and "mole_topk" in methods:
        problems.append(f"top_k ({cfg['top_k']}) must be <= num_experts ({cfg['num_experts']})")
    if cfg["lr"] == 0 or cfg["full_lr"] == 0 or cfg["pretrain_lr"] == 0:
        problems.append("lr, full_lr and pretrain_lr must be > 0")
    if cfg["scaling"] == 0:
        problems.append("scaling must be > 0")
    if cfg["rotate"] not in ROTATIONS:
        problems.append(f"rotate must be one of {list(ROTATIONS)}, got {cfg['rotate']!r}")
    raise_all(problems)
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise ConfigError("the lora method needs peft: pip install 'gatezoo[adapters]' (make install has it)") \
                from e


def _pretrained_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "pretrain" / "last.safetensors"
    if not path.is_file():
        raise ConfigError(f"pretrained: no checkpoint at {str(path)!r} (give a run directory of this command or a "
                          f".safetensors file)")
    return path


def _schedule(optimizer, per_epoch: int, epochs: int, warmup_epochs: float):
    return build_scheduler(optimizer, round(warmup_epochs * per_epoch), epochs * per_epoch, "cosine")


def pretrain(cfg: Mapping, tasks: Tasks, model_args: dict, run_dir: Path, device: torch.device) -> nn.Module:
    """The pretrained model: loaded from ``cfg["pretrained"]``, or trained on the pretraining task
    (its run under ``run_dir/pretrain``)."""
    spec = cfg["model"]
    if cfg["pretrained"] is not None:
        path = _pretrained_path(cfg["pretrained"])
        meta = read_checkpoint_metadata(path)
        if meta.get("model") != spec or meta.get("model_args") != model_args:
            raise ConfigError(f"pretrained: {str(path)!r} holds {meta.get('model')!r} with {meta.get('model_args')!r}, "
                              f"not {spec!r} with {model_args!r}")
        model = build_model(spec, **model_args)
        load_weights(model, path)
        print(f"pretrained model loaded from {path}")
        return model.to(device)
    torch.manual_seed(cfg["pretrain_seed"])
    model = build_model(spec, **model_args).to(device)
    task = ImageClassification(tasks.pretrain, batch_size=cfg["pretrain_batch_size"],
                               eval_batch_size=cfg["eval_batch_size"], seed=cfg["pretrain_seed"],
                               label_smoothing=cfg["label_smoothing"], device=device, data=data_spec(cfg["data"]))
    per_epoch = steps_per_epoch(task)
    optimizer = build_optimizer(model, cfg["pretrain_lr"], 0.05)
    scheduler = _schedule(optimizer, per_epoch, cfg["pretrain_epochs"], 0.3)
    folder = run_dir / "pretrain"
    folder.mkdir()
    t = Trainee(spec, model, optimizer, scheduler, model_args=dict(model_args), run_dir=folder,
                params=count_params(model))
    fit(task, [t], epochs=cfg["pretrain_epochs"], device=device, max_steps=cfg["max_steps"],
        progress=cfg["progress"], title=f"{spec} pretraining")
    return model


def _fresh(pretrained: nn.Module, spec: str, model_args: dict, num_classes: int, seed: int,
           device: torch.device) -> nn.Module:
    """A copy of ``pretrained`` with a new ``num_classes``-way head, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = build_model(spec, **{**model_args, "num_classes": num_classes}).to(device)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


def finetune(cfg: Mapping, tasks: Tasks, pretrained: nn.Module, model_args: dict, seed: int,
             device: torch.device) -> tuple[list[dict], list[dict]]:
    """Every method of ``cfg["methods"]`` fine-tuned at ``seed`` on identical batches; returns
    (per-epoch metric rows, one result row per method)."""
    task = FineTuning(tasks, batch_size=cfg["batch_size"], eval_batch_size=cfg["eval_batch_size"], seed=seed,
                      label_smoothing=cfg["label_smoothing"], device=device)
    per_epoch = steps_per_epoch(task)
    trainees = []
    for method in cfg["methods"]:
        model = _fresh(pretrained, cfg["model"], model_args, task.num_classes, seed, device)
        torch.manual_seed(derive_seed(seed, METHODS.index(method), 0xADA))  # the adapters' initialisation
        model = prepare(model, method, cfg).to(device)
        optimizer = build_optimizer(model, cfg["full_lr"] if method == "full" else cfg["lr"], cfg["weight_decay"])
        scheduler = _schedule(optimizer, per_epoch, cfg["epochs"], cfg["warmup_epochs"])
        trainees.append(Trainee(method, model, optimizer, scheduler, params=count_params(model)))
    fit(task, trainees, epochs=cfg["epochs"], device=device, max_steps=cfg["max_steps"], progress=cfg["progress"],
        title=f"fine-tuning, seed {seed}")
    counts = {t.spec: t.params for t in trainees}
    rows, results = [], []
    for t in trainees:
        rows.extend({"seed": seed, "method": t.spec, **r} for r in t.rows)
        test = task.test(t.model)
        no_expert = per_token = float("nan")
        if t.spec in ("mole_topk", "adamole"):  # routing statistics count training-mode forwards only
            reset_moe_stats(t.model)
            t.model.train()
            with torch.no_grad():
                for x, _ in task.valid_batches:
                    t.model(x)
            t.model.eval()
            stats = moe_stats(t.model)["all"]
            no_expert, per_token = stats["zero_expert_share"], stats["assignments"] / max(stats["tokens"], 1)
        results.append({"seed": seed, "method": t.spec, "trainable": t.params,
                        "ratio_to_lora": t.params / counts["lora"] if "lora" in counts else float("nan"),
                        **test, "valid_acc": t.last.get("valid_acc", float("nan")), "img_per_s": t.rate,
                        "no_expert_share": no_expert, "experts_per_token": per_token})
    return rows, results


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def summarise(results: Sequence[Mapping], methods: Sequence[str]) -> list[dict]:
    """Per method: trainable parameters, test accuracy mean ± sd over seeds, and the paired
    difference to LoRA (mean ± sd over seeds)."""
    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    out = []
    for m in methods:
        rows = [by[(m, s)] for s in seeds if (m, s) in by]
        mean, sd = _mean_sd([r["test_acc"] for r in rows])
        row = {"method": m, "seeds": len(rows), "trainable": rows[0]["trainable"],
               "ratio_to_lora": rows[0]["ratio_to_lora"], "test_acc_mean": mean, "test_acc_sd": sd}
        diffs = [by[(m, s)]["test_acc"] - by[("lora", s)]["test_acc"] for s in seeds
                 if (m, s) in by and ("lora", s) in by]
        row["vs_lora_mean"], row["vs_lora_sd"] = _mean_sd(diffs) if diffs else (float("nan"), float("nan"))
        out.append(row)
    return out


def goal(summary: Sequence[Mapping]) -> dict:
    """The issue's goal: AdaMoLE >= LoRA + 0.5 points at <= 1.1x its trainable parameters, and >= top-k MoLE."""
    s = {r["method"]: r for r in summary}
    if not {"adamole", "lora", "mole_topk"} <= set(s):
        return {"checked": False}
    ada, lora, topk = s["adamole"], s["lora"], s["mole_topk"]
    return {"checked": True, "params_ratio": ada["trainable"] / lora["trainable"],
            "params_within_1.1x": ada["trainable"] <= 1.1 * lora["trainable"],
            "gain_over_lora_points": 100 * (ada["test_acc_mean"] - lora["test_acc_mean"]),
            "beats_lora_by_0.5_points": ada["test_acc_mean"] >= lora["test_acc_mean"] + 0.005,
            "at_least_topk": ada["test_acc_mean"] >= topk["test_acc_mean"],
            "met": bool(ada["trainable"] <= 1.1 * lora["trainable"]
                        and ada["test_acc_mean"] >= lora["test_acc_mean"] + 0.005
                        and ada["test_acc_mean"] >= topk["test_acc_mean"])}


def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    """``rows`` as CSV (the union of their columns, in order of appearance; floats to 6 significant digits)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def plot(results: Sequence[Mapping], summary: Sequence[Mapping], path: Path, title: str) -> None:
    """Test accuracy per method (mean ± sd, each seed a dot) and against the trainable parameters."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = np.arange(len(summary))
    left.bar(xs, [r["test_acc_mean"] for r in summary], yerr=[0 if math.isnan(r["test_acc_sd"]) else r["test_acc_sd"]
                                                              for r in summary], color="#9ecae1", capsize=4)
    for i, s in enumerate(summary):
        pts = [r["test_acc"] for r in results if r["method"] == s["method"]]
        left.plot([i] * len(pts), pts, "k.", ms=6)
    lo = min(r["test_acc"] for r in results)
    left.set_ylim(max(0.0, lo - 0.05), min(1.0, max(r["test_acc"] for r in results) + 0.02))
    left.set_xticks(xs, [f"{s['method']}\n{s['trainable']:,}" for s in summary], fontsize=8)
    left.set_ylabel("test accuracy (shifted task)")
    left.set_title("mean ± sd over seeds; trainable parameters below", fontsize=9)
    left.grid(axis="y", alpha=0.3)
    for s in summary:
        right.errorbar(s["trainable"], s["test_acc_mean"], yerr=0 if math.isnan(s["test_acc_sd"]) else s["test_acc_sd"],
                       fmt="o", capsize=3, label=s["method"])
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("test accuracy")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    save_figure(fig, path, title)


def run(cfg: dict) -> dict:
    """The experiment ``cfg`` describes; returns the summary, the goal check and ``run_dir``."""
    torch.set_num_threads(cfg["threads"])
    _check(cfg)
    device = resolve_device(cfg["device"])
    tasks = Tasks(cfg)
    model_args = data_model_args(tasks.pretrain, cfg["model_args"])
    try:
        probe = build_model(cfg["model"], **model_args)
    except ValueError as e:
        raise model_error(cfg["model"], model_args, e) from e
    if not isinstance(getattr(probe, "head", None), nn.Linear):
        raise ConfigError(f"model {cfg['model']!r} has no linear 'head' to replace for the shifted task")
    if any(m in ADAPTER_METHODS for m in cfg["methods"]):
        target_linears(probe, cfg["targets"])
    if cfg["pretrained"] is not None:
        _pretrained_path(cfg["pretrained"])
    cfg = {**cfg, "data": data_spec(cfg["data"])}
    run_dir = new_run_dir(cfg["out"], cfg["name"] or "adapters")
    write_text(run_dir / "config.yaml", dump_config({**cfg, "model_args": model_args}, ADAPTER_KEYS))
    print(tasks.summary())
    print(f"{cfg['model']}: {count_params(probe):,} parameters; run directory {run_dir}")
    start = time.perf_counter()
    pretrained = pretrain(cfg, tasks, model_args, run_dir, device)
    rows, results = [], []
    for seed in cfg["seeds"]:
        r, res = finetune(cfg, tasks, pretrained, model_args, seed, device)
        rows.extend(r)
        results.extend(res)
        write_csv(rows, run_dir / "metrics.csv")
        write_csv(results, run_dir / "results.csv")
    summary = summarise(results, cfg["methods"])
    write_csv(summary, run_dir / "summary.csv")
    title = (f"{cfg['model']} pretrained on classes {cfg['pretrain_classes']}, fine-tuned on {cfg['finetune_classes']}"
             f" rotated {cfg['rotate']}°{' and inverted' if cfg['invert'] else ''}, {cfg['train_images']} images")
    plot(results, summary, run_dir / "adapters.png", title)
    result = {"summary": summary, "goal": goal(summary), "seconds": time.perf_counter() - start}
    write_text(run_dir / "result.json", json.dumps(result, indent=2))
    if cfg["bench"]:
        bench = Path(cfg["bench"])
        bench.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "results.csv", bench.with_name(bench.name + ".csv"))
        shutil.copyfile(run_dir / "summary.csv", bench.with_name(bench.name + "-summary.csv"))
        shutil.copyfile(run_dir / "adapters.png", bench.with_name(bench.name + ".png"))
    return {**result, "run_dir": str(run_dir)}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``; every key of :data:`ADAPTER_KEYS` as ``--key value``)."""
    return command_parser(
        "python -m gatezoo.train.adapters",
        "Fine-tune a pretrained ViT on a shifted image task with a linear probe, full fine-tuning, peft's LoRA, a "
        "top-k mixture of LoRA experts and AdaMoLE (adaptive-threshold mixture), at matched trainable parameters.",
        ADAPTER_KEYS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parse_command(parser, argv, ADAPTER_KEYS)
        result = run(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in result["summary"]:
        print(f"{s['method']:>10}: test accuracy {s['test_acc_mean']:.4f} ± {s['test_acc_sd']:.4f} "
              f"({s['trainable']:,} trainable)")
    print(f"{result['seconds']:.0f} s -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
