"""Adversarial training of image classifiers, dense or mixture-of-experts, and AdvMoE.

    python -m gatezoo.train.adversarial --config configs/adversarial.yaml                  # AdvMoE
    python -m gatezoo.train.adversarial --config configs/adversarial.yaml --mode joint
    python -m gatezoo.train.adversarial --config configs/adversarial.yaml --mode dense --model cnn_small
    python -m gatezoo.train.adversarial --resume runs/cnn_small_moe-advmoe-20261207-120000

Zhang et al. 2023, "Robust Mixture-of-Expert Training for Convolutional Neural Networks"
(AdvMoE, ICCV). Three modes (``mode``):

- ``dense``: adversarial training (AT) of a model without MoE layers;
- ``joint``: AT of an MoE model, routers and experts updated together by one optimizer;
- ``advmoe``: the paper's alternation. Each batch first updates the routers (psi: the
  parameters of every :class:`~gatezoo.blocks.routing.Router`) on adversarial examples made
  against the current model, then the rest (theta: experts, backbone, head) on adversarial
  examples made again against the model with the updated routers (``alternation: separate``);
  ``alternation: shared`` reuses the first examples for the second update (the ablation).
  Two AdamW optimizers with the same settings and schedules.

``objective`` is ``trades`` (Zhang et al. 2019, the authors' choice, ``beta`` 6: examples
maximise ``KL(f(x) || f(x'))``) or ``pgd`` (Madry et al.: examples maximise the cross-entropy,
the loss is the cross-entropy on them). Training examples take ``train_steps`` steps of
``train_step_size``; every evaluation reports the clean test accuracy on the whole test split and
the robust accuracy under PGD-``eval_steps`` (``eval_step_size``, random start) on the first
``eval_images`` test images. The radius ``eps`` is in pixel units ([0, 1] images); the model sees
normalised images (:class:`~gatezoo.eval.attacks.Normalized`), so its checkpoint is an ordinary
classifier of :mod:`gatezoo.train.evaluate`. The MoE layers' balance losses are added to every
update's loss.

A run writes ``<out>/<name or model-mode>-<timestamp>/`` with ``config.yaml``, ``metrics.csv``
(epoch, step, train_loss, train_acc, test_acc, robust_acc, lr, img_per_s, seconds, load_cv for an
MoE model), ``curves.png``, ``last.safetensors``, ``state.pt`` (for ``--resume``, written at every
evaluation; the batches and attack start points depend only on the seed and the step, so a
resumed run equals an uninterrupted one) and, at the end, ``result.json``: the last evaluation,
the inference FLOPs per image (counted by ``torch.utils.flop_counter`` on a test batch, so only
the experts that run count) and, with ``torchattacks: true``, the robust accuracy measured by
torchattacks' PGD with the same radius, step, steps and start rule.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gatezoo.blocks import moe_aux_loss, moe_stats, reset_moe_stats
from gatezoo.blocks.routing import Router
from gatezoo.eval.attacks import (
    Normalized,
    attack_accuracy,
    pgd,
    pgd_loss,
    robust_accuracy,
    trades_examples,
    trades_loss,
)
from gatezoo.eval.plots import plot_curves

from .classify import data_model_args, data_spec, evaluate_model
from .core.checkpoint import load_state, save_checkpoint, save_state, write_text
from .core.config import (
    KEYS,
    ConfigError,
    Key,
    check_resume_config,
    config_source,
    dump_config,
    keys_help,
    load_config,
    parse_overrides,
    raise_all,
)
from .core.factory import build_model, count_params
from .core.loop import write_metrics
from .core.optim import build_optimizer, build_scheduler
from .core.runs import model_error, new_run_dir, resolve_device
from .data.images import Batches, DataFormatError, DataNotFoundError, derive_seed, load_dataset

MODES = ("dense", "joint", "advmoe")
"""The training modes (``mode``)."""
OBJECTIVES = ("trades", "pgd")
"""The adversarial objectives (``objective``)."""

_SHARED = ("model_args", "data", "epochs", "batch_size", "eval_batch_size", "lr", "weight_decay", "warmup_epochs",
           "schedule", "seed", "out", "name", "device", "max_steps", "threads", "progress")
ADV_KEYS: dict[str, Key] = {
    "model": Key("cnn_small_moe", "str", "model name (a gatezoo registry name, optionally NAME:key=value,...)"),
    **{k: KEYS[k] for k in _SHARED},
    "mode": Key("advmoe", "str", "dense (AT of a model without MoE layers), joint (AT of an MoE model, routers and "
                "experts together) or advmoe (alternating router and expert updates)", choices=MODES),
    "alternation": Key("separate", "str", "advmoe: adversarial examples made again for the expert update "
                       "(separate) or reused from the router update (shared, the ablation)",
                       choices=("separate", "shared")),
    "objective": Key("trades", "str", "trades (CE + beta KL to the adversarial output) or pgd (CE on PGD examples)",
                     choices=OBJECTIVES),
    "beta": Key(6.0, "float", "TRADES weight of the KL term", minimum=0.0),
    "eps": Key(0.1, "float", "L-infinity radius in pixel units ([0, 1] images)", minimum=0.0),
    "train_steps": Key(2, "int", "attack steps of the training examples", minimum=1),
    "train_step_size": Key(0.0625, "float", "attack step of the training examples (the authors' 5/255 at "
                           "eps 8/255, scaled to eps 0.1)", minimum=0.0),
    "eval_steps": Key(10, "int", "PGD steps of the robust evaluation", minimum=1),
    "eval_step_size": Key(0.025, "float", "PGD step of the robust evaluation (the authors' 2/255 at eps 8/255, "
                          "scaled)", minimum=0.0),
    "eval_images": Key(1000, "int", "test images of the robust evaluation (the first N)", minimum=1),
    "train_images": Key(None, "int", "train on a seeded subset of N training images (null: all)", optional=True,
                        minimum=1),
    "eval_every": Key(None, "int", "also evaluate every this many steps (null: at each epoch's end)",
                      optional=True, minimum=1),
    "torchattacks": Key(False, "bool", "final evaluation: also measure the robust accuracy with torchattacks' PGD"),
}
RESUME_FIXED = ("model", "model_args", "data", "mode", "alternation", "objective", "beta", "eps", "train_steps",
                "train_step_size", "lr", "weight_decay", "batch_size", "seed", "train_images", "out", "name")
"""Keys a resumed run cannot change (they decide the weights, the batches or the place)."""
METRICS = ("epoch", "step", "train_loss", "train_acc", "test_acc", "robust_acc", "lr", "img_per_s", "seconds")


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every :class:`~gatezoo.blocks.routing.Router` inside ``model`` (psi)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, Router):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _split_optimizers(model: nn.Module, cfg: dict, total: int, warmup: int):
    """(optimizers, schedulers) of a mode: one over everything, or for advmoe the routers' (psi)
    and the rest's (theta), each with the same settings and schedule."""
    if cfg["mode"] != "advmoe":
        opts = [build_optimizer(model, cfg["lr"], cfg["weight_decay"])]
    else:
        psi = {id(p) for p in router_parameters(model)}
        opts = [build_optimizer(model, cfg["lr"], cfg["weight_decay"], select=lambda n, p: id(p) in psi),
                build_optimizer(model, cfg["lr"], cfg["weight_decay"], select=lambda n, p: id(p) not in psi)]
    return opts, [build_scheduler(o, warmup, total, cfg["schedule"]) for o in opts]


