"""Free agents on a drifting stream: RLFA ("Free Agent in Agent-Based Mixture-of-Experts Generative
AI Framework", 2025) against a static roster and ADWIN-triggered retraining.

    python -m gatezoo.train.free_agents --stream fraud                 # RLFA on the fraud stream
    python -m gatezoo.train.free_agents --stream fraud --method static # no free agency
    python -m gatezoo.train.free_agents --stream fraud --method adwin  # river's ADWIN -> retrain
    python -m gatezoo.train.free_agents --stream fashion               # Fashion-MNIST with label drift
    python -m gatezoo.train.free_agents --stream fraud-nodrift         # no drift: no release expected

**Streams** (``stream``; :func:`make_stream`), ``windows`` windows of ``window_size`` examples,
seeded, with known drift points:

- ``fraud``: 10 Gaussian features; an example is fraud with probability
  ``sigmoid(4 (w . x) - 9)`` (about 3% fraud) for a unit *pattern* w. The pattern jumps to an
  orthogonal one at ``windows // 3`` (abrupt drift). From ``2 windows // 3`` on, a third pattern
  takes over gradually over 6 windows (each example from the new pattern with a probability
  rising linearly: gradual drift). Scored by fraud recall.
- ``fashion``: Fashion-MNIST images, labels 0-5 only at first; at ``windows // 3`` the labels of
  the pairs (0, 1) and (2, 3) swap; at ``2 windows // 3`` classes 6-9 appear. Scored by accuracy.
- ``fraud-nodrift`` and ``fashion-nodrift``: the first concept throughout.

Prequential: each window is first predicted (the scores), then learnt from.

**The roster** (``agents`` K): each agent is a small gated MoE classifier
(``Linear -> gatezoo.blocks.MoEFeedForward (top-k router) -> Linear``). An *allocation gate*
(softmax over agents, linear in the input) mixes their class probabilities. After each window,
every agent and the gate take ``epochs`` epochs of Adam on it (class-weighted cross-entropy on the
fraud stream).

**Reward** (the paper's form), per agent and window:

    R = alpha * score + beta * synergy + gamma * efficiency - delta * penalty

``score``: the agent's own recall / accuracy; ``synergy``: the share that the roster gets right
and the agent agrees with; ``penalty``: the share the agent gets confidently wrong (probability
of a wrong class > 0.9) -- each over the window's examples weighted by the gate's probability of
the agent (an agent answers for what the gate gives it); ``efficiency``: the share of the window
the gate sends mostly to this agent. Default weights alpha 1, beta 0.2, gamma 0.1, delta 0.5.

**Free agency** (``method: rlfa``). A pool of ``free_agents`` agents trains every window on the
last ``recent`` windows only (one of them is re-initialised every ``recent`` windows, so the
pool never carries an old concept for long). An agent whose reward stays below
``release_ratio`` times its *reference* (its mean reward over its last ``memory`` windows) for
``patience`` consecutive windows is *released*: the free agent that would have earned the best
reward in its slot (same gate, same team mates) enters *probation* beside it for ``probation``
windows, predicting without deciding and learning each window. If its mean reward in the slot
over probation beats the incumbent's, it takes the slot; otherwise the incumbent stays and its
watch restarts.

**Baselines.** ``static``: the same roster, learning online, never replaced. ``adwin``: river's
ADWIN (``delta`` = ``adwin_delta``) watches the roster's per-example error; on a detection of a
*rise* of the error (ADWIN flags any change of its mean; a fall, as the roster learns, is no
reason to retrain) the whole roster and gate are re-initialised and trained on the last
``recent`` windows.

Each run writes ``<out>/<stream>-<method>-<timestamp>/`` with ``windows.csv`` (per window: the
roster's score, the agents' rewards, the events), ``events.csv``, ``result.json`` (per drift: the
pre-drift level, the windows until the score is back to ``recover_ratio`` of it; the mean score;
releases, replacements, ADWIN detections) and ``history.png`` (the score against the windows, the
drift points and the events).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks import MoEFeedForward

from .core.checkpoint import write_text
from .core.config import KEYS, ConfigError, Key, command_parser, dump_config, parse_command
from .core.loop import write_metrics
from .core.runs import new_run_dir
from .data.images import DataFormatError, DataNotFoundError, derive_seed, load_dataset

STREAMS = ("fraud", "fashion", "fraud-nodrift", "fashion-nodrift")
"""The streams of :func:`make_stream`."""
METHODS = ("rlfa", "static", "adwin")

FREE_AGENT_KEYS: dict[str, Key] = {
    "stream": Key("fraud", "str", "fraud, fashion, or either with -nodrift", choices=STREAMS),
    "method": Key("rlfa", "str", "rlfa (free agents), static (no free agency) or adwin (retrain on an ADWIN "
                  "detection)", choices=METHODS),
    "data": KEYS["data"],
    "windows": Key(60, "int", "windows in the stream", minimum=6),
    "window_size": Key(1000, "int", "examples per window (fraud: about 30 frauds each)", minimum=10),
    "agents": Key(3, "int", "agents on the roster K", minimum=1),
    "experts": Key(4, "int", "experts in each agent's MoE", minimum=2),
    "hidden": Key(32, "int", "agents' hidden width", minimum=2),
    "epochs": Key(2, "int", "epochs of Adam on each window", minimum=1),
    "lr": Key(3e-3, "float", "Adam learning rate", minimum=0.0),
    "batch_size": Key(64, "int", "batch size", minimum=1),
    "free_agents": Key(2, "int", "rlfa: free agents in the pool", minimum=1),
    "recent": Key(3, "int", "windows a free agent (and an ADWIN retrain) learns from", minimum=1),
    "memory": Key(5, "int", "rlfa: windows of an agent's reference reward", minimum=1),
    "release_ratio": Key(0.8, "float", "rlfa: release when the reward stays below this share of the reference",
                         minimum=0.0),
    "patience": Key(3, "int", "rlfa: consecutive windows below before a release", minimum=1),
    "probation": Key(3, "int", "rlfa: windows a free agent shadows the incumbent", minimum=1),
    "alpha": Key(1.0, "float", "reward weight of the score", minimum=0.0),
    "beta": Key(0.2, "float", "reward weight of the synergy", minimum=0.0),
    "gamma": Key(0.1, "float", "reward weight of the efficiency", minimum=0.0),
    "delta": Key(0.5, "float", "reward weight of the penalty", minimum=0.0),
    "adwin_delta": Key(0.002, "float", "adwin: ADWIN's confidence delta", minimum=0.0),
    "recover_ratio": Key(0.9, "float", "recovered when the score is back to this share of the pre-drift level",
                         minimum=0.0),
    "seed": KEYS["seed"],
    "out": KEYS["out"],
    "name": KEYS["name"],
    "threads": Key(1, "int", "torch threads", minimum=1),
    "progress": KEYS["progress"],
}


# --------------------------------------------------------------------------------------------
# streams


@dataclass
class Stream:
    """Windows of features ``x`` (T, W, d) and labels ``y`` (T, W), the drift points (window
    indices), the number of classes and the metric (``recall``: of class 1; ``accuracy``)."""

    x: torch.Tensor
    y: torch.Tensor
    drifts: list[int]
    classes: int
    metric: str
    name: str = ""
    events: list[str] = field(default_factory=list)


def _unit(rng: np.random.Generator, d: int, against: list[np.ndarray] = ()) -> np.ndarray:
    v = rng.standard_normal(d)
    for a in against:  # Gram-Schmidt: a pattern orthogonal to the earlier ones
        v -= (v @ a) * a
    return v / np.linalg.norm(v)


def fraud_stream(windows: int, size: int, seed: int, drift: bool = True, d: int = 10) -> Stream:
    """The synthetic fraud stream (see the module docstring): abrupt drift at ``windows // 3``,
    gradual drift over 6 windows from ``2 windows // 3`` (none when ``drift`` is False)."""
    rng = np.random.default_rng(derive_seed(seed, 0xF4A0D))
    w = [_unit(rng, d)]
    w.append(_unit(rng, d, w))
    w.append(_unit(rng, d, w))
    abrupt, gradual, span = windows // 3, 2 * windows // 3, 6
    xs, ys = [], []
    for t in range(windows):
        x = rng.standard_normal((size, d))
        if not drift or t < abrupt:
            concept = np.zeros(size, dtype=int)
        elif t < gradual:
            concept = np.ones(size, dtype=int)
        else:
            share = min(1.0, (t - gradual + 1) / span)
            concept = np.where(rng.random(size) < share, 2, 1)
        z = np.einsum("nd,nd->n", x, np.stack(w)[concept])
        y = (rng.random(size) < 1 / (1 + np.exp(-(4 * z - 9)))).astype(np.int64)
        xs.append(x)
        ys.append(y)
    return Stream(torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(np.stack(ys)),
                  [abrupt, gradual] if drift else [], 2, "recall", "fraud" if drift else "fraud-nodrift")


