"""The one training loop: :func:`fit` drives every task and every model in it.

A *task* (image classification in :mod:`gatezoo.train.classify`; translation and others follow the
same contract) supplies the data and the arithmetic that differs between tasks:

- ``task.train_batches``: an object with ``len()`` (batches per epoch) and ``epoch(epoch, start)``
  that yields the batches of ``epoch`` from batch ``start`` on, in an order that depends only on
  the seed and the epoch (so a resumed run needs no saved iterator);
- ``task.loss(model, batch) -> (loss, n, sums)``: the mean training loss over the batch's ``n``
  items (images, target tokens) and a dict of sums to log (e.g. ``{"correct": 17}``);
- ``task.train_metrics(stats) -> dict``: the task's training figures from a :class:`RunningStats`
  (e.g. ``train_acc``);
- ``task.evaluate(model) -> dict``: the evaluation (e.g. ``test_loss``, ``test_acc``), run by the
  loop in eval mode under ``torch.no_grad()``;
- ``task.unit`` (``"img"``: throughput column ``img_per_s``), ``task.score`` (the evaluation key
  whose highest value makes ``best.safetensors``), ``task.curves`` (what ``curves.png`` plots) and
  ``task.checkpoint_info()`` (the ``task`` metadata of checkpoints).

The loop owns everything else: the device and bfloat16 autocast, gradient accumulation
(``accum_steps`` batches per optimizer step) and clipping (``grad_clip``, the max global norm),
stepping the schedule once per optimizer step, the tqdm progress bar, evaluation after every epoch
(every ``eval_every`` steps as well, if given, and where ``max_steps`` stops a run), and, for each
model given a run directory, ``metrics.csv``, ``curves.png``, ``last``/``best.safetensors`` and
the snapshots that :func:`fit` resumes from (``checkpoints/step-<N>/``, see
:mod:`gatezoo.train.core.checkpoint`): one at every evaluation and, with ``checkpoint_every``, every
that many optimizer steps in between; ``state.pt`` is the newest snapshot's training state.
Every file a resumed run depends on is written atomically, and a snapshot is complete only once
its manifest (sizes and SHA-256 of its files) is written, so a run killed at any instant resumes
from its newest complete snapshot and ends bit-identical to an uninterrupted run. A non-finite
training loss (or gradient norm) stops the run, naming the step, before the optimizer applies it
(or, with ``nonfinite="skip"``, skips that update), so no checkpoint ever holds non-finite weights.
Under ``torchrun`` every process trains on its share of each batch and rank 0 alone evaluates
and writes (:mod:`gatezoo.train.core.distributed`).

Several models may train side by side (:class:`Trainee` each): at every optimizer step each takes
its step on the same batches, the one that goes first rotating from step to step, and each one's
throughput counts only its own forward, backward and optimizer step (the first step of each
:func:`fit` call, which pays for lazy initialisation, is not timed).
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from gatezoo.blocks.moe import moe_layers
from gatezoo.eval.plots import plot_curves

from . import checkpoint as ckpt
from .config import ConfigError
from .distributed import SINGLE, DistEnv, all_sum, gather_objects, shard

STATE_FILE = "state.pt"
"""The run directory's copy (hard link) of its newest snapshot's training state."""
STATE_VERSION = 2


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), for honest wall-clock timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class RunningStats:
    """Sums over the training steps of one epoch: loss, items, the task's own sums, seconds.

    Throughput counts only timed steps: a step recorded with ``timed=False`` adds to the loss and
    the task's sums but not to the rate.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.loss_sum, self.items, self.timed, self.seconds = 0.0, 0, 0, 0.0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, n: int, sums: Mapping[str, float], seconds: float, timed: bool = True) -> None:
        """Record one step: its mean loss over ``n`` items, the task's sums, and its time."""
        self.loss_sum += float(loss) * n
        self.items += int(n)
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0) + value
        if timed:
            self.timed += int(n)
            self.seconds += seconds

    def total(self, key: str) -> float:
        """The sum of the task's ``key`` so far (0 when never added)."""
        return self.sums.get(key, 0)

    @property
    def loss(self) -> float:
        """Mean training loss per item so far."""
        return self.loss_sum / self.items if self.items else float("nan")

    @property
    def rate(self) -> float:
        """Training throughput so far (items per second of timed step time)."""
        return self.timed / self.seconds if self.seconds > 0 else float("nan")

    def state_dict(self) -> dict:
        """The sums, for a training state file."""
        return {"loss_sum": self.loss_sum, "items": self.items, "timed": self.timed, "seconds": self.seconds,
                "sums": dict(self.sums)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""
        self.loss_sum, self.items = float(state["loss_sum"]), int(state["items"])
        self.timed, self.seconds, self.sums = int(state["timed"]), float(state["seconds"]), dict(state["sums"])


@dataclass
class Trainee:
    """One model in :func:`fit`, with its optimizer, schedule and records.

    ``spec`` and ``model_args`` rebuild the model from a checkpoint (see
    :mod:`gatezoo.train.core.checkpoint`); ``run_dir`` (optional) receives ``metrics.csv``,
    ``curves.png``, ``last.safetensors``, ``best.safetensors``, the snapshots under
    ``checkpoints/`` and ``state.pt``.
    """

    spec: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model_args: dict = field(default_factory=dict)
    run_dir: Path | None = None
    params: int = 0
    stats: RunningStats = field(default_factory=RunningStats)
    rows: list = field(default_factory=list)
    lr: float = 0.0
    best: float = -math.inf
    last: dict = field(default_factory=dict)
    items: int = 0  # timed items and seconds of the finished epochs, for the mean throughput
    seconds: float = 0.0
    expert_load: dict = field(default_factory=dict)  # MoE layer name -> each expert's share, last evaluation
    net: nn.Module | None = None  # what trains: ``model`` wrapped for data parallelism (None: ``model`` itself)
    skipped: int = 0  # optimizer steps skipped for a non-finite loss (nonfinite="skip")
    sharded: bool = False  # ``model`` is sharded in place by FSDP (fully_shard) across the processes
    shadow: nn.Module | None = None  # rank 0, sharded: a plain copy with the whole weights (saving, evaluation)

    @property
    def whole_model(self) -> nn.Module:
        """A module holding the whole weights: ``model``, or for a sharded trainee (on rank 0) the
        copy gathered at the last evaluation or snapshot."""
        return self.shadow if self.sharded else self.model

    @property
    def trained(self) -> nn.Module:
        """The module the training forward and backward run through (``net`` or ``model``)."""
        return self.model if self.net is None else self.net

    @property
    def rate(self) -> float:
        """Mean training throughput over the run so far (timed items per second)."""
        seconds = self.seconds + self.stats.seconds
        return (self.items + self.stats.timed) / seconds if seconds > 0 else float("nan")


def write_metrics(rows: Sequence[Mapping], path: Path) -> None:
    """Write metric rows as CSV (columns of the first row, in order), atomically."""
    with ckpt.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(v) for k, v in row.items()})


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