def check_mode(model: nn.Module, cfg: dict) -> None:
    """Refuse a model that does not fit the mode: MoE layers in ``dense``, none in ``joint``/``advmoe``."""
    routers = router_parameters(model)
    if cfg["mode"] == "dense" and routers:
        raise ConfigError(f"mode: dense trains a model without MoE layers, but {cfg['model']!r} has routers; use "
                          f"mode: joint or advmoe, or a dense model (cnn_small)")
    if cfg["mode"] != "dense" and not routers:
        raise ConfigError(f"mode: {cfg['mode']} needs a model with MoE layers (routers), but {cfg['model']!r} has "
                          f"none; use mode: dense, or an MoE model (cnn_small_moe)")
    if cfg["mode"] != "advmoe" and cfg["alternation"] != "separate":
        raise ConfigError(f"alternation: {cfg['alternation']} applies to mode: advmoe only")


def flops_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """Inference FLOPs per image of ``model`` on ``images``, counted by ``torch.utils.flop_counter``
    (the operations that actually run: an MoE layer's unselected experts cost nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was)
    return counter.get_total_flops() / max(len(images), 1)


def torchattacks_robust_accuracy(model: nn.Module, batches, *, eps: float, step_size: float, steps: int,
                                 seed: int = 0) -> float:
    """Robust accuracy under torchattacks' ``PGD`` (random start), scored as
    :func:`~gatezoo.eval.attacks.robust_accuracy` scores it (:func:`~gatezoo.eval.attacks.attack_accuracy`)."""
    try:
        import torchattacks
    except ImportError as e:
        raise ConfigError("torchattacks: true needs the torchattacks package (make install puts it in .venv; "
                          "pip install --no-deps torchattacks)") from e
    torch.manual_seed(seed)
    attack = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    return attack_accuracy(model, batches, attack)["robust_acc"]


class _Run:
    """The state of one adversarial training run."""

    def __init__(self, cfg: dict, run_dir: Path, device: torch.device):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        dataset = load_dataset(cfg["data"])
        self.dataset = dataset
        model_args = data_model_args(dataset, cfg["model_args"])
        self.cfg = cfg = {**cfg, "model_args": model_args, "data": data_spec(cfg["data"])}
        images, labels = dataset.train_images, dataset.train_labels
        if cfg["train_images"] is not None and cfg["train_images"] < len(labels):
            g = torch.Generator().manual_seed(derive_seed(cfg["seed"], 0x7A11))
            keep = torch.randperm(len(labels), generator=g)[:cfg["train_images"]].sort().values
            images, labels = images[keep], labels[keep]
        # pixel-space batches ([0, 1]); the model normalises
        self.train = Batches(images, labels, cfg["batch_size"], mean=[0.0] * dataset.in_chans,
                             std=[1.0] * dataset.in_chans, shuffle=True, seed=cfg["seed"], device=device)
        self.test = Batches(dataset.test_images, dataset.test_labels, cfg["eval_batch_size"],
                            mean=[0.0] * dataset.in_chans, std=[1.0] * dataset.in_chans, device=device)
        n = min(cfg["eval_images"], len(dataset.test_labels))
        self.attack_set = Batches(dataset.test_images[:n], dataset.test_labels[:n], cfg["eval_batch_size"],
                                  mean=[0.0] * dataset.in_chans, std=[1.0] * dataset.in_chans, device=device)
        torch.manual_seed(cfg["seed"])
        try:
            self.model = build_model(cfg["model"], **model_args).to(device)
        except ValueError as e:
            raise model_error(cfg["model"], model_args, e) from e
        check_mode(self.model, cfg)
        self.mean, self.std = dataset.mean_std()
        self.net = Normalized(self.model, self.mean, self.std).to(device)
        self.per_epoch = len(self.train)
        self.total = cfg["epochs"] * self.per_epoch
        warmup = round(cfg["warmup_epochs"] * self.per_epoch)
        self.optimizers, self.schedulers = _split_optimizers(self.model, cfg, self.total, warmup)
        self.step, self.rows, self.seconds, self.items, self.train_seconds = 0, [], 0.0, 0, 0.0

    # --- one update ---------------------------------------------------------------------------

    def _examples(self, x, y, g):
        cfg = self.cfg
        kw = dict(eps=cfg["eps"], step_size=cfg["train_step_size"], steps=cfg["train_steps"], generator=g)
        if cfg["objective"] == "trades":
            return trades_examples(self.net, x, **kw)
        return pgd(self.net, x, y, **kw)

    def _update(self, x, y, adv, optimizer) -> tuple[float, int]:
        if self.cfg["objective"] == "trades":
            loss, logits = trades_loss(self.net, x, y, adv, self.cfg["beta"])
        else:
            loss, logits = pgd_loss(self.net, y, adv)
        aux = moe_aux_loss(self.model)
        total = loss if aux is None else loss + aux
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        total.backward()
        value = float(total.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite training loss {value} at step {self.step + 1}; lower lr")
        optimizer.step()
        return float(loss.detach()), int((logits.argmax(-1) == y).sum())

    def train_step(self, x, y) -> tuple[float, int]:
        g = torch.Generator().manual_seed(derive_seed(self.cfg["seed"], self.step, 0xADF))
        adv = self._examples(x, y, g)
        if self.cfg["mode"] != "advmoe":
            out = self._update(x, y, adv, self.optimizers[0])
        else:
            self._update(x, y, adv, self.optimizers[0])  # routers (psi), the rest fixed
            if self.cfg["alternation"] == "separate":
                adv = self._examples(x, y, g)  # against the model with the updated routers
            out = self._update(x, y, adv, self.optimizers[1])  # experts and backbone (theta)
        for s in self.schedulers:
            s.step()
        return out

    # --- evaluation, saving -------------------------------------------------------------------------

    def evaluate(self) -> dict:
        cfg = self.cfg
        clean = evaluate_model(self.net, self.test, self.dataset.num_classes)
        rob = robust_accuracy(self.net, self.attack_set, eps=cfg["eps"], step_size=cfg["eval_step_size"],
                              steps=cfg["eval_steps"], seed=cfg["seed"])
        return {"test_acc": clean["acc"], "robust_acc": rob["robust_acc"]}

    def metadata(self) -> dict:
        cfg = self.cfg
        return {"model": cfg["model"], "model_args": cfg["model_args"], "step": self.step,
                "epoch": self.step / self.per_epoch,
                "task": {"name": "image_classification", "data": cfg["data"], "dataset": self.dataset.name,
                         "classes": list(self.dataset.classes), "mean": list(self.mean), "std": list(self.std)},
                "adversarial": {k: cfg[k] for k in ("mode", "alternation", "objective", "beta", "eps", "train_steps",
                                                    "train_step_size")}}

    def save(self) -> None:
        save_checkpoint(self.model, self.run_dir / "last.safetensors", self.metadata())
        save_state({"step": self.step, "model": self.model.state_dict(),
                    "optimizers": [o.state_dict() for o in self.optimizers],
                    "schedulers": [s.state_dict() for s in self.schedulers], "rows": self.rows,
                    "seconds": self.seconds, "items": self.items, "train_seconds": self.train_seconds},
                   self.run_dir / "state.pt")
        write_metrics(self.rows, self.run_dir / "metrics.csv")
        plot_curves(self.rows, self.run_dir / "curves.png",
                    [("accuracy", ("train_acc", "test_acc", "robust_acc")), ("training loss", ("train_loss",))],
                    title=f"{self.cfg['model']} ({self.cfg['mode']})")

    def restore(self) -> None:
        state = load_state(self.run_dir / "state.pt")
        self.model.load_state_dict(state["model"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.step, self.rows = int(state["step"]), list(state["rows"])
        self.seconds, self.items = float(state["seconds"]), int(state["items"])
        self.train_seconds = float(state["train_seconds"])


def train(cfg: dict, resume: str | Path | None = None) -> dict:
    """Run (or continue) the adversarial training ``cfg`` describes; returns ``result.json``'s dict
    plus ``run_dir``."""
    if resume is not None:
        check_resume_config(resume, load_config(config_source(None, resume), keys=ADV_KEYS), cfg, RESUME_FIXED,
                            normalise={"data": data_spec})
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    fresh = resume is None
    run_dir = new_run_dir(cfg["out"], cfg["name"] or f"{cfg['model']}-{cfg['mode']}") if fresh else Path(resume)
    try:
        run = _Run(cfg, run_dir, device)
        if fresh:
            write_text(run_dir / "config.yaml", dump_config(run.cfg, ADV_KEYS))
            print(run.dataset.summary())
            print(f"{cfg['model']} ({cfg['mode']}, {cfg['objective']}, eps {cfg['eps']}): "
                  f"{count_params(run.model):,} parameters, {run.per_epoch} steps/epoch; run directory {run_dir}")
        else:
            run.restore()
        result = _fit(run)
    except BaseException:
        if fresh and not (run_dir / "state.pt").exists():  # no half-made run directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return {**result, "run_dir": str(run_dir)}


def _fit(run: _Run) -> dict:
    cfg = run.cfg
    from tqdm.auto import tqdm

    limit = run.total if cfg["max_steps"] is None else min(run.total, cfg["max_steps"])
    bar = tqdm(total=limit, initial=min(run.step, limit), disable=not cfg["progress"], unit="step",
               desc=f"{cfg['model']} {cfg['mode']}", dynamic_ncols=True)
    loss_sum = correct = seen = 0.0
    start = time.perf_counter() - run.seconds
    while run.step < limit:
        epoch, b = divmod(run.step, run.per_epoch)
        for x, y in run.train.epoch(epoch, b):
            t0 = time.perf_counter()
            loss, ok = run.train_step(x, y)
            if run.step > 0:  # the first step pays for lazy initialisation
                run.train_seconds += time.perf_counter() - t0
                run.items += len(y)
            run.step += 1
            loss_sum, correct, seen = loss_sum + loss * len(y), correct + ok, seen + len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            end_of_epoch = run.step % run.per_epoch == 0
            every = cfg["eval_every"] and run.step % cfg["eval_every"] == 0
            if end_of_epoch or every or run.step == limit:
                row = {"epoch": run.step / run.per_epoch, "step": run.step, "train_loss": loss_sum / seen,
                       "train_acc": correct / seen, **run.evaluate(),
                       "lr": run.optimizers[-1].param_groups[0]["lr"],
                       "img_per_s": run.items / run.train_seconds if run.items else float("nan"),
                       "seconds": time.perf_counter() - start}
                if router_parameters(run.model):
                    row["load_cv"] = moe_stats(run.model)["all"]["load_cv"]
                    reset_moe_stats(run.model)
                run.rows.append(row)
                run.seconds = row["seconds"]
                run.save()
                bar.write(f"step {run.step}: clean {row['test_acc']:.4f}, robust {row['robust_acc']:.4f}")
                loss_sum = correct = seen = 0.0
            if run.step >= limit:
                break
    bar.close()
    last = run.rows[-1] if run.rows else {}
    x, _ = next(iter(run.test))
    result = {"model": cfg["model"], "mode": cfg["mode"], "alternation": cfg["alternation"], "seed": cfg["seed"],
              "step": run.step, "epoch": run.step / run.per_epoch, "test_acc": last.get("test_acc"),
              "robust_acc": last.get("robust_acc"), "eval_images": run.attack_set.labels.numel(),
              "flops_per_image": flops_per_image(run.net, x[:64]), "params": count_params(run.model),
              "img_per_s": last.get("img_per_s")}
    if cfg["torchattacks"]:
        result["torchattacks_robust_acc"] = torchattacks_robust_accuracy(
            run.net, run.attack_set, eps=cfg["eps"], step_size=cfg["eval_step_size"], steps=cfg["eval_steps"],
            seed=cfg["seed"])
    write_text(run.run_dir / "result.json", json.dumps(result, indent=2))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``, ``--resume``; every key of :data:`ADV_KEYS` as ``--key value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.adversarial",
        description="Adversarial training (PGD or TRADES) of a dense CNN, of an MoE-CNN (routers and experts "
        "together), or AdvMoE's alternating router / expert updates; clean and PGD-k robust accuracy.",
        epilog=keys_help(ADV_KEYS) + "\n\nexit status: 0 on success, 2 on a bad config or missing data.",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", metavar="YAML", help="config file (omitted keys take their defaults)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its state.pt")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args, rest = build_parser().parse_known_args(argv)
    try:
        cfg = load_config(config_source(args.config, args.resume), parse_overrides(rest, ADV_KEYS), keys=ADV_KEYS)
        raise_all([f"{k} must be > 0, got {cfg[k]}" for k in ("train_step_size", "eval_step_size") if cfg[k] <= 0])
        result = train(cfg, resume=args.resume)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"clean {result['test_acc']:.4f}, robust (PGD-{cfg['eval_steps']}, eps {cfg['eps']}) "
          f"{result['robust_acc']:.4f}, {result['flops_per_image'] / 1e6:.1f} MFLOP/image -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