def fashion_stream(windows: int, size: int, seed: int, data: str, drift: bool = True) -> Stream:
    """Fashion-MNIST windows (see the module docstring): classes 0-5; at ``windows // 3`` the
    labels of (0, 1) and (2, 3) swap; at ``2 windows // 3`` classes 6-9 appear."""
    ds = load_dataset(data)
    if ds.num_classes != 10:
        raise DataFormatError(f"{ds.name}: the fashion stream needs 10 classes, got {ds.num_classes}")
    rng = np.random.default_rng(derive_seed(seed, 0xFA5))
    labels = ds.train_labels.numpy()
    mean, std = ds.mean_std()
    first, second = windows // 3, 2 * windows // 3
    swap = np.arange(10)
    swap[[0, 1, 2, 3]] = [1, 0, 3, 2]
    xs, ys = [], []
    for t in range(windows):
        allowed = np.arange(10) if drift and t >= second else np.arange(6)
        pool = np.flatnonzero(np.isin(labels, allowed))
        idx = rng.choice(pool, size, replace=len(pool) < size)
        x = (ds.train_images[idx].float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(
            1, -1, 1, 1)
        y = labels[idx]
        if drift and t >= first:
            y = swap[y]
        xs.append(x.flatten(1))
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    return Stream(torch.stack(xs), torch.stack(ys), [first, second] if drift else [], 10, "accuracy",
                  "fashion" if drift else "fashion-nodrift")


def make_stream(cfg: Mapping) -> Stream:
    """The stream of ``cfg``."""
    name = cfg["stream"]
    if name.startswith("fraud"):
        return fraud_stream(cfg["windows"], cfg["window_size"], cfg["seed"], drift=name == "fraud")
    return fashion_stream(cfg["windows"], cfg["window_size"], cfg["seed"], cfg["data"], drift=name == "fashion")


# --------------------------------------------------------------------------------------------
# agents


class Agent(nn.Module):
    """A gated MoE classifier: ``Linear(d, h) -> GELU -> MoEFeedForward(h; top-2 of experts) ->
    Linear(h, classes)``; :attr:`aux_loss` is the MoE's balance loss of the last forward."""

    def __init__(self, inputs: int, hidden: int, classes: int, experts: int):
        super().__init__()
        self.inp = nn.Linear(inputs, hidden)
        self.moe = MoEFeedForward(hidden, 2 * hidden, hidden, num_experts=experts, k=2, router="topk",
                                  backend="torch")
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        h = F.gelu(self.inp(x))
        return self.out(h + self.moe(h))

    @property
    def aux_loss(self) -> torch.Tensor:
        """The MoE's auxiliary loss of the last forward."""
        return self.moe.aux_loss


class Roster(nn.Module):
    """K agents and the allocation gate (softmax over agents, linear in the input); ``forward``
    returns the mixture's class probabilities, the agents' probabilities (B, K, C) and the gate
    (B, K)."""

    def __init__(self, agents: list[Agent], inputs: int):
        super().__init__()
        self.agents = nn.ModuleList(agents)
        self.gate = nn.Linear(inputs, len(agents))

    def forward(self, x: torch.Tensor):
        probs = torch.stack([a(x).softmax(-1) for a in self.agents], dim=1)
        gate = self.gate(x).softmax(-1)
        return (gate.unsqueeze(-1) * probs).sum(1), probs, gate


def _class_weights(y: torch.Tensor, classes: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=classes).float()
    w = torch.where(counts > 0, counts.sum() / (classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return w


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Mapping, classes: int, seed: int,
        opt: torch.optim.Optimizer) -> None:
    """``epochs`` epochs of ``opt`` on (x, y): the class-weighted NLL of a :class:`Roster`'s mixture
    (or cross-entropy of an :class:`Agent`), plus the MoE balance losses."""
    weight = _class_weights(y, classes)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg["epochs"]):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), cfg["batch_size"]):
            b = order[i:i + cfg["batch_size"]]
            if isinstance(model, Roster):
                mix, _, _ = model(x[b])
                loss = F.nll_loss(mix.clamp_min(1e-8).log(), y[b], weight=weight)
                loss = loss + sum(a.aux_loss for a in model.agents)
            else:
                loss = F.cross_entropy(model(x[b]), y[b], weight=weight) + model.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def score(pred: torch.Tensor, y: torch.Tensor, metric: str, weight: torch.Tensor | None = None) -> float:
    """Recall of class 1 (NaN without positives) or accuracy, each example counted with its
    ``weight`` (all 1 when None)."""
    w = torch.ones(len(y)) if weight is None else weight.float()
    hit = (pred == y).float()
    if metric == "recall":
        w = w * (y == 1).float()
    total = float(w.sum())
    return float((w * hit).sum()) / total if total > 0 else math.nan


