"""Federated mixtures of experts on Flower: FedJETs (Dun et al. 2023) against FedAvg and FedProx.

    python -m gatezoo.train.federated                                  # FedJETs, 50 clients x 2 classes
    python -m gatezoo.train.federated --method fedavg                  # FedAvg (+ local fine-tuning)
    python -m gatezoo.train.federated --method fedprox --fedprox_mu 0.01
    python -m gatezoo.train.federated --anchors false                  # ablation: no anchor clients
    python -m gatezoo.train.federated --gate_features random           # ablation: gate on a random embedding

Flower (``flwr``, the ``federated`` extra) is the engine: the clients are one Flower ``ClientApp``,
the rounds a Flower ``ServerApp`` with a message-API ``Strategy``, and the runs go through Flower's
simulation runtime (one virtual SuperNode per client, Ray actors). The same two apps run on real
machines: :mod:`gatezoo.train.federated_app` and docs/federated.md.

**Data.** Fashion-MNIST's training split is cut per class into a *seen* pool and ``unseen_images``
images per class for the unseen clients. ``partition: classes`` (default) gives each of the
``clients`` seen clients ``classes_per_client`` classes, every class used by the same number of
clients and its images split evenly among them; with ``anchors``, client e (e < experts) is the
*anchor* of expert e and holds the classes ``e * classes_per_client ...``, so ``experts *
classes_per_client`` may not exceed the 10 classes. ``partition: dirichlet`` splits each class
among the clients by Dirichlet(``alpha``) proportions (the anchor of expert e is then the client
with the largest share of that class group). ``unseen_clients`` clients are drawn the same way
from the held-out images, each cut into a *support* half (for fine-tuning, with labels; for
FedJETs' expert choice, without) and a *query* half (scored). The test split gives a global
accuracy.

**FedJETs** (``method: fedjets``; model :class:`gatezoo.models.fedmoe.FedMoE`):

1. ``common_rounds`` rounds of FedAvg train the *common expert* (an MLP classifier) on sampled
   clients; it is then frozen. ``gate_features: random`` skips this (the gate then reads the
   embedding of the common expert's seeded random initialisation: the ablation of the common
   expert).
2. ``rounds`` rounds of the mixture. Each round takes ``clients_per_round`` clients: with
   ``anchors_every_round`` (default), every anchor client and a sample of the others; without,
   a sample of all, so an anchor trains in about one round of ``clients / clients_per_round``.
   The server asks each (a Flower *query* message carrying the common expert and the gate) for
   the mean gate probabilities over its images, labels unused, and picks its ``top_k`` experts
   by that mean; an anchor client always gets its own expert and then the best others.
   The client receives only those experts and the gate, trains them for ``local_epochs`` on the
   mixture's negative log-likelihood (an anchor adds ``anchor_weight`` times the gate's
   cross-entropy towards its expert: what keeps the experts specialised), and sends them back.
   Each expert is averaged over the clients that trained it, the gate over all, weighted by
   their number of images.
3. Zero-shot on an unseen client: its support images (no labels) pick ``top_k`` experts by the
   mean gate probabilities, and the mixture of those scores its query images. No training.

**Baselines** (``method: fedavg`` / ``fedprox``): Flower's ``FedAvg`` / ``FedProx`` strategies
train a dense MLP whose hidden width gives the multiply-accumulates per image of a FedJETs client
(common expert, gate and ``top_k`` experts) for ``common_rounds + rounds`` rounds. The unseen
clients score the global model as it is (zero-shot), and after ``finetune_epochs`` epochs of SGD
on their labelled support images (``finetune_acc``: the personalised reference).

Every client trains by plain SGD (``lr``, ``batch_size``, seeded per client and round).

Each run writes ``<out>/<name or method>-<timestamp>/`` with ``config.yaml``, ``metrics.csv``
(per round: the clients' mean training loss, the global test accuracy), ``result.json``
(``zero_shot_acc`` mean and per unseen client, ``finetune_acc`` for the baselines,
``test_acc``, parameter counts, MACs per image, seconds), ``last.safetensors`` and, for FedJETs,
``routing.csv`` + ``routing.png`` (the gate's mean probability of each expert per test class).
``python -m gatezoo.train.result_summary RUN_DIR ... --group variant --metrics zero_shot_acc ...``
tabulates runs over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gatezoo.models.fedmoe import FedMoE, MLPClassifier, dense_hidden_for

from .core.checkpoint import atomic_path, write_text
from .core.config import KEYS, ConfigError, Key, command_parser, dump_config, parse_command
from .core.loop import write_metrics
from .core.runs import new_run_dir
from .data.images import DataFormatError, DataNotFoundError, derive_seed, load_dataset

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reports usage events unless told not to

METHODS = ("fedjets", "fedavg", "fedprox")
"""What the command trains (``method``)."""

FEDERATED_KEYS: dict[str, Key] = {
    "method": Key("fedjets", "str", "fedjets (the federated MoE), fedavg or fedprox (a dense MLP of equal "
                  "per-client compute)", choices=METHODS),
    "data": KEYS["data"],
    "clients": Key(50, "int", "seen clients (Flower SuperNodes)", minimum=2),
    "classes_per_client": Key(2, "int", "partition classes: classes of each client", minimum=1),
    "partition": Key("classes", "str", "classes (each client a few classes) or dirichlet (Dirichlet(alpha) "
                     "shares of every class)", choices=("classes", "dirichlet")),
    "alpha": Key(0.5, "float", "partition dirichlet: the concentration", minimum=0.0),
    "unseen_clients": Key(10, "int", "clients held out of training, scored zero-shot", minimum=1),
    "unseen_images": Key(1000, "int", "training images per class held out for the unseen clients", minimum=2),
    "experts": Key(5, "int", "fedjets: experts E", minimum=1),
    "top_k": Key(2, "int", "fedjets: experts a client runs", minimum=1),
    "hidden": Key(64, "int", "hidden width of the common expert and of each expert", minimum=1),
    "anchors": Key(True, "bool", "fedjets: anchor clients (client e trains expert e and its gate towards it)"),
    "anchor_weight": Key(1.0, "float", "fedjets: weight of the anchors' gate cross-entropy", minimum=0.0),
    "anchors_every_round": Key(True, "bool", "fedjets: every anchor client trains in every mixture round (within "
                               "clients_per_round); false: anchors are sampled like the others"),
    "gate_features": Key("common", "str", "fedjets: the gate reads the trained common expert's embedding "
                         "(common) or its random initialisation's (random; no common rounds)",
                         choices=("common", "random")),
    "common_rounds": Key(10, "int", "fedjets: FedAvg rounds of the common expert (baselines: added to rounds)",
                         minimum=0),
    "rounds": Key(30, "int", "rounds of the mixture (baselines: rounds + common_rounds)", minimum=1),
    "clients_per_round": Key(10, "int", "clients sampled per round", minimum=1),
    "local_epochs": Key(1, "int", "epochs of local SGD per round", minimum=1),
    "batch_size": Key(32, "int", "local SGD batch size", minimum=1),
    "lr": Key(0.05, "float", "local SGD learning rate", minimum=0.0),
    "fedprox_mu": Key(0.01, "float", "fedprox: the proximal term's mu", minimum=0.0),
    "finetune_epochs": Key(5, "int", "baselines: SGD epochs on an unseen client's labelled support images "
                           "(0: none)", minimum=0),
    "seed": KEYS["seed"],
    "out": KEYS["out"],
    "name": KEYS["name"],
    "threads": Key(1, "int", "torch threads per client process (and of the server)", minimum=1),
    "client_cpus": Key(1, "float", "CPUs Flower's simulation gives each client (Ray actors run on the rest)",
                       minimum=0.0),
    "progress": KEYS["progress"],
}


def check_config(cfg: Mapping, classes: int = 10) -> None:
    """ConfigError (every problem at once) for a federation of ``classes`` classes that cannot be
    built."""
    problems = []
    if cfg["clients_per_round"] > cfg["clients"]:
        problems.append(f"clients_per_round ({cfg['clients_per_round']}) must be <= clients ({cfg['clients']})")
    if cfg["classes_per_client"] > classes:
        problems.append(f"classes_per_client ({cfg['classes_per_client']}) must be <= the {classes} classes")
    if cfg["method"] == "fedjets":
        if cfg["top_k"] > cfg["experts"]:
            problems.append(f"top_k ({cfg['top_k']}) must be <= experts ({cfg['experts']})")
        if cfg["anchors"] and cfg["experts"] * cfg["classes_per_client"] > classes:
            problems.append(
                f"experts ({cfg['experts']}) x classes_per_client ({cfg['classes_per_client']}) must be <= the "
                f"{classes} classes: each anchor client holds a class group of its own (use fewer experts, fewer "
                f"classes per client, or anchors: false)")
        if cfg["anchors"] and cfg["experts"] > cfg["clients"]:
            problems.append(f"experts ({cfg['experts']}) must be <= clients ({cfg['clients']}): one anchor each")
        if cfg["anchors"] and cfg["anchors_every_round"] and cfg["experts"] > cfg["clients_per_round"]:
            problems.append(f"experts ({cfg['experts']}) must be <= clients_per_round ({cfg['clients_per_round']}) "
                            f"when every anchor trains in every round (or anchors_every_round: false)")
    if cfg["partition"] == "classes" and (cfg["clients"] * cfg["classes_per_client"]) % classes:
        problems.append(f"partition classes: clients x classes_per_client ({cfg['clients']} x "
                        f"{cfg['classes_per_client']}) must be a multiple of the {classes} classes, so that every "
                        f"class has the same number of clients")
    if (cfg["unseen_clients"] * cfg["classes_per_client"]) % classes:
        problems.append(f"unseen_clients x classes_per_client ({cfg['unseen_clients']} x "
                        f"{cfg['classes_per_client']}) must be a multiple of the {classes} classes")
    if cfg["partition"] == "dirichlet" and cfg["alpha"] <= 0:
        problems.append(f"alpha must be > 0 for partition dirichlet, got {cfg['alpha']}")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# partitions


def class_groups(classes: int, clients: int, per_client: int, rng: np.random.Generator,
                 fixed: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """The classes of each client: the ``fixed`` ones first, then random sets of ``per_client``
    distinct classes such that every class is held by ``clients * per_client / classes`` clients.
    ValueError when that is not an integer or the fixed groups overuse a class."""
    if (clients * per_client) % classes:
        raise ValueError(f"clients x per_client ({clients} x {per_client}) must be a multiple of classes ({classes})")
    uses = clients * per_client // classes
    left = np.full(classes, uses)
    for g in fixed:
        if len(g) != per_client:
            raise ValueError(f"fixed group {list(g)} must hold per_client = {per_client} classes")
        left[list(g)] -= 1
    if (left < 0).any():
        raise ValueError(f"the fixed groups use a class more than {uses} times")
    slots = np.repeat(np.arange(classes), left)
    for _ in range(1000):  # random slot orders until no client draws a class twice
        order = rng.permutation(slots).reshape(-1, per_client)
        if all(len(set(row)) == per_client for row in order):
            return [list(map(int, g)) for g in fixed] + [sorted(map(int, row)) for row in order]
    raise ValueError(f"could not give {clients} clients {per_client} distinct classes each")


def split_by_groups(labels: np.ndarray, pool: np.ndarray, groups: list[list[int]],
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``pool`` for each client: every class's images split evenly (shuffled) among the
    clients whose group holds it."""
    holders: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        for c in g:
            holders.setdefault(c, []).append(i)
    parts: list[list[np.ndarray]] = [[] for _ in groups]
    for c, owners in holders.items():
        idx = rng.permutation(pool[labels[pool] == c])
        for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def dirichlet_split(labels: np.ndarray, pool: np.ndarray, clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``pool`` for each client: each class split by proportions drawn from
    Dirichlet(alpha, ..., alpha); a client left with fewer than 2 images takes 2 from the
    largest."""
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels[pool]):
        idx = rng.permutation(pool[labels[pool] == c])
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].extend(chunk.tolist())
    for i in range(clients):
        while len(parts[i]) < 2:
            donor = max(range(clients), key=lambda j: len(parts[j]))
            parts[i].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@dataclass
class Federation:
    """The data of a run: uint8 images and labels of both splits, the seen clients' training
    indices, the anchor client of each expert, and the unseen clients' (support, query) indices."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor
    clients: list[np.ndarray]
    anchors: dict[int, int]  # client -> expert
    unseen: list[tuple[np.ndarray, np.ndarray]]

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float inputs (B, C * H * W) of uint8 images."""
        return ((images.float() / 255.0 - self.mean) / self.std).flatten(1)

    @property
    def num_inputs(self) -> int:
        """C * H * W."""
        return int(np.prod(self.train_images.shape[1:]))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


_FEDERATIONS: dict[str, Federation] = {}
_PARTITION_KEYS = ("method", "data", "clients", "classes_per_client", "partition", "alpha", "unseen_clients",
                   "unseen_images", "experts", "anchors", "seed")


def federation(cfg: Mapping) -> Federation:
    """The :class:`Federation` of ``cfg`` (cached per process: each client process builds it once)."""
    key = json.dumps({k: cfg[k] for k in _PARTITION_KEYS}, sort_keys=True)
    if key not in _FEDERATIONS:
        _FEDERATIONS[key] = _build_federation(cfg)
    fed = _FEDERATIONS[key]
    check_config(cfg, fed.num_classes)
    return fed


def _build_federation(cfg: Mapping) -> Federation:
    ds = load_dataset(cfg["data"])
    check_config(cfg, ds.num_classes)
    labels = ds.train_labels.numpy()
    rng = np.random.default_rng(derive_seed(cfg["seed"], 0xFED))
    seen, held = [], []
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) <= cfg["unseen_images"]:
            raise ConfigError(f"unseen_images ({cfg['unseen_images']}) must be below the {len(idx)} training images "
                              f"of class {c}")
        held.append(idx[:cfg["unseen_images"]])
        seen.append(idx[cfg["unseen_images"]:])
    seen_pool, held_pool = np.sort(np.concatenate(seen)), np.sort(np.concatenate(held))
    per, experts = cfg["classes_per_client"], cfg["experts"]
    use_anchors = cfg["method"] == "fedjets" and cfg["anchors"]
    anchors: dict[int, int] = {}
    if cfg["partition"] == "classes":
        fixed = [list(range(e * per, (e + 1) * per)) for e in range(experts)] if use_anchors else []
        groups = class_groups(ds.num_classes, cfg["clients"], per, rng, fixed)
        clients = split_by_groups(labels, seen_pool, groups, rng)
        anchors = {e: e for e in range(len(fixed))}
    else:
        clients = dirichlet_split(labels, seen_pool, cfg["clients"], cfg["alpha"], rng)
        if use_anchors:
            size = ds.num_classes // experts
            for e in range(experts):
                group = np.arange(e * size, (e + 1) * size)
                share = [np.isin(labels[c], group).mean() if len(c) else 0.0 for c in clients]
                free = [i for i in np.argsort(share)[::-1] if i not in anchors]
                anchors[int(free[0])] = e
    unseen_groups = class_groups(ds.num_classes, cfg["unseen_clients"], per, rng)
    unseen = []
    for idx in split_by_groups(labels, held_pool, unseen_groups, rng):
        idx = rng.permutation(idx)
        half = len(idx) // 2
        unseen.append((np.sort(idx[:half]), np.sort(idx[half:])))
    mean, std = ds.mean_std()
    return Federation(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels,
                      torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1), clients, anchors,
                      unseen)


# --------------------------------------------------------------------------------------------
# models and local training


def build_moe(cfg: Mapping) -> FedMoE:
    """The FedJETs model of ``cfg``, seeded."""
    fed = federation(cfg)
    torch.manual_seed(cfg["seed"])
    d, c = fed.num_inputs, fed.num_classes
    return FedMoE(MLPClassifier(d, cfg["hidden"], c), [MLPClassifier(d, cfg["hidden"], c)
                                                        for _ in range(cfg["experts"])])


def dense_hidden(cfg: Mapping) -> int:
    """The baselines' hidden width: the MACs per image of a FedJETs client running ``top_k``
    experts of ``cfg``."""
    fed = federation(cfg)
    return dense_hidden_for(fed.num_inputs, fed.num_classes, build_moe(cfg).macs(cfg["top_k"]))


def build_dense(cfg: Mapping) -> MLPClassifier:
    """The baselines' dense MLP, seeded."""
    fed = federation(cfg)
    hidden = dense_hidden(cfg)
    torch.manual_seed(cfg["seed"])
    return MLPClassifier(fed.num_inputs, hidden, fed.num_classes)


def _batches(fed: Federation, idx: np.ndarray, batch_size: int, generator: torch.Generator | None):
    order = torch.as_tensor(idx)
    if generator is not None:
        order = order[torch.randperm(len(order), generator=generator)]
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        yield fed.inputs(fed.train_images[b]), fed.train_labels[b]


def local_sgd(model: torch.nn.Module, loss_fn, fed: Federation, idx: np.ndarray, cfg: Mapping, epochs: int,
              seed: int, params=None, prox: Mapping[str, torch.Tensor] | None = None, mu: float = 0.0) -> float:
    """``epochs`` epochs of SGD (``cfg['lr']``, ``cfg['batch_size']``, order seeded by ``seed``)
    of ``loss_fn(model, x, y)`` over the images ``idx``, plus ``mu / 2 ||w - prox||^2`` when
    ``prox`` (FedProx). Returns the mean training loss of the last epoch."""
    params = list(model.parameters()) if params is None else list(params)
    opt = torch.optim.SGD(params, lr=cfg["lr"])
    named = dict(model.named_parameters())
    model.train()
    mean = math.nan
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(derive_seed(seed, epoch))
        total, count = 0.0, 0
        for x, y in _batches(fed, idx, cfg["batch_size"], g):
            loss = loss_fn(model, x, y)
            full = loss
            if prox is not None and mu > 0:
                full = loss + 0.5 * mu * sum(((named[k] - w) ** 2).sum() for k, w in prox.items())
            opt.zero_grad(set_to_none=True)
            full.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        mean = total / max(count, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(f"local training loss became {mean} (lower lr)")
    return mean


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def moe_loss(model: FedMoE, selected: Sequence[int], anchor: int, anchor_weight: float):
    """The client loss of FedJETs: the mixture's NLL over ``selected``, plus ``anchor_weight``
    times the gate's cross-entropy towards expert ``anchor`` (when ``anchor >= 0``)."""
    def loss(m, x, y):
        out = F.nll_loss(m(x, selected), y)
        if anchor >= 0 and anchor_weight > 0:
            target = torch.full_like(y, anchor)
            out = out + anchor_weight * F.cross_entropy(m.gate_logits(x), target)
        return out
    return loss


@torch.no_grad()
def mean_gate(model: FedMoE, fed: Federation, idx: np.ndarray, batch_size: int = 1000) -> torch.Tensor:
    """The gate's mean probabilities (E,) over the images ``idx`` (labels unused)."""
    model.eval()
    total = torch.zeros(model.num_experts, dtype=torch.float64)
    for x, _ in _batches(fed, idx, batch_size, None):
        total += model.gate_probs(x).double().sum(0)
    return (total / max(len(idx), 1)).float()


def choose_experts(gate: torch.Tensor, k: int, anchor: int = -1) -> list[int]:
    """The ``k`` experts of highest mean gate probability; an anchor's own expert comes first."""
    order = [int(e) for e in torch.argsort(gate, descending=True, stable=True)]
    if anchor >= 0:
        order = [anchor] + [e for e in order if e != anchor]
    return sorted(order[:k])


@torch.no_grad()
def accuracy(model, fed: Federation, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray | None = None,
             **kwargs) -> float:
    """Accuracy of ``model(x, **kwargs)`` over ``images[idx]`` (all when None)."""
    model.eval()
    idx = np.arange(len(labels)) if idx is None else idx
    hit = 0
    for i in range(0, len(idx), 1000):
        b = torch.as_tensor(idx[i:i + 1000])
        hit += int((model(fed.inputs(images[b]), **kwargs).argmax(-1) == labels[b]).sum())
    return hit / max(len(idx), 1)


# --------------------------------------------------------------------------------------------
# Flower: the client app


def _records():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    return ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


def _load(model: torch.nn.Module, arrays: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    state = model.state_dict()
    for k, v in arrays.items():
        if k.startswith(prefix):
            state[k[len(prefix):]].copy_(v)


def client_step(content, node_config: Mapping) -> dict:
    """What a client does with a message's content (``config``: the run's ``cfg`` as JSON, the
    ``task``, the round; ``arrays``): returns ``{"arrays": state or None, "metrics": {...}}``.

    Tasks: ``route`` (the mean gate probabilities over the client's images), ``common`` (SGD of
    the common expert), ``moe`` (SGD of the gate and the ``selected`` experts), ``dense`` (SGD of
    the baseline; FedProx's ``proximal-mu`` honoured)."""
    config = content["config"]
    cfg = json.loads(config["cfg"])
    torch.set_num_threads(cfg["threads"])
    fed = federation(cfg)
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(fed.clients):
        raise ValueError(f"partition-id {pid} is outside the {len(fed.clients)} clients of this run")
    idx = fed.clients[pid]
    task, rnd = str(config["task"]), int(config.get("server-round", 0))
    arrays = content["arrays"].to_torch_state_dict() if "arrays" in content else {}
    seed = derive_seed(cfg["seed"], rnd, pid)
    metrics = {"num-examples": len(idx), "partition-id": pid}
    if task == "route":
        model = build_moe(cfg)
        _load(model, arrays)
        metrics["gate"] = [float(v) for v in mean_gate(model, fed, idx)]
        metrics["anchor"] = fed.anchors.get(pid, -1)
        return {"arrays": None, "metrics": metrics}
    if task == "common":
        model = build_moe(cfg).common
        _load(model, arrays, "common.")
        metrics["train-loss"] = local_sgd(model, _ce, fed, idx, cfg, cfg["local_epochs"], seed)
        return {"arrays": {f"common.{k}": v for k, v in model.state_dict().items()}, "metrics": metrics}
    if task == "moe":
        model = build_moe(cfg)
        _load(model, arrays)
        selected = [int(e) for e in config["selected"]]
        anchor = fed.anchors.get(pid, -1) if cfg["anchors"] else -1
        params = [*model.gate.parameters(), *(p for e in selected for p in model.experts[e].parameters())]
        metrics["train-loss"] = local_sgd(model, moe_loss(model, selected, anchor, cfg["anchor_weight"]), fed, idx,
                                          cfg, cfg["local_epochs"], seed, params=params)
        keep = ("gate.", *(f"experts.{e}." for e in selected))
        return {"arrays": {k: v for k, v in model.state_dict().items() if k.startswith(keep)}, "metrics": metrics}
    if task == "dense":
        model = build_dense(cfg)
        _load(model, arrays)
        mu = float(config.get("proximal-mu", 0.0))
        prox = {k: v.detach().clone() for k, v in model.named_parameters()} if mu > 0 else None
        metrics["train-loss"] = local_sgd(model, _ce, fed, idx, cfg, cfg["local_epochs"], seed, prox=prox, mu=mu)
        return {"arrays": dict(model.state_dict()), "metrics": metrics}
    raise ValueError(f"unknown task {task!r}")


def _reply(msg, context):
    ArrayRecord, _, Message, MetricRecord, RecordDict = _records()
    out = client_step(msg.content, context.node_config)
    content = RecordDict({"metrics": MetricRecord(out["metrics"])})
    if out["arrays"] is not None:
        content["arrays"] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in out["arrays"].items()})
    return Message(content=content, reply_to=msg)


def make_client_app():
    """The Flower ``ClientApp``: train and query messages go to :func:`client_step`."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_reply)
    app.query()(_reply)
    return app


# --------------------------------------------------------------------------------------------
# Flower: the FedJETs strategy


def _average(states: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in states)
    keys = states[0][0].keys()
    return {k: sum(s[k].double() * (w / total) for s, w in states).float() for k in keys}


def make_fedjets_strategy(cfg: Mapping, log: list[dict]):
    """The FedJETs ``Strategy`` (Flower's message API) for ``cfg``; every round appends a row
    (round, phase, mean training loss, experts chosen) to ``log``."""
    from flwr.serverapp.strategy import Strategy

    ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict = _records()
    from flwr.app import MessageType

    class FedJETs(Strategy):
        """Phase 1 (``common_rounds``): FedAvg of the common expert. Phase 2: per round, a query
        of the sampled clients' mean gate probabilities, ``top_k`` experts sent to each (an
        anchor's own first), experts averaged over the clients that trained them, the gate over
        all."""

        def __init__(self):
            self.cfg = dict(cfg)
            self.common_rounds = cfg["common_rounds"] if cfg["gate_features"] == "common" else 0
            self.rng = random.Random(derive_seed(cfg["seed"], 0x5A3))
            self.sent: dict[int, list[int]] = {}
            self.anchor_of: dict[int, int] | None = None  # node -> anchor expert (-1), learnt from route replies

        def summary(self) -> None:
            pass

        def _sample(self, grid) -> list[int]:
            nodes = _wait_nodes(grid, self.cfg["clients"])
            return sorted(self.rng.sample(sorted(nodes), self.cfg["clients_per_round"]))

        def _route(self, grid, nodes, router, rnd) -> list:
            queries = [Message(content=RecordDict({"arrays": router, "config": self._config("route", rnd)}),
                               message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
            replies = list(grid.send_and_receive(queries))
            failed = [r for r in replies if r.has_error()]
            if failed:
                raise RuntimeError(f"round {rnd}: a client failed the route query: {failed[0].error.reason}")
            return replies

        def _moe_clients(self, grid, router, rnd) -> list:
            """The route replies of this round's clients: every anchor (when ``anchors_every_round``)
            and sampled others, ``clients_per_round`` in all."""
            if not (self.cfg["anchors"] and self.cfg["anchors_every_round"]):
                return self._route(grid, self._sample(grid), router, rnd)
            if self.anchor_of is None:  # ask every client once who it is
                nodes = _wait_nodes(grid, self.cfg["clients"])
                self.anchor_of = {r.metadata.src_node_id: int(r.content["metrics"]["anchor"])
                                  for r in self._route(grid, nodes, router, rnd)}
            anchors = sorted(n for n, a in self.anchor_of.items() if a >= 0)
            rest = sorted(n for n in self.anchor_of if n not in anchors)
            return self._route(grid, anchors + self.rng.sample(rest, self.cfg["clients_per_round"] - len(anchors)),
                               router, rnd)

        def _config(self, task: str, rnd: int, **extra) -> ConfigRecord:
            return ConfigRecord({"cfg": json.dumps(self.cfg), "task": task, "server-round": rnd, **extra})

        def configure_train(self, server_round, arrays, config, grid):
            state = self.state = arrays.to_torch_state_dict()  # the round's global arrays, for aggregate_train
            if server_round <= self.common_rounds:
                nodes = self._sample(grid)
                common = ArrayRecord({k: v for k, v in state.items() if k.startswith("common.")})
                return [Message(content=RecordDict({"arrays": common, "config": self._config("common",
                                                                                             server_round)}),
                                message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
            router = ArrayRecord({k: v for k, v in state.items() if k.startswith(("common.", "gate."))})
            replies = self._moe_clients(grid, router, server_round)
            self.sent = {}
            out = []
            for r in replies:
                m = r.content["metrics"]
                chosen = choose_experts(torch.tensor(m["gate"]), self.cfg["top_k"],
                                        int(m["anchor"]) if self.cfg["anchors"] else -1)
                node = r.metadata.src_node_id
                self.sent[node] = chosen
                keep = ("common.", "gate.", *(f"experts.{e}." for e in chosen))
                part = ArrayRecord({k: v for k, v in state.items() if k.startswith(keep)})
                out.append(Message(content=RecordDict({"arrays": part, "config": self._config(
                    "moe", server_round, selected=chosen)}), message_type=MessageType.TRAIN, dst_node_id=node))
            return out

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            failed = [r for r in replies if r.has_error()]
            if failed:
                raise RuntimeError(f"round {server_round}: a client failed: {failed[0].error.reason}")
            got = [(r.content["arrays"].to_torch_state_dict(), float(r.content["metrics"]["num-examples"]),
                    r.metadata.src_node_id, float(r.content["metrics"]["train-loss"])) for r in replies]
            weight = sum(w for _, w, _, _ in got)
            loss = sum(lo * w for _, w, _, lo in got) / weight
            new = dict(self.state)
            if server_round <= self.common_rounds:
                new.update(_average([(s, w) for s, w, _, _ in got]))
                phase, counts = "common", []
            else:
                new.update(_average([({k: v for k, v in s.items() if k.startswith("gate.")}, w)
                                     for s, w, _, _ in got]))
                counts = [0] * self.cfg["experts"]
                for e in range(self.cfg["experts"]):
                    mine = [({k: v for k, v in s.items() if k.startswith(f"experts.{e}.")}, w)
                            for s, w, node, _ in got if e in self.sent.get(node, [])]
                    counts[e] = len(mine)
                    if mine:
                        new.update(_average(mine))
                phase = "moe"
            log.append({"round": server_round, "phase": phase, "train_loss": loss,
                        "expert_clients": " ".join(map(str, counts)), "test_acc": math.nan})
            return ArrayRecord(new), MetricRecord({"train-loss": loss})

        def configure_evaluate(self, server_round, arrays, config, grid):
            return []

        def aggregate_evaluate(self, server_round, replies):
            return None

    return FedJETs()


def _wait_nodes(grid, count: int, timeout: float = 300.0) -> list[int]:
    start = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"only {len(nodes)} of {count} clients connected within {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


# --------------------------------------------------------------------------------------------
# Flower: the server app


def finetune_accuracy(model: MLPClassifier, fed: Federation, support: np.ndarray, query: np.ndarray, cfg: Mapping,
                      seed: int) -> float:
    """Accuracy on ``query`` after ``finetune_epochs`` of SGD on the labelled ``support`` images
    (of a copy of ``model``)."""
    import copy

    tuned = copy.deepcopy(model)
    local_sgd(tuned, _ce, fed, support, cfg, cfg["finetune_epochs"], seed)
    return accuracy(tuned, fed, fed.train_images, fed.train_labels, query)


def routing_table(model: FedMoE, fed: Federation) -> list[dict]:
    """The gate's mean probability of each expert over the test images of each class."""
    rows = []
    labels = fed.test_labels.numpy()
    for c in range(fed.num_classes):
        idx = np.flatnonzero(labels == c)
        probs = torch.zeros(model.num_experts, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(idx), 1000):
                b = torch.as_tensor(idx[i:i + 1000])
                probs += model.gate_probs(fed.inputs(fed.test_images[b])).double().sum(0)
        rows.append({"class": c, **{f"expert{e}": float(p) for e, p in enumerate(probs / len(idx))}})
    return rows


def plot_routing(rows: list[dict], path: Path, title: str) -> None:
    """Heat map of :func:`routing_table` (classes x experts)."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    grid = np.array([[v for k, v in r.items() if k.startswith("expert")] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * grid.shape[1], 4.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("test class")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    fig.colorbar(im, ax=ax, label="mean gate probability")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def server_run(grid, cfg: Mapping, run_dir: Path) -> dict:
    """The whole run on ``grid`` (a Flower ``Grid``): training by the strategy, then the scores.
    Writes the run directory and returns the result."""
    run_dir = Path(run_dir)
    ArrayRecord, ConfigRecord, *_ = _records()
    torch.set_num_threads(cfg["threads"])
    random.seed(derive_seed(cfg["seed"], 0xB0B))  # Flower's own strategies sample with `random`
    t0 = time.perf_counter()
    fed = federation(cfg)
    log: list[dict] = []
    if cfg["method"] == "fedjets":
        model = build_moe(cfg)
        strategy = make_fedjets_strategy(cfg, log)
        rounds = strategy.common_rounds + cfg["rounds"]
    else:
        from flwr.serverapp.strategy import FedAvg, FedProx

        model = build_dense(cfg)
        share = cfg["clients_per_round"] / cfg["clients"]
        common = dict(fraction_train=share, fraction_evaluate=0.0, min_train_nodes=cfg["clients_per_round"],
                      min_available_nodes=cfg["clients"])
        strategy = FedProx(proximal_mu=cfg["fedprox_mu"], **common) if cfg["method"] == "fedprox" else \
            FedAvg(**common)
        rounds = cfg["common_rounds"] + cfg["rounds"]
    train_config = ConfigRecord({"cfg": json.dumps(dict(cfg)), "task": "dense"})

    def evaluate(rnd: int, arrays) -> None:
        net = build_moe(cfg) if cfg["method"] == "fedjets" else build_dense(cfg)
        net.load_state_dict(arrays.to_torch_state_dict())
        acc = accuracy(net, fed, fed.test_images, fed.test_labels)
        if cfg["method"] != "fedjets" and rnd:
            log.append({"round": rnd, "phase": "dense", "train_loss": math.nan, "expert_clients": "",
                        "test_acc": math.nan})
        if rnd and log:
            log[-1]["test_acc"] = acc
        bar.set_postfix(test_acc=f"{acc:.4f}")
        if rnd:
            bar.update(1)

    from tqdm.auto import tqdm

    with tqdm(total=rounds, disable=not cfg["progress"], desc=f"{variant(cfg)} rounds", unit="round") as bar:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                                train_config=train_config, evaluate_fn=evaluate)
    model.load_state_dict(result.arrays.to_torch_state_dict() if len(result.arrays) else model.state_dict())
    if cfg["method"] != "fedjets":
        for row in log:
            if row["round"] in result.train_metrics_clientapp:
                row["train_loss"] = float(result.train_metrics_clientapp[row["round"]]["train-loss"])
    out = score(model, fed, cfg)
    out.update({"method": cfg["method"], "variant": variant(cfg), "anchors": cfg["anchors"],
                "anchors_every_round": cfg["anchors_every_round"], "gate_features": cfg["gate_features"],
                "partition": cfg["partition"], "seed": cfg["seed"], "rounds": rounds,
                "seconds": time.perf_counter() - t0, "run_dir": str(run_dir)})
    write_metrics(log, run_dir / "metrics.csv")
    with atomic_path(run_dir / "last.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    if cfg["method"] == "fedjets":
        rows = routing_table(model, fed)
        write_metrics(rows, run_dir / "routing.csv")
        plot_routing(rows, run_dir / "routing.png", f"FedJETs routing (anchors {cfg['anchors']}, gate features "
                                                     f"{cfg['gate_features']}, seed {cfg['seed']})")
    write_text(run_dir / "result.json", json.dumps(out, indent=2) + "\n")
    return out


def variant(cfg: Mapping) -> str:
    """A short label of the run: the method, and for FedJETs the ablations it runs
    (``-no-anchors``, ``-sampled-anchors``, ``-random-gate``)."""
    if cfg["method"] != "fedjets":
        return cfg["method"]
    out = "fedjets"
    if not cfg["anchors"]:
        out += "-no-anchors"
    elif not cfg["anchors_every_round"]:
        out += "-sampled-anchors"
    if cfg["gate_features"] == "random":
        out += "-random-gate"
    return out


def score(model, fed: Federation, cfg: Mapping) -> dict:
    """Zero-shot accuracy on each unseen client (FedJETs: ``top_k`` experts chosen from the support
    images' mean gate), fine-tuned accuracy for the dense baselines, global test accuracy,
    parameters and MACs per image."""
    zero, tuned, chosen = [], [], []
    for i, (support, query) in enumerate(fed.unseen):
        if isinstance(model, FedMoE):
            sel = choose_experts(mean_gate(model, fed, support), cfg["top_k"])
            chosen.append(sel)
            zero.append(accuracy(model, fed, fed.train_images, fed.train_labels, query, selected=sel))
        else:
            zero.append(accuracy(model, fed, fed.train_images, fed.train_labels, query))
            if cfg["finetune_epochs"]:
                tuned.append(finetune_accuracy(model, fed, support, query, cfg, derive_seed(cfg["seed"], 0xF7, i)))
    out = {"zero_shot_acc": float(np.mean(zero)), "zero_shot_per_client": zero,
           "test_acc": accuracy(model, fed, fed.test_images, fed.test_labels)}
    if isinstance(model, FedMoE):
        out["unseen_experts"] = chosen
        out["params"] = sum(p.numel() for p in model.parameters())
        out["params_per_client"] = sum(p.numel() for p in model.common.parameters()) + sum(
            p.numel() for p in model.gate.parameters()) + cfg["top_k"] * sum(p.numel() for p in
                                                                            model.experts[0].parameters())
        out["macs_per_image"] = model.macs(cfg["top_k"])
    else:
        out["finetune_acc"] = float(np.mean(tuned)) if tuned else math.nan
        out["params"] = out["params_per_client"] = sum(p.numel() for p in model.parameters())
        out["macs_per_image"] = model.macs()
    return out


def make_server_app(cfg: Mapping, run_dir: Path, results: dict):
    """The Flower ``ServerApp`` running :func:`server_run`; its result lands in ``results``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        results.update(server_run(grid, cfg, run_dir))

    return app


def run(cfg: dict) -> dict:
    """One federated run in Flower's simulation runtime (``clients`` virtual SuperNodes)."""
    try:
        import flwr  # noqa: F401
        from flwr.simulation import run_simulation
    except ImportError as e:
        raise ConfigError(f"the federated command needs Flower: pip install 'gatezoo[federated]' ({e})") from e
    federation(cfg)  # config, data and partition problems surface before Flower starts
    run_dir = new_run_dir(cfg["out"], cfg["name"] or f"{cfg['method']}")
    write_text(run_dir / "config.yaml", dump_config(cfg, FEDERATED_KEYS))
    results: dict = {}
    backend = {"client_resources": {"num_cpus": cfg["client_cpus"], "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "log_to_driver": False}}
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    run_simulation(make_server_app(cfg, run_dir, results), make_client_app(), num_supernodes=cfg["clients"],
                   backend_config=backend)
    if not results:
        raise RuntimeError(f"the Flower run ended without a result (see the log above); run directory {run_dir}")
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``; every key of :data:`FEDERATED_KEYS` as ``--key value``)."""
    return command_parser(
        "python -m gatezoo.train.federated",
        "FedJETs (a federated mixture of experts whose gate reads a common expert) against FedAvg and "
        "FedProx, on Flower's simulation runtime; zero-shot accuracy on unseen clients.",
        FEDERATED_KEYS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parse_command(parser, argv, FEDERATED_KEYS)
        result = run(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = f", fine-tuned {result['finetune_acc']:.4f}" if "finetune_acc" in result else ""
    print(f"{cfg['method']}: zero-shot accuracy on unseen clients {result['zero_shot_acc']:.4f}{extra}, test "
          f"{result['test_acc']:.4f}, {result['seconds']:.0f} s -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