def _groups(batches, accum: int):
    """The batches of one epoch from ``start`` on, in lists of ``accum`` (the last may be shorter)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


NONFINITE = ("stop", "skip")
"""What :func:`fit` does at a non-finite training loss (or gradient norm): stop the run, or skip the
optimizer step (the schedule still advances) and go on."""


def _step(task, t: Trainee, group: list, device: torch.device, bf16: bool, grad_clip: float | None,
          timed: bool, env: DistEnv = SINGLE, nonfinite: str = "stop", step: int = 0) -> None:
    """One optimizer step of trainee ``t`` over the batches of ``group`` (each process on its share
    of every batch, the loss of a share weighted by its share of the batch's items)."""
    t.lr = t.optimizer.param_groups[0]["lr"]
    synchronize(device)
    t0 = time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)
    records = []
    net = t.trained
    for i, batch in enumerate(group):
        batch = shard(batch, env)
        # gradients are averaged over the processes once, at the last batch of the group
        sync = contextlib.nullcontext() if i == len(group) - 1 or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast(device, bf16):
                loss, n, sums = task.loss(net, batch)
                aux = moe_layers(t.model).aux_loss()  # the MoE layers' balance / z-losses of this forward
            total = loss if aux is None else loss + aux
            weight = 1.0
            n_all = n
            if env.active:  # the share's weight in the global mean, times world to undo DDP's average
                n_all = all_sum(env, [n])[0]
                weight = n * env.world / n_all if n_all else 0.0
                total = loss * weight if aux is None else loss * weight + aux
            (total if len(group) == 1 else total / len(group)).backward()
        if aux is not None:  # aux is already the process's share times world (see set_moe_process_group)
            sums = {**sums, "aux_loss": aux.detach().float() * n_all / env.world}
        records.append((loss.detach(), n, sums))
    # .item() also waits for the device
    losses = [loss.item() for loss, _, _ in records]
    bad = not all(math.isfinite(v) for v in losses)
    if not bad and aux is not None:
        bad = not all(math.isfinite(float(s["aux_loss"])) for _, _, s in records)
    norm = None
    if grad_clip and not bad:
        norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        bad = not math.isfinite(float(norm))
    if env.active:
        bad = all_sum(env, [float(bad)])[0] > 0
    if bad:
        what = f"loss {losses}" if norm is None else f"gradient norm {float(norm)}"
        if nonfinite == "stop":
            raise FloatingPointError(f"{t.spec}: non-finite training {what} at optimizer step {step + 1}; "
                                     f"lower the learning rate, set grad_clip, check the data, or set "
                                     f"nonfinite: skip")
        t.optimizer.zero_grad(set_to_none=True)
        t.skipped += 1
        _warn(f"{t.spec}: non-finite training {what} at optimizer step {step + 1}: step skipped "
              f"({t.skipped} so far)")
        if t.scheduler is not None:
            t.scheduler.step()
        return
    t.optimizer.step()
    if t.scheduler is not None:
        t.scheduler.step()
    records = [(loss, n, {k: float(v) for k, v in sums.items()}) for loss, (_, n, sums) in zip(losses, records)]
    synchronize(device)
    dt = time.perf_counter() - t0
    for i, (loss, n, sums) in enumerate(records):
        t.stats.add(loss, n, sums, dt if i == 0 else 0.0, timed=timed)