def rewards(probs: torch.Tensor, gate: torch.Tensor, mix: torch.Tensor, y: torch.Tensor, metric: str,
            cfg: Mapping) -> list[dict]:
    """Each agent's reward parts and ``R`` on a window (see the module docstring). Score, synergy
    and penalty count each example with the gate's probability of the agent: an agent answers
    for what the gate gives it."""
    right = mix.argmax(-1) == y
    top = gate.argmax(-1)
    out = []
    for k in range(probs.shape[1]):
        g = gate[:, k].float()
        share = g / g.sum().clamp_min(1e-12)
        pred = probs[:, k].argmax(-1)
        s = score(pred, y, metric, g)
        s = 0.0 if math.isnan(s) else s
        synergy = float((share * ((pred == y) & right).float()).sum())
        efficiency = float((top == k).float().mean())
        wrong = probs[:, k].clone()
        wrong[torch.arange(len(y)), y] = 0
        penalty = float((share * (wrong.max(-1).values > 0.9).float()).sum())
        r = cfg["alpha"] * s + cfg["beta"] * synergy + cfg["gamma"] * efficiency - cfg["delta"] * penalty
        out.append({"score": s, "synergy": synergy, "efficiency": efficiency, "penalty": penalty, "reward": r})
    return out


def slot_reward(agent: Agent, k: int, x: torch.Tensor, y: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor,
                metric: str, cfg: Mapping) -> float:
    """The reward ``agent`` would have earned in roster slot k on this window: the same gate and
    the same team mates (``probs`` (B, K, C) of the roster), its own probabilities in slot k."""
    agent.eval()
    with torch.no_grad():
        p = probs.clone()
        p[:, k] = agent(x).softmax(-1)
    return rewards(p, gate, (gate.unsqueeze(-1) * p).sum(1), y, metric, cfg)[k]["reward"]


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class _Slot:
    """Free-agency state of one roster slot."""

    history: list[float] = field(default_factory=list)
    below: int = 0
    candidate: Agent | None = None
    candidate_opt: torch.optim.Optimizer | None = None
    trial: list[tuple[float, float]] = field(default_factory=list)  # (incumbent, candidate) rewards