def _whole(t: Trainee, env: DistEnv) -> dict | None:
    """For a sharded trainee, gather the whole weights and optimizer state (a collective: every
    process calls it): rank 0 gets ``t.shadow`` refreshed and the whole optimizer state (returned),
    the others None. For any other trainee None (nothing to gather)."""
    if not t.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(t.model, options=opts)
    optim = get_optimizer_state_dict(t.model, t.optimizer, options=opts)
    if not env.main:
        return None
    _make_shadow(t)
    t.shadow.load_state_dict(weights)
    return optim


def _make_shadow(t: Trainee) -> None:
    """Build ``t.shadow`` (once), on the device of ``t.model``'s local shards."""
    if t.shadow is None:
        from .factory import build_model

        device = next(iter(t.model.parameters())).device
        t.shadow = build_model(t.spec, **t.model_args).to(device)


def _load_sharded(t: Trainee, weights: Path, optimizer_state: dict, device: torch.device) -> None:
    """Set a sharded trainee's weights from a checkpoint file and its optimizer from a whole state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _make_shadow(t)
    ckpt.load_weights(t.shadow, weights, device)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(t.model, t.shadow.state_dict(), options=opts)
    set_optimizer_state_dict(t.model, t.optimizer, optimizer_state, options=opts)


def _reduced(stats: RunningStats, env: DistEnv) -> RunningStats:
    """``stats`` summed over the processes (seconds: their mean); ``stats`` itself for one process."""
    if not env.active:
        return stats
    keys = sorted(stats.sums)
    total = all_sum(env, [stats.loss_sum, stats.items, stats.timed, stats.seconds, *(stats.sums[k] for k in keys)])
    out = RunningStats()
    out.loss_sum, out.items, out.timed = total[0], int(total[1]), int(total[2])
    out.seconds = total[3] / env.world
    out.sums = dict(zip(keys, total[4:]))
    return out


MOE_COLUMNS = ("aux_loss", "load_cv", "min_expert_share", "min_weight_share", "dropped_share", "zero_expert_share")
"""The metrics columns of a model with mixture-of-experts layers (:func:`_moe_row`)."""


def _moe_row(t: Trainee, step: int, running: RunningStats | None = None) -> dict:
    """The MoE columns of a metrics row: the mean auxiliary loss per item over the epoch so far
    (the window of ``train_loss``), and from the training steps since the last evaluation the
    mean over layers of the load's coefficient of variation,
    the least-loaded expert's share of the assignments (smallest over layers), the smallest share
    of the routing weight any expert received (the gate's balance, which is what a dense router's
    is measured by), the share of
    assignments dropped by a capacity, and the share of tokens no expert took. The per-expert
    shares go to ``expert_load.csv`` in the run directory (one row per layer and expert). The
    load counters restart after each evaluation. Empty for a model without MoE layers. ``running``:
    the epoch's sums to use instead of ``t.stats`` (those reduced over the processes)."""
    layers = moe_layers(t.model)
    stats = layers.stats()
    if not stats["layers"]:
        return {}
    s = stats["all"]
    running = t.stats if running is None else running
    items = running.items
    row = {"aux_loss": running.total("aux_loss") / items if items else float("nan"), "load_cv": s["load_cv"],
           "min_expert_share": s["min_share"], "min_weight_share": s["min_weight_share"],
           "dropped_share": s["dropped_share"],
           "zero_expert_share": s["zero_expert_share"]}
    if t.run_dir is not None and s["assignments"]:
        path = t.run_dir / "expert_load.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "layer", "expert", "share"])
            for name, layer in stats["layers"].items():
                for e, share in enumerate(layer["load_share"]):
                    w.writerow([step, name, e, f"{share:.6g}"])
    t.expert_load = {name: list(layer["load_share"]) for name, layer in stats["layers"].items()}
    layers.reset()
    return row


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _resume(t: Trainee, steps_per_epoch: int, device: torch.device, env: DistEnv = SINGLE) -> dict:
    """Load trainee ``t`` from the newest snapshot of its run directory that verifies against its
    manifest, warning about (and skipping) each newer one that does not; returns the position."""
    run_dir = t.run_dir
    snapshots = ckpt.list_snapshots(run_dir)
    if not snapshots:
        return _resume_state_file(t, steps_per_epoch, device, env)
    problems = []
    for _, folder in snapshots:
        try:
            ckpt.verify_snapshot(folder)
            state = ckpt.load_state(folder / ckpt.STATE_FILE)
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            problems.append(str(e))
            _warn(f"skipping snapshot {folder.name}: {e}")
            continue
        if problems:
            _warn(f"falling back to the older snapshot {folder.name}")
        return _restore(t, state, folder / ckpt.MODEL_FILE, steps_per_epoch, device, env)
    raise ConfigError(f"--resume {str(run_dir)!r}: no snapshot under {ckpt.SNAPSHOT_DIR}/ is complete and intact: "
                      + "; ".join(problems))


def _resume_state_file(t: Trainee, steps_per_epoch: int, device: torch.device, env: DistEnv = SINGLE) -> dict:
    """A run directory without snapshots (written before they existed): ``state.pt`` and
    ``last.safetensors`` of the same evaluation."""
    state_path = t.run_dir / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"--resume {str(t.run_dir)!r}: no checkpoint there (no {ckpt.SNAPSHOT_DIR}/step-*/ "
                          f"snapshot and no {STATE_FILE}; not a run directory, or it never saved one)")
    try:
        state = ckpt.load_state(state_path)
        step = ckpt.read_checkpoint_metadata(t.run_dir / "last.safetensors").get("step")
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"--resume {str(t.run_dir)!r}: {e}") from e
    position = state.get("position", {}) if isinstance(state.get("position"), dict) else {}
    if state.get("version") == STATE_VERSION and step != position.get("global_step"):
        raise ConfigError(f"--resume {str(t.run_dir)!r}: {STATE_FILE} is of step {position.get('global_step')} "
                          f"but last.safetensors of step {step}, and there is no snapshot under "
                          f"{ckpt.SNAPSHOT_DIR}/")
    return _restore(t, state, t.run_dir / "last.safetensors", steps_per_epoch, device, env)


def _restore(t: Trainee, state: dict, weights: Path, steps_per_epoch: int, device: torch.device,
             env: DistEnv = SINGLE) -> dict:
    """Set trainee ``t`` to a loaded training ``state`` and the weights in ``weights``; returns the position."""
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"--resume {str(t.run_dir)!r}: the training state has format {state.get('version')} "
                          f"(gatezoo 0.1.0 wrote format 1); this version reads format {STATE_VERSION}")
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(f"--resume: the run had {state['steps_per_epoch']} steps per epoch, this config gives "
                          f"{steps_per_epoch} (batch_size, accum_steps or data changed)")
    try:
        if t.sharded:
            _load_sharded(t, weights, state["optimizer"], device)
        else:
            ckpt.load_weights(t.model, weights, device)
    except ckpt.CheckpointError as e:  # verified, so the model differs (model_args overridden?)
        raise ConfigError(f"--resume: {e}") from e
    try:
        if not t.sharded:
            t.optimizer.load_state_dict(state["optimizer"])
        if t.scheduler is not None:
            t.scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:  # parameter groups of another optimizer setup
        raise ConfigError(f"--resume {str(t.run_dir)!r}: the saved optimizer or schedule does not fit this "
                          f"config ({type(e).__name__}: {e})") from e
    running = state.get("running_ranks")
    same_world = env.active and running is not None and len(running) == env.world
    t.stats.load_state_dict(running[env.rank] if same_world else state["running"])
    if env.active and not same_world and env.rank > 0:
        t.stats.reset()  # rank 0 carries the sums saved by a run with another number of processes
    t.best, t.items, t.seconds = state["best"], state["items"], state["seconds"]
    rngs = state.get("rng_ranks")
    if same_world and rngs is not None:
        ckpt.set_rng_state(rngs[env.rank])
    else:
        if env.active and env.rank > 0:
            _warn(f"the snapshot holds no RNG state for rank {env.rank} of {env.world} (saved by another number "
                  f"of processes): dropout and noisy routers continue from rank 0's")
        ckpt.set_rng_state(state["rng"])
    step = state["position"]["global_step"]
    # rows (and expert loads) that a run killed after its evaluation but before its snapshot wrote
    t.rows = [r for r in read_metrics(t.run_dir / "metrics.csv") if r.get("step", 0) <= step]
    if env.main:
        _trim_expert_load(t.run_dir / "expert_load.csv", step)
    return dict(state["position"])