def _new_agent(stream: Stream, cfg: Mapping, seed: int) -> Agent:
    torch.manual_seed(seed)
    return Agent(stream.x.shape[-1], cfg["hidden"], stream.classes, cfg["experts"])


def _adam(params, cfg):
    return torch.optim.Adam(params, lr=cfg["lr"])


def check_config(cfg: Mapping) -> None:
    """ConfigError for a run that cannot work: a probation or memory longer than the stream
    allows, more recent windows than the stream."""
    problems = []
    if cfg["probation"] + cfg["patience"] >= cfg["windows"] // 3:
        problems.append(f"probation ({cfg['probation']}) + patience ({cfg['patience']}) must be shorter than the "
                        f"{cfg['windows'] // 3} windows between drifts (windows // 3 = {cfg['windows'] // 3}): a "
                        f"free agent could never finish its probation before the next drift")
    if cfg["memory"] >= cfg["windows"] // 3:
        problems.append(f"memory ({cfg['memory']}) must be below windows // 3 = {cfg['windows'] // 3}")
    if cfg["recent"] > cfg["windows"]:
        problems.append(f"recent ({cfg['recent']}) must be <= windows ({cfg['windows']})")
    if problems:
        raise ConfigError("; ".join(problems))


def run_stream(cfg: Mapping, stream: Stream, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """The prequential run of ``cfg['method']`` on ``stream``: ``(window rows, events)``."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg["threads"])
    K, T = cfg["agents"], stream.x.shape[0]
    d = stream.x.shape[-1]
    roster = Roster([_new_agent(stream, cfg, derive_seed(cfg["seed"], 1, k)) for k in range(K)], d)
    opt = _adam(roster.parameters(), cfg)
    slots = [_Slot() for _ in range(K)]
    pool = [_new_agent(stream, cfg, derive_seed(cfg["seed"], 2, j)) for j in range(cfg["free_agents"])]
    pool_opts = [_adam(a.parameters(), cfg) for a in pool]
    adwin = None
    if cfg["method"] == "adwin":
        from river.drift import ADWIN

        adwin = ADWIN(delta=cfg["adwin_delta"])
    rows, events = [], []
    made = cfg["free_agents"]
    for t in tqdm(range(T), disable=not progress, desc=f"{stream.name} {cfg['method']}", unit="window"):
        x, y = stream.x[t], stream.y[t]
        roster.eval()
        with torch.no_grad():
            mix, probs, gate = roster(x)
        pred = mix.argmax(-1)
        row = {"window": t, "score": score(pred, y, stream.metric), "accuracy": float((pred == y).float().mean())}
        parts = rewards(probs, gate, mix, y, stream.metric, cfg)
        for k, p in enumerate(parts):
            row[f"reward{k}"] = p["reward"]
        here = []
        if cfg["method"] == "rlfa":
            for k, slot in enumerate(slots):
                r = parts[k]["reward"]
                if slot.candidate is not None:
                    slot.trial.append((r, slot_reward(slot.candidate, k, x, y, probs, gate, stream.metric, cfg)))
                    if len(slot.trial) >= cfg["probation"]:
                        inc = float(np.mean([a for a, _ in slot.trial]))
                        new = float(np.mean([b for _, b in slot.trial]))
                        if new > inc:
                            roster.agents[k] = slot.candidate
                            opt = _adam(roster.parameters(), cfg)
                            here.append({"window": t, "slot": k, "event": "replace", "incumbent": inc,
                                         "candidate": new})
                            slot.history = []
                        else:
                            here.append({"window": t, "slot": k, "event": "keep", "incumbent": inc,
                                         "candidate": new})
                        slot.candidate, slot.candidate_opt, slot.trial, slot.below = None, None, [], 0
                    continue
                reference = float(np.mean(slot.history[-cfg["memory"]:])) if len(slot.history) >= cfg["memory"] \
                    else None
                if reference is not None and r < cfg["release_ratio"] * reference:
                    slot.below += 1
                else:
                    slot.below = 0
                if slot.below >= cfg["patience"]:
                    cand = [slot_reward(a, k, x, y, probs, gate, stream.metric, cfg) for a in pool]
                    j = int(np.argmax(cand))
                    slot.candidate = copy.deepcopy(pool[j])
                    slot.candidate_opt = _adam(slot.candidate.parameters(), cfg)
                    slot.trial = []
                    here.append({"window": t, "slot": k, "event": "release", "incumbent": r,
                                 "candidate": cand[j]})
                else:
                    slot.history.append(r)
        if adwin is not None:
            detected = False
            for e in (pred != y).tolist():
                before = adwin.estimation
                adwin.update(float(e))
                # ADWIN flags any change of the mean error; only a rise calls for retraining
                detected = detected or (adwin.drift_detected and adwin.estimation > before)
            if detected:
                roster = Roster([_new_agent(stream, cfg, derive_seed(cfg["seed"], 3, t, k)) for k in range(K)], d)
                opt = _adam(roster.parameters(), cfg)
                lo = max(0, t - cfg["recent"] + 1)
                fit(roster, stream.x[lo:t + 1].flatten(0, 1), stream.y[lo:t + 1].flatten(), cfg, stream.classes,
                    derive_seed(cfg["seed"], 4, t), opt)
                here.append({"window": t, "slot": -1, "event": "adwin-retrain", "incumbent": math.nan,
                             "candidate": math.nan})
        # learn the window
        fit(roster, x, y, cfg, stream.classes, derive_seed(cfg["seed"], 5, t), opt)
        if cfg["method"] == "rlfa":
            lo = max(0, t - cfg["recent"] + 1)
            rx, ry = stream.x[lo:t + 1].flatten(0, 1), stream.y[lo:t + 1].flatten()
            if t % cfg["recent"] == 0 and t:  # refresh the oldest free agent
                j = (t // cfg["recent"]) % len(pool)
                pool[j] = _new_agent(stream, cfg, derive_seed(cfg["seed"], 2, made))
                pool_opts[j] = _adam(pool[j].parameters(), cfg)
                made += 1
            for j, a in enumerate(pool):
                fit(a, rx, ry, cfg, stream.classes, derive_seed(cfg["seed"], 6, t, j), pool_opts[j])
            for slot in slots:
                if slot.candidate is not None:
                    fit(slot.candidate, x, y, cfg, stream.classes, derive_seed(cfg["seed"], 7, t), slot.candidate_opt)
        row["events"] = " ".join(f"{e['event']}:{e['slot']}" for e in here)
        rows.append(row)
        events += here
    return rows, events


def recovery(rows: list[dict], drifts: list[int], ratio: float, before: int = 5, hold: int = 3) -> list[dict]:
    """Per drift: the pre-drift level (mean score over the ``before`` windows before it), the
    lowest score after it (until the next drift), and ``windows_to_recover``: from the drift to
    the first window, at or after the first dip below ``ratio`` of the level, that starts
    ``hold`` windows in a row at or above it (0 when the score never dips; NaN when it is not
    back before the next drift or the end)."""
    scores = np.array([r["score"] for r in rows], dtype=float)
    out = []
    ends = drifts[1:] + [len(rows)]
    for d, end in zip(drifts, ends):
        level = float(np.nanmean(scores[max(0, d - before):d]))
        after = scores[d:end]
        ok = ~(after < ratio * level)  # NaN (no positives in a window) counts as not a dip
        dips = np.flatnonzero(~ok)
        if len(dips) == 0:
            back = 0
        else:
            back = next((i for i in range(int(dips[0]), len(after) - hold + 1) if ok[i:i + hold].all()), None)
        out.append({"drift": d, "pre_level": level, "min_after": float(np.nanmin(after)),
                    "windows_to_recover": math.nan if back is None else back})
    return out


def plot_history(rows: list[dict], events: list[dict], drifts: list[int], path: Path, title: str,
                 metric: str) -> None:
    """The score against the windows, the drift points (dashed) and the events (markers)."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.plot([r["window"] for r in rows], [r["score"] for r in rows], "-", color="k", lw=1.2, label=metric)
    for d in drifts:
        ax.axvline(d, color="tab:red", ls="--", lw=1)
    marks = {"release": ("v", "tab:orange"), "replace": ("^", "tab:green"), "keep": ("o", "tab:gray"),
             "adwin-retrain": ("s", "tab:blue")}
    for kind, (m, c) in marks.items():
        w = [e["window"] for e in events if e["event"] == kind]
        if w:
            ax.plot(w, [1.03] * len(w), m, color=c, ls="none", label=kind)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("window")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="lower left", ncol=5)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def run(cfg: dict) -> dict:
    """One run: the stream, the method, the run directory; returns the result."""
    check_config(cfg)
    if cfg["method"] == "adwin":
        try:
            import river  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"method adwin needs river: pip install 'gatezoo[streams]' ({e})") from e
    t0 = time.perf_counter()
    stream = make_stream(cfg)
    run_dir = new_run_dir(cfg["out"], cfg["name"] or f"{cfg['stream']}-{cfg['method']}")
    write_text(run_dir / "config.yaml", dump_config(cfg, FREE_AGENT_KEYS))
    rows, events = run_stream(cfg, stream, progress=cfg["progress"])
    rec = recovery(rows, stream.drifts, cfg["recover_ratio"])
    result = {"stream": cfg["stream"], "method": cfg["method"], "seed": cfg["seed"], "metric": stream.metric,
              "mean_score": float(np.nanmean([r["score"] for r in rows])), "drifts": rec,
              "windows_to_recover": [r["windows_to_recover"] for r in rec],
              "releases": sum(e["event"] == "release" for e in events),
              "replacements": sum(e["event"] == "replace" for e in events),
              "adwin_detections": sum(e["event"] == "adwin-retrain" for e in events),
              "seconds": time.perf_counter() - t0, "run_dir": str(run_dir)}
    for i, r in enumerate(rec):
        result[f"recover{i}"] = r["windows_to_recover"]
    write_metrics(rows, run_dir / "windows.csv")
    if events:
        write_metrics(events, run_dir / "events.csv")
    plot_history(rows, events, stream.drifts, run_dir / "history.png",
                 f"{cfg['stream']} / {cfg['method']} (seed {cfg['seed']})", stream.metric)
    write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``; every key of :data:`FREE_AGENT_KEYS` as ``--key value``)."""
    return command_parser(
        "python -m gatezoo.train.free_agents",
        "RLFA free agents (release, probation, replacement of under-performing MoE agents) on a "
        "drifting stream, against a static roster and ADWIN-triggered retraining.",
        FREE_AGENT_KEYS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parse_command(parser, argv, FREE_AGENT_KEYS)
        result = run(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = ", ".join("never" if math.isnan(w) else str(int(w)) for w in result["windows_to_recover"]) or "no drift"
    print(f"{cfg['stream']} / {cfg['method']}: mean {result['metric']} {result['mean_score']:.4f}; windows to "
          f"recover after each drift: {rec}; releases {result['releases']}, replacements {result['replacements']}, "
          f"ADWIN detections {result['adwin_detections']} -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