def _trim_expert_load(path: Path, step: int) -> None:
    """Drop the rows of ``expert_load.csv`` written after ``step`` (by a run that stopped before
    saving its snapshot), and any row a crash left incomplete, so that a resumed run does not
    write them twice."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if len(r) == 4 and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) != len(rows):
        with ckpt.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def _metadata(task, t: Trainee, pos: dict, steps_per_epoch: int, metrics: dict | None = None) -> dict:
    """The metadata of a checkpoint of ``t`` at ``pos`` (``metrics``: the evaluation there, if any)."""
    step = pos["global_step"]
    meta = {"model": t.spec, "model_args": t.model_args, "task": task.checkpoint_info(),
            "epoch": step / steps_per_epoch, "step": step}
    if metrics is not None:
        meta["metrics"] = metrics
    return {**meta, "gatezoo_version": _version()}


def _snapshot(t: Trainee, pos: dict, steps_per_epoch: int, meta: dict, ranks: dict | None = None,
              optim: dict | None = None) -> None:
    """The resumable snapshot of ``t`` at ``pos`` (see :func:`gatezoo.train.core.checkpoint.save_snapshot`);
    ``ranks``: ``{"rng": [...], "running": [...]}``, every process's RNG state and running sums in
    rank order, for a distributed run; ``optim``: the whole optimizer state of a sharded trainee
    (from :func:`_whole`)."""
    state = {"version": STATE_VERSION, "position": dict(pos), "steps_per_epoch": steps_per_epoch, "best": t.best,
             "items": t.items, "seconds": t.seconds,
             "optimizer": t.optimizer.state_dict() if optim is None else optim,
             "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
             "running": t.stats.state_dict(), "rng": ckpt.rng_state()}
    if ranks is not None:
        state["rng_ranks"], state["running_ranks"] = ranks["rng"], ranks["running"]
    ckpt.save_snapshot(t.run_dir, t.whole_model, meta, state, pos["global_step"])


def _save(task, t: Trainee, row: dict, ev: dict, pos: dict, steps_per_epoch: int, title: str,
          scheduled: bool = True, ranks: dict | None = None, optim: dict | None = None) -> None:
    """At an evaluation: ``last`` (and ``best``), ``metrics.csv``, ``curves.png``, then the snapshot."""
    meta = _metadata(task, t, pos, steps_per_epoch, ev)
    ckpt.save_checkpoint(t.whole_model, t.run_dir / "last.safetensors", meta)
    if scheduled and ev[task.score] > t.best:
        t.best = ev[task.score]
        ckpt.save_checkpoint(t.whole_model, t.run_dir / "best.safetensors", meta)
    write_metrics(t.rows, t.run_dir / "metrics.csv")
    plot_curves(t.rows, t.run_dir / "curves.png", task.curves, title=title)
    _snapshot(t, pos, steps_per_epoch, meta, ranks, optim)


def _version() -> str:
    try:
        from gatezoo import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__


def steps_per_epoch(task, accum_steps: int = 1) -> int:
    """Optimizer steps in one epoch of ``task``: its batches in groups of ``accum_steps``."""
    return math.ceil(len(task.train_batches) / accum_steps)


def fit(task, trainees: Sequence[Trainee], *, epochs: int, device: torch.device, bf16: bool = False,
        grad_clip: float | None = None, accum_steps: int = 1, max_steps: int | None = None,
        resume: bool = False, progress: bool = True, title: str = "", eval_every: int | None = None,
        on_eval: Callable[[list[tuple[Trainee, dict]]], None] | None = None,
        checkpoint_every: int | None = None, nonfinite: str = "stop", env: DistEnv = SINGLE,
        on_start: Callable[[], None] | None = None) -> dict:
    """Train every trainee on ``task`` for ``epochs`` epochs (or until ``max_steps`` optimizer steps).

    Each trainee's schedule must already span the run (:func:`steps_per_epoch` times ``epochs``
    steps). ``eval_every`` adds an evaluation (with its metrics row and checkpoints) every that many
    optimizer steps inside an epoch, beside the one at each epoch's end. Every evaluation saves a
    snapshot of each trainee that has a ``run_dir``; ``checkpoint_every`` saves one every that many
    optimizer steps between evaluations as well (no evaluation, no metrics row). ``resume``
    continues a single trainee from the newest intact snapshot of its ``run_dir`` (falling back to
    the older one, with a warning, when the newest is incomplete or damaged), mid-epoch included;
    the result equals an uninterrupted run's. ``on_eval`` receives the list of ``(trainee, row)``
    after each evaluation, before the epoch's running sums restart. The evaluation where
    ``max_steps`` stops a run between scheduled ones writes its row, ``last`` and a snapshot, but
    does not compete for ``best`` and does not reach ``on_eval``, so a resumed run ends like an
    uninterrupted one. ``nonfinite`` (:data:`NONFINITE`): at a non-finite training loss (or
    gradient norm, with ``grad_clip``) raise ``FloatingPointError`` naming the step (``"stop"``)
    or skip that optimizer step with a warning (``"skip"``); either way no update with non-finite
    values is applied, so no checkpoint holds them. ``env``: this process's place in a
    distributed run (:mod:`gatezoo.train.core.distributed`; each trainee's ``net`` wrapped for it): every
    process steps on its share of each batch, and only rank 0 evaluates, logs and writes.
    ``on_start`` is called on every process once the run is accepted (the options checked and,
    with ``resume``, the trainee restored), before the first step: the place for a command to
    write its config, so that a refused resume leaves the run directory as it was.
    Returns the position reached:
    ``{"epoch", "step_in_epoch", "global_step", "elapsed", "stopped"}``.
    """
    if not trainees:
        raise ValueError("fit needs at least one trainee")
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ConfigError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    for name, every in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"{name} must be a positive integer (or null), got {every!r}")
    try:
        ckpt.faults()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if grad_clip is not None and not grad_clip > 0:
        raise ConfigError(f"grad_clip must be > 0 (or null for none), got {grad_clip!r}")
    if nonfinite not in NONFINITE:
        raise ConfigError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    per_epoch = steps_per_epoch(task, accum_steps)
    pos = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "elapsed": 0.0}
    if resume:
        if len(trainees) != 1 or trainees[0].run_dir is None:
            raise ValueError("resume continues one trainee with a run directory")
        pos.update(_resume(trainees[0], per_epoch, device, env))
    if on_start is not None:
        on_start()
    progress = progress and env.main
    log = (tqdm.write if progress else print) if env.main else (lambda *a, **k: None)
    if resume:
        log(f"resuming {trainees[0].run_dir} at epoch {pos['epoch'] + 1}, step {pos['global_step']}")
    start_time, elapsed0 = time.perf_counter(), pos["elapsed"]
    stopped = max_steps is not None and pos["global_step"] >= max_steps
    process_steps = 0
    for t in trainees:
        t.model.train()
    def evaluate_all(finished_epoch: bool, scheduled: bool = True) -> None:
        evals = []
        optims = [_whole(t, env) for t in trainees]  # sharded trainees: gathered by every process
        for t in trainees:
            if not env.main:  # rank 0 evaluates alone; the others go on to the next step's collectives
                evals.append({})
                continue
            model = t.whole_model
            model.eval()
            try:
                with torch.no_grad(), autocast(device, bf16):
                    evals.append(task.evaluate(model))
            finally:
                model.train()
        pos["elapsed"] = elapsed0 + time.perf_counter() - start_time  # the evaluations included
        results = []
        for t, ev in zip(trainees, evals):
            running = _reduced(t.stats, env)
            if not env.main:
                moe_layers(t.model).reset()
                results.append((t, {}))
                continue
            train_metrics = task.train_metrics(running)
            row = {"epoch": pos["global_step"] / per_epoch, "step": pos["global_step"], "train_loss": running.loss,
                   **train_metrics, **ev, **_moe_row(t, pos["global_step"], running), "lr": t.lr,
                   f"{task.unit}_per_s": running.rate, "seconds": pos["elapsed"]}
            t.rows.append(row)
            t.last = ev
            log(f"epoch {row['epoch']:.4g}" + (f" {t.spec}" if len(trainees) > 1 else "") + ": train loss "
                f"{row['train_loss']:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in train_metrics.items())
                + " | " + " ".join(f"{k} {v:.4f}" for k, v in ev.items())
                + f" | {row[f'{task.unit}_per_s']:.0f} {task.unit}/s")
            results.append((t, row))
        if on_eval is not None and scheduled and env.main:
            on_eval(results)
        if finished_epoch:
            pos["epoch"] += 1
            pos["step_in_epoch"] = 0
        for t, _ in results:
            # the counters restart with the epoch; the saved state then resumes into a fresh one
            if finished_epoch:
                t.items += t.stats.timed
                t.seconds += t.stats.seconds
                t.stats.reset()
        ranks = _per_rank()
        for i, ((t, row), optim) in enumerate(zip(results, optims)):
            if t.run_dir is not None and env.main:
                _save(task, t, row, t.last, pos, per_epoch, title, scheduled, _of(ranks, i), optim)

    def _per_rank() -> list | None:
        """Every process's RNG state and running sums (one per trainee), for a distributed snapshot."""
        return gather_objects(env, (ckpt.rng_state(), [t.stats.state_dict() for t in trainees])) if env.active else None

    def _of(ranks: list | None, i: int) -> dict | None:
        return None if ranks is None else {"rng": [r[0] for r in ranks], "running": [r[1][i] for r in ranks]}

    def snapshot_all() -> None:
        pos["elapsed"] = elapsed0 + time.perf_counter() - start_time
        ranks = _per_rank()
        for i, t in enumerate(trainees):
            optim = _whole(t, env)
            if t.run_dir is not None and env.main:
                _snapshot(t, pos, per_epoch, _metadata(task, t, pos, per_epoch), _of(ranks, i), optim)

    while pos["epoch"] < epochs and not stopped:
        epoch, start = pos["epoch"], pos["step_in_epoch"]
        batches = task.train_batches.epoch(epoch, start * accum_steps)
        bar = tqdm(_groups(batches, accum_steps), total=per_epoch, initial=start, disable=not progress,
                   desc=f"epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True, leave=False)
        for group in bar:
            n = len(trainees)
            for k in range(n):
                t = trainees[(pos["global_step"] + k) % n]
                _step(task, t, group, device, bf16, grad_clip, timed=process_steps > 0, env=env, nonfinite=nonfinite,
                      step=pos["global_step"])
            process_steps += 1
            pos["step_in_epoch"] += 1
            pos["global_step"] += 1
            ckpt.fault("kill-at-step", pos["global_step"])  # a testing aid: GATEZOO_FAULT
            if pos["step_in_epoch"] % 10 == 0 or pos["step_in_epoch"] == per_epoch:
                if n == 1:
                    bar.set_postfix_str(f"loss={trainees[0].stats.loss:.4f} {task.unit}/s={trainees[0].stats.rate:.0f}",
                                        refresh=False)
                else:
                    bar.set_postfix_str(" ".join(f"{t.spec}={t.stats.loss:.3f}" for t in trainees), refresh=False)
            if max_steps is not None and pos["global_step"] >= max_steps:
                stopped = True
                break
            if eval_every and pos["global_step"] % eval_every == 0 and pos["step_in_epoch"] < per_epoch:
                evaluate_all(finished_epoch=False)
            elif (checkpoint_every and pos["global_step"] % checkpoint_every == 0
                  and pos["step_in_epoch"] < per_epoch):
                snapshot_all()
        bar.close()

        finished = pos["step_in_epoch"] >= per_epoch
        # an evaluation only because max_steps stopped the run is not one of the run's own: it
        # writes its row, last and its snapshot, but neither competes for best nor reaches on_eval,
        # so a resumed run ends with the same best checkpoint as an uninterrupted one
        evaluate_all(finished_epoch=finished,
                     scheduled=finished or bool(eval_every and pos["global_step"] % eval_every == 0))
    return {**pos, "stopped": stopped}
