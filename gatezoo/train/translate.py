"""Train a translation model from a YAML config, on the shared loop.

    python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml
    python -m gatezoo.train.translate --config configs/transformer_mt_quick.yaml      # ~10 min, 2 cores
    python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml --model transformer_mt_tiny_rela
    python -m gatezoo.train.translate --src train.en --tgt train.es --max_steps 2000
    python -m gatezoo.train.translate --resume runs/transformer_mt_tiny-20260101-120000
    python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml \
        --models transformer_mt_tiny torch_transformer_mt_tiny xtransformer_mt_tiny

Data: by default the English->Spanish verse pairs of the King James and Reina-Valera 1909 Bibles
(Debian packages ``sword-text-kjv`` and ``sword-text-sparv``, installed by ``make data``), split
with ``split_seed`` into ``test_size`` test, ``dev_size`` dev and the rest train. ``--src FILE
--tgt FILE`` trains on line-aligned files instead (``dev_src``/``dev_tgt`` and
``test_src``/``test_tgt`` optional; what is missing is split off the training files). A joint
SentencePiece model (``vocab_size``, unigram) is trained on the training split, or ``tokenizer``
names one to reuse (side-by-side runs share one vocabulary that way).

Training: label-smoothed cross-entropy over target tokens, Adam (0.9, 0.98) with the
inverse-square-root schedule after a linear warm-up, batches of about ``max_tokens`` padded
target tokens bucketed by length, gradient clipping, dev loss and dev BLEU (greedy) every
``eval_every`` steps and at the end of each epoch. The run directory
``<out>/<name or model>-<timestamp>/`` holds

- ``config.yaml``, ``spm.model``/``spm.vocab`` and ``data/{train,dev,test}.{src,tgt}`` (the split,
  so evaluation is reproducible);
- ``metrics.csv`` (epoch, step, train_loss, train_acc (token accuracy), dev_loss, dev_bleu, lr,
  tok_per_s (target tokens per second of training step time), seconds) and ``curves.png``;
- ``last.safetensors``, ``best.safetensors`` (highest dev BLEU), and for ``--resume`` the
  snapshots ``checkpoints/step-<N>/`` (the newest two; one at every evaluation, and every
  ``checkpoint_every`` steps if set) and ``state.pt`` (the newest snapshot's training state);
- with ``average_last N`` > 1: ``averaged.safetensors``, the mean of the weights at the last N
  evaluations (kept under ``avg/``);
- ``test.json``: test BLEU/chrF of the final (averaged, else last) weights with ``beam_size``,
  unless ``final_test false``.

Multi-task runs: ``tasks`` lists several tasks (each a name and its parallel text, see
:func:`check_tasks`), split each with ``split_seed`` into ``data/<task>/``, train one joint
tokenizer on every task's training text and one model on batches that mix the tasks, each
sentence with its task id (a ``task_aware`` router routes on it; ``router_args.num_tasks`` is
set from the task list). ``metrics.csv`` gets ``dev_bleu_<task>`` per task (``dev_bleu`` is
their mean) and ``test.json`` the test scores per task under ``tasks`` (``bleu``/``chrf`` their
means); the checkpoints record the task names.

``--models A B C`` trains several models side by side on the same batches (the peers
``torch_transformer_mt_tiny`` and ``xtransformer_mt_tiny`` of :mod:`gatezoo.train.peers.translation`, or
variants such as ``transformer_mt_tiny:ffn=swiglu``): each gets a complete run directory inside
the run directory, and ``sidebyside.csv`` lists parameters, training tokens/s (each model's own
step time; ``speed_ratio`` relative to the first model), dev and test BLEU, chrF and decoding speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.eval.decode import model_max_len

from .core import checkpoint as ckpt
from .core import distributed
from .core.config import (
    KEYS,
    ConfigError,
    Key,
    check_resume_config,
    check_warmup_option,
    config_source,
    dump_config,
    given_keys,
    keys_help,
    load_config,
    parse_overrides,
    raise_all,
    warmup_steps,
)
from .core.factory import build_model, count_params, parse_model_spec
from .core.loop import STATE_FILE, Trainee, fit, steps_per_epoch, write_metrics
from .core.optim import SCHEDULES, build_optimizer, build_scheduler
from .core.runs import model_error, resolve_device, start_run_dir, wrap_for
from .data.images import DataFormatError, DataNotFoundError
from .data.text import (
    PAD_ID,
    PAIR_TRANSFORMS,
    SPLIT_PARTS,
    Split,
    TextDataError,
    TokenBatches,
    Tokenizer,
    bible_pairs,
    drop_repeated_sources,
    read_lines,
    read_parallel,
    split_pairs,
    subsample_pairs,
)

_SHARED = ("accum_steps", "bf16", "out", "name", "device", "max_steps", "checkpoint_every", "threads", "progress",
           "nonfinite", "fsdp")


def _key(name: str, **changes) -> Key:
    """The image commands' key ``name`` with this command's own default or help."""
    return dataclasses.replace(KEYS[name], **changes)


MT_KEYS: dict[str, Key] = {
    "model": Key("transformer_mt_tiny", "str", "model: transformer_mt_tiny, transformer_mt_tiny_rela, a translation "
                 "peer (torch_transformer_mt_tiny, xtransformer_mt_tiny), optionally NAME:key=value,..."),
    "model_args": _key("model_args", help="overrides passed to create_model (e.g. {ffn: swiglu, dropout: 0.2}); "
                       "vocab_size comes from the tokenizer"),
    "epochs": _key("epochs", default=10),
    "lr": _key("lr", help="peak Adam learning rate (after the warm-up)"),
    "weight_decay": _key("weight_decay", default=0.0, help="decoupled (AdamW) weight decay, not on biases and norms"),
    "warmup_epochs": _key("warmup_epochs", help="warm-up length in epochs, used when warmup_steps is null"),
    "label_smoothing": _key("label_smoothing", help="label smoothing of the training cross-entropy over target "
                            "tokens"),
    "seed": _key("seed", help="seed of model initialisation, dropout and the batch order (not of the split)"),
    **{k: KEYS[k] for k in _SHARED},
    "data": Key("bible", "str", "'bible' (KJV -> Reina-Valera 1909 verse pairs) or 'files' (set src and tgt)",
                choices=("bible", "files")),
    "src": Key(None, "str", "training source file, one sentence per line (sets data: files)", optional=True),
    "tgt": Key(None, "str", "training target file, line-aligned with src", optional=True),
    "dev_src": Key(None, "str", "dev source file (default: split off the training data)", optional=True),
    "dev_tgt": Key(None, "str", "dev target file", optional=True),
    "test_src": Key(None, "str", "test source file (default: split off the training data)", optional=True),
    "test_tgt": Key(None, "str", "test target file", optional=True),
    "dev_size": Key(500, "int", "dev pairs split off the data when no dev files are given", minimum=1),
    "test_size": Key(1000, "int", "test pairs split off the data when no test files are given", minimum=0),
    "split_seed": Key(0, "int", "seed of the train/dev/test split"),
    "vocab_size": Key(8000, "int", "joint SentencePiece vocabulary size", minimum=8),
    "tokenizer": Key(None, "str", "an existing SentencePiece .model to use instead of training one", optional=True),
    "max_tokens": Key(2500, "int", "padded target tokens per batch (token-count batches, bucketed by length)",
                      minimum=1),
    "eval_batch_size": Key(64, "int", "sentences per decoding batch in evaluation", minimum=1),
    "warmup_steps": Key(400, "int", "linear warm-up length in optimizer steps (null: warmup_epochs)", optional=True,
                        minimum=0),
    "schedule": Key("inverse_sqrt", "str", "learning-rate schedule after the warm-up", choices=SCHEDULES),
    "adam_beta2": Key(0.98, "float", "Adam's beta2 (beta1 is 0.9)", minimum=0.0, below=1.0),
    "grad_clip": Key(1.0, "float", "clip the gradients' global norm (null: off)", optional=True, minimum=0.0),
    "eval_every": Key(500, "int", "dev evaluation every this many optimizer steps (and at each epoch's end)",
                      optional=True, minimum=1),
    "dev_sentences": Key(500, "int", "dev pairs decoded for dev BLEU at each evaluation (all: a large number)",
                         minimum=1),
    "average_last": Key(5, "int", "average the weights of the last N evaluations into averaged.safetensors "
                        "(0 or 1: off)", minimum=0),
    "final_test": Key(True, "bool", "score the test split at the end (test.json)"),
    "beam_size": Key(5, "int", "beam size of the final test translation (1 = greedy)", minimum=1),
    "length_penalty": Key(1.0, "float", "beam ranking: log-probability / length ** length_penalty", minimum=0.0),
    "max_len_a": Key(1.2, "float", "output length limit a * source length + b", minimum=0.0),
    "max_len_b": Key(10, "int", "output length limit a * source length + b", minimum=0),
    "tasks": Key(None, "list", "multi-task run: a list of tasks {name, data: bible|files, src, tgt, reverse, "
                 "transform, fraction} (replaces data/src/tgt; see docs/translation.md)", optional=True),
}
"""The config keys of the translation command (its own schema; see :mod:`gatezoo.train.core.config`)."""

RESUME_FIXED = ("model", "model_args", "tasks", "data", "src", "tgt", "dev_src", "dev_tgt", "test_src", "test_tgt",
                "dev_size", "test_size", "split_seed", "vocab_size", "tokenizer", "out", "name", "lr", "weight_decay",
                "adam_beta2", "max_tokens", "accum_steps", "seed")
"""Keys a resumed translation run cannot change: the run directory holds the model, split and
tokenizer they made; the saved optimizer state keeps its own learning rate, weight decay and
betas; and the batches follow from ``max_tokens``, ``accum_steps`` and ``seed``."""

METRICS = ("epoch", "step", "train_loss", "train_acc", "dev_loss", "dev_bleu", "lr", "tok_per_s", "seconds")
"""The columns of a translation run's ``metrics.csv``."""


TASK_FIELDS = {"name": None, "data": None, "src": None, "tgt": None, "reverse": False, "transform": None,
               "fraction": 1.0}
"""The fields of a task of ``tasks`` and their defaults (``data``: ``files`` when ``src`` is set,
else ``bible``)."""
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# single-task keys that a multi-task run would ignore (each task names its own data)
_SINGLE_TASK_KEYS = ("src", "tgt", "dev_src", "dev_tgt", "test_src", "test_tgt")


def check_tasks(tasks) -> list[dict]:
    """The ``tasks`` of a multi-task config, each completed with the defaults of
    :data:`TASK_FIELDS`; raises :class:`ConfigError` listing every problem.

    A task is a mapping: ``name`` (letters, digits, ``_.-``; unique: it names the task's
    ``data/<name>/`` folder and its metric columns), ``data`` (``bible`` or ``files``; ``files``
    needs ``src`` and ``tgt``, line-aligned files), ``reverse`` (true: translate target to
    source), ``transform`` (a name of :data:`~gatezoo.train.data.text.PAIR_TRANSFORMS`, applied
    to every part) and ``fraction`` (in (0, 1]: the share of the training pairs kept, chosen by
    ``split_seed``; dev and test stay whole)."""
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"tasks must be a non-empty list of task mappings, got {tasks!r}")
    problems, out, seen = [], [], set()
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            problems.append(f"tasks[{i}] must be a mapping {{name: ..., data: ...}}, got {task!r}")
            continue
        unknown = sorted(set(task) - set(TASK_FIELDS), key=str)
        if unknown:
            problems.append(f"tasks[{i}]: unknown field(s) {unknown}; known fields: {', '.join(TASK_FIELDS)}")
        spec = {**TASK_FIELDS, **{k: v for k, v in task.items() if k in TASK_FIELDS}}
        name = spec["name"]
        where = f"tasks[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            problems.append(f"{where}: name must be letters, digits, '_', '.' or '-' (not starting with a "
                            f"punctuation mark), got {name!r}")
        elif name in seen:
            problems.append(f"{where}: duplicate task name {name!r}; every task needs its own name")
        seen.add(name)
        for side in ("src", "tgt"):
            if spec[side] is not None and (not isinstance(spec[side], str) or not spec[side]):
                problems.append(f"{where}: {side} must be a file path, got {spec[side]!r}")
        if spec["data"] is None:
            spec["data"] = "files" if spec["src"] is not None or spec["tgt"] is not None else "bible"
        if spec["data"] not in ("bible", "files"):
            problems.append(f"{where}: data must be 'bible' or 'files', got {spec['data']!r}")
        elif spec["data"] == "files" and (spec["src"] is None or spec["tgt"] is None):
            problems.append(f"{where}: data: files needs src and tgt (line-aligned files)")
        elif spec["data"] == "bible" and (spec["src"] is not None or spec["tgt"] is not None):
            problems.append(f"{where}: src/tgt do nothing with data: bible")
        if not isinstance(spec["reverse"], bool):
            problems.append(f"{where}: reverse must be true or false, got {spec['reverse']!r}")
        if spec["transform"] is not None and spec["transform"] not in PAIR_TRANSFORMS:
            problems.append(f"{where}: transform must be null or one of {sorted(PAIR_TRANSFORMS)}, got "
                            f"{spec['transform']!r}")
        fraction = spec["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            problems.append(f"{where}: fraction must be a number in (0, 1] (the share of training pairs kept), "
                            f"got {fraction!r}")
        else:
            spec["fraction"] = float(fraction)
        out.append(spec)
    raise_all(problems)
    return out


def load_mt_config(path=None, overrides=(), base: Mapping | None = None) -> dict:
    """The translation config: :data:`MT_KEYS` defaults, ``base``, the YAML file, then
    overrides; validated (``tasks`` by :func:`check_tasks`)."""
    cfg = load_config(path, overrides, base=base, keys=MT_KEYS)
    if cfg["tasks"] is not None:
        cfg["tasks"] = check_tasks(cfg["tasks"])
        given = [k for k in _SINGLE_TASK_KEYS if cfg[k] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} do nothing in a multi-task run (tasks: ...): each task names its "
                              f"data; set src/tgt inside the tasks")
    return cfg


class Translation:
    """The translation task for :func:`gatezoo.train.core.loop.fit`.

    Args:
        split: the train/dev/test pairs, or (a multi-task run) a mapping of task name to its
            split: the batches then mix the tasks and carry each sentence's task id, dev BLEU is
            scored per task (``dev_bleu_<task>``, ``dev_bleu`` their mean).
        tokenizer: the joint :class:`~gatezoo.train.data.text.Tokenizer`.
        max_tokens: padded target tokens per training batch. max_len: the model's length limit
            (a longer training pair is an error naming it). seed: of the batch order.
        label_smoothing: of the training loss. eval_batch_size: sentences per decoding batch.
        dev_sentences: dev pairs decoded for BLEU. device: where the batches go.
    """

    unit = "tok"
    score = "dev_bleu"
    curves = (("train loss (label-smoothed)", ("train_loss",)), ("dev cross-entropy per token", ("dev_loss",)),
              ("dev BLEU (greedy)", ("dev_bleu",)))

    def __init__(self, split: Split, tokenizer: Tokenizer, *, max_tokens: int = 2500, max_len: int = 256,
                 seed: int = 0, label_smoothing: float = 0.1, eval_batch_size: int = 64, dev_sentences: int = 500,
                 device: torch.device | str = "cpu", data: str = "bible", max_len_a: float = 1.2,
                 max_len_b: int = 10, where: Callable[[str, int], str] | None = None):
        self.task_splits: dict[str, Split] | None = None
        """Each task's split (a multi-task run), else None."""
        self._task_of: dict[str, list[int]] = {}
        if isinstance(split, Mapping):
            self.task_splits = dict(split)
            # the tasks' pairs one after the other, each pair knowing its task
            split = Split(*([p for s in self.task_splits.values() for p in getattr(s, part)] for part in SPLIT_PARTS))
            self._task_of = {part: [i for i, s in enumerate(self.task_splits.values()) for _ in getattr(s, part)]
                             for part in SPLIT_PARTS}
        self.split, self.tokenizer, self.data = split, tokenizer, data
        self._where = where
        self.device = torch.device(device)
        self.label_smoothing, self.eval_batch_size = label_smoothing, eval_batch_size
        self.train_batches = self._batches(split.train, max_tokens, seed, True, max_len, "train")
        self.dev_batches = self._batches(split.dev, max_tokens, seed, False, max_len, "dev") if split.dev else None
        self.dev_pairs = list(split.dev[:dev_sentences])
        if self.task_splits is not None:
            self.dev_pairs = {name: list(s.dev[:dev_sentences]) for name, s in self.task_splits.items()}
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        for i, row in enumerate(tokenizer.encode([s for s, _ in split.test])):  # fail now, not after training
            if len(row) > max_len or not row:
                raise TextDataError(f"{self.where('test', i)} has {len(row)} source tokens; the model allows 1 to "
                                    f"{max_len}: drop the pair or raise model_args.max_len")

    @property
    def task_names(self) -> list[str] | None:
        """The task names of a multi-task run, in task id order (else None)."""
        return None if self.task_splits is None else list(self.task_splits)

    def where(self, part: str, index: int) -> str:
        """``"<part> pair <index + 1>"``, with the file and line it came from when known (the
        task and its own pair number in a multi-task run)."""
        if self.task_splits is not None and part in self._task_of:
            task = self._task_of[part][index]
            local = index - self._task_of[part].index(task)
            return f"task {self.task_names[task]} {part} pair {local + 1} (data/{self.task_names[task]}/{part}.src)"
        origin = self._where(part, index) if self._where is not None else None
        return f"{part} pair {index + 1}" + (f" ({origin})" if origin else "")

    def _batches(self, pairs, max_tokens, seed, shuffle, max_len, part):
        src = self.tokenizer.encode([s for s, _ in pairs])
        tgt = self.tokenizer.encode([t for _, t in pairs])
        for i, (s, t) in enumerate(zip(src, tgt)):
            if len(s) > max_len or len(t) + 1 > max_len:
                raise TextDataError(f"{self.where(part, i)} has {len(s)} source and {len(t)} target tokens; the model "
                                    f"allows {max_len} (source) and {max_len - 1} (target): drop the pair or raise "
                                    f"model_args.max_len")
            if not s or not t:
                raise TextDataError(f"{self.where(part, i)} encodes to no tokens")
        tasks = self._task_of.get(part)
        return _DeviceBatches(TokenBatches(src, tgt, max_tokens=max_tokens, seed=seed, shuffle=shuffle,
                                           task_ids=tasks), self.device)

    @staticmethod
    def routes_by_task(model: nn.Module) -> bool:
        """Whether ``model`` (or the model a DDP/FSDP wrapper holds) takes task ids."""
        return getattr(getattr(model, "module", model), "num_tasks", None) is not None

    def _forward(self, model: nn.Module, batch) -> torch.Tensor:
        # a model without a task-aware router trains on the mixed batches without the ids
        if batch.task_ids is not None and self.routes_by_task(model):
            return model(batch.src, batch.tgt_in, task_ids=batch.task_ids)
        return model(batch.src, batch.tgt_in)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int, dict]:
        """Label-smoothed cross-entropy per target token (float32), the target tokens, and the
        number of them predicted right (the batch's task ids go to a model that routes by task)."""
        logits = self._forward(model, batch)
        if logits.shape[:2] != batch.tgt_out.shape:
            raise RuntimeError(f"model must return logits (B, T, vocab) with (B, T) = {tuple(batch.tgt_out.shape)}, "
                               f"got {tuple(logits.shape)}")
        flat, gold = logits.float().reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1)
        loss = F.cross_entropy(flat, gold, ignore_index=PAD_ID, label_smoothing=self.label_smoothing)
        real = gold != PAD_ID
        correct = ((flat.detach().argmax(-1) == gold) & real).sum()
        return loss, int(real.sum()), {"correct": correct}

    def train_metrics(self, stats) -> dict:
        """``train_acc``: token accuracy over the epoch so far (teacher-forced)."""
        return {"train_acc": stats.total("correct") / stats.items if stats.items else float("nan")}

    def evaluate(self, model: nn.Module) -> dict:
        """``dev_loss`` (plain cross-entropy per token) and ``dev_bleu`` (greedy, detokenised); a
        multi-task run adds ``dev_bleu_<task>`` per task, and ``dev_bleu`` is their mean."""
        from gatezoo.eval.translate import evaluate_translation

        names = self.task_names or []
        if self.dev_batches is None:
            return {"dev_loss": float("nan"), "dev_bleu": float("nan"),
                    **{f"dev_bleu_{n}": float("nan") for n in names}}
        total, count = 0.0, 0
        for batch in self.dev_batches.epoch(0):
            logits = self._forward(model, batch).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1),
                                           ignore_index=PAD_ID, reduction="sum"))
            count += batch.ntokens
        opts = dict(beam_size=1, max_len_a=self.max_len_a, max_len_b=self.max_len_b,
                    batch_sentences=self.eval_batch_size, device=self.device)
        if self.task_splits is None:
            ev = evaluate_translation(model, self.tokenizer, self.dev_pairs, **opts)
            return {"dev_loss": total / max(count, 1), "dev_bleu": ev["bleu"]}
        by_task = self.routes_by_task(model)
        bleu = {}
        for i, name in enumerate(names):
            pairs = self.dev_pairs[name]
            bleu[name] = (evaluate_translation(model, self.tokenizer, pairs, task_ids=i if by_task else None,
                                               **opts)["bleu"] if pairs else float("nan"))
        return {"dev_loss": total / max(count, 1), "dev_bleu": sum(bleu.values()) / len(bleu),
                **{f"dev_bleu_{n}": b for n, b in bleu.items()}}

    def checkpoint_info(self) -> dict:
        """What a checkpoint needs to translate again: the tokenizer file (in the run directory)."""
        info = {"name": "translation", "data": self.data, "tokenizer": "spm.model",
                "vocab_size": self.tokenizer.vocab_size}
        if self.task_splits is not None:
            info["tasks"] = self.task_names  # task id i is tasks[i]; translate_eval --task picks one
        return info


class _DeviceBatches:
    """:class:`TokenBatches` whose batches are moved to ``device``."""

    def __init__(self, batches: TokenBatches, device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def tokens(self) -> int:
        return self.batches.tokens

    def epoch(self, epoch: int, start: int = 0):
        for batch in self.batches.epoch(epoch, start):
            yield batch.to(self.device)


def prepare_data(cfg: Mapping, run_dir: Path, fresh: bool) -> tuple[Split, Tokenizer, str]:
    """The split and tokenizer of a run: made and saved into ``run_dir`` for a fresh run, read
    back from it when resuming. Returns ``(split, tokenizer, data description)``."""
    if cfg.get("tasks"):
        return prepare_tasks(cfg, run_dir, fresh)
    data_dir = run_dir / "data"
    if not fresh:
        return Split.load(data_dir), Tokenizer(run_dir / "spm.model"), cfg["data"]
    files = cfg["src"] is not None or cfg["tgt"] is not None
    if files:
        if cfg["src"] is None or cfg["tgt"] is None:
            raise ConfigError("src and tgt go together (line-aligned training files)")
        pairs, data = read_parallel(cfg["src"], cfg["tgt"]), f"files:{cfg['src']}|{cfg['tgt']}"
    elif cfg["data"] == "files":
        raise ConfigError("data: files needs src and tgt")
    else:
        pairs, data = bible_pairs(), "bible"
    for kind in ("dev", "test"):
        if (cfg[f"{kind}_src"] is None) != (cfg[f"{kind}_tgt"] is None):
            raise ConfigError(f"{kind}_src and {kind}_tgt go together")
    dev = read_parallel(cfg["dev_src"], cfg["dev_tgt"]) if cfg["dev_src"] else None
    test = read_parallel(cfg["test_src"], cfg["test_tgt"]) if cfg["test_src"] else None
    unique = drop_repeated_sources(pairs)
    if len(unique) < len(pairs):
        print(f"dropped {len(pairs) - len(unique):,} pairs whose source sentence repeats an earlier one")
    pairs = unique
    split = split_pairs(pairs, dev=0 if dev is not None else cfg["dev_size"],
                        test=0 if test is not None else cfg["test_size"], seed=cfg["split_seed"])
    split = Split(split.train, dev if dev is not None else split.dev, test if test is not None else split.test)
    split.save(data_dir)
    sentences = [s for s, _ in split.train] + [t for _, t in split.train]
    return split, _make_tokenizer(cfg, run_dir, sentences), data


def _make_tokenizer(cfg: Mapping, run_dir: Path, sentences: list[str]) -> Tokenizer:
    """The run's tokenizer: a copy of ``cfg["tokenizer"]``, or one trained on ``sentences``."""
    if cfg["tokenizer"]:
        source = Path(cfg["tokenizer"])
        Tokenizer(source)  # checks it
        shutil.copyfile(source, run_dir / "spm.model")
        if source.with_suffix(".vocab").is_file():
            shutil.copyfile(source.with_suffix(".vocab"), run_dir / "spm.vocab")
        return Tokenizer(run_dir / "spm.model")
    return Tokenizer.train(sentences, run_dir / "spm", vocab_size=cfg["vocab_size"])


def prepare_tasks(cfg: Mapping, run_dir: Path, fresh: bool) -> tuple[dict[str, Split], Tokenizer, str]:
    """A multi-task run's splits (task name -> :class:`Split`, in task order) and joint tokenizer:
    made and saved into ``run_dir/data/<task>/`` for a fresh run, read back when resuming.

    Each task's pairs lose repeated sources and are split with ``split_seed`` (``dev_size``,
    ``test_size``) before ``reverse`` and ``transform`` apply, so two tasks of one corpus share
    the split (no test sentence of one is a training sentence of the other); ``fraction`` then
    keeps a seeded share of the training pairs. The tokenizer is trained on every task's training
    text. Returns ``(splits, tokenizer, data description)``."""
    tasks = cfg["tasks"]
    data = "tasks:" + ",".join(t["name"] for t in tasks)
    if not fresh:
        return ({t["name"]: Split.load(run_dir / "data" / t["name"]) for t in tasks},
                Tokenizer(run_dir / "spm.model"), data)
    loaded: dict[tuple, list] = {}
    splits = {}
    for t in tasks:
        key = (t["data"], t["src"], t["tgt"])
        if key not in loaded:
            pairs = bible_pairs() if t["data"] == "bible" else read_parallel(t["src"], t["tgt"])
            pairs = drop_repeated_sources(pairs)
            loaded[key] = split_pairs(pairs, dev=cfg["dev_size"], test=cfg["test_size"], seed=cfg["split_seed"])
        base = loaded[key]
        parts = []
        for part in SPLIT_PARTS:
            pairs = getattr(base, part)
            if t["reverse"]:
                pairs = [(tgt, src) for src, tgt in pairs]
            if t["transform"] is not None:
                pairs = PAIR_TRANSFORMS[t["transform"]](pairs)
            if part == "train":
                pairs = subsample_pairs(pairs, t["fraction"], cfg["split_seed"])
            parts.append(pairs)
        splits[t["name"]] = Split(*parts)
        splits[t["name"]].save(run_dir / "data" / t["name"])
    sentences = [text for s in splits.values() for pair in s.train for text in pair]
    return splits, _make_tokenizer(cfg, run_dir, sentences), data


class PairOrigins:
    """Where each pair of a run's split came from, for error messages: ``origins(part, i)`` names
    the file and the 1-based line of pair ``i`` of ``part``.

    A resumed run (``fresh`` false) reads its split from ``RUN_DIR/data/``, so the line is that of
    ``data/<part>.src``. A fresh run names the user's files: ``dev_src``/``test_src`` line by line,
    and for pairs split off ``src``/``tgt`` the line where the source sentence first appears
    (repeated sources are dropped, so it is that pair's). The Bible has no file: its pairs are
    named by the start of their source sentence. Files are read only when an error needs a line."""

    def __init__(self, cfg: Mapping, run_dir: Path, fresh: bool, split: Split):
        self.cfg, self.run_dir, self.fresh, self.split = cfg, Path(run_dir), fresh, split
        self._lines: dict[str, dict[str, int]] = {}

    def _line_of(self, path: str, sentence: str) -> int | None:
        if path not in self._lines:
            try:
                lines = read_lines(path)
            except (DataNotFoundError, DataFormatError):
                lines = []
            first: dict[str, int] = {}
            for number, line in enumerate(lines, 1):
                first.setdefault(line, number)
            self._lines[path] = first
        return self._lines[path].get(sentence)

    def __call__(self, part: str, index: int) -> str | None:
        if part not in SPLIT_PARTS:
            return None
        if not self.fresh:
            data = self.run_dir / "data"
            return f"{data / f'{part}.src'} / {part}.tgt line {index + 1}"
        if part in ("dev", "test") and self.cfg.get(f"{part}_src"):
            return f"{self.cfg[f'{part}_src']} / {self.cfg[f'{part}_tgt']} line {index + 1}"
        source = getattr(self.split, part)[index][0]
        if self.cfg.get("src"):
            number = self._line_of(self.cfg["src"], source)
            if number:
                return f"{self.cfg['src']} / {self.cfg['tgt']} line {number}"
        # no file line to name (the Bible): the sentence's start, to find it by
        return f"source {source[:40] + ('...' if len(source) > 40 else '')!r}"


def _prepare_data_once(env: distributed.DistEnv, cfg: Mapping, run_dir: Path, fresh: bool):
    """:func:`prepare_data` by rank 0 (which writes the split and trains the tokenizer), then read
    back by the other processes; rank 0's error, if any, raised on every process."""
    error, result = None, None
    if env.main:
        try:
            result = prepare_data(cfg, run_dir, fresh)
        except (ConfigError, DataNotFoundError, DataFormatError) as e:
            error = e
    error = distributed.broadcast_object(env, error)
    if error is not None:
        raise error
    if not env.main:
        result = prepare_data(cfg, run_dir, False)
    return result


def make_mt_trainee(cfg: Mapping, spec: str, model_args: Mapping, per_epoch: int, device: torch.device,
                    run_dir: Path | None = None, env: distributed.DistEnv = distributed.SINGLE) -> Trainee:
    """Model ``spec`` seeded with ``cfg["seed"]``, Adam (0.9, ``adam_beta2``) and the schedule of
    ``cfg``, as a :class:`~gatezoo.train.core.loop.Trainee`."""
    try:
        parse_model_spec(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    torch.manual_seed(cfg["seed"])
    try:
        model = build_model(spec, **model_args).to(device)
    except (ValueError, TypeError) as e:
        raise model_error(spec, model_args, e) from e
    if not hasattr(model, "decode_step"):
        raise ConfigError(f"model {spec!r} is not a translation model (no decode_step)")
    params = count_params(model)
    net, sharded = wrap_for(model, env, device, cfg)  # DDP / FSDP before the optimizer sees the parameters
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"], betas=(0.9, cfg["adam_beta2"]), eps=1e-9)
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, per_epoch), cfg["epochs"] * per_epoch, cfg["schedule"])
    return Trainee(spec, model, optimizer, scheduler, model_args=dict(model_args), run_dir=run_dir,
                   params=params, net=net, sharded=sharded)


class _Averager:
    """Keeps each trainee's weights of the last ``n`` evaluations under ``<run_dir>/avg`` and
    averages them into ``averaged.safetensors``."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, results) -> None:
        from safetensors.torch import save_file

        for t, row in results:
            folder = t.run_dir / "avg"
            folder.mkdir(exist_ok=True)
            step = int(row["step"])
            for stale in folder.glob("step-*.safetensors"):  # left by a run resumed from an earlier snapshot
                if int(stale.stem.split("-")[1]) > step:
                    stale.unlink()
            with ckpt.atomic_path(folder / f"step-{step:08d}.safetensors") as tmp:
                save_file(_unique_state(t.whole_model), str(tmp))
            for old in sorted(folder.glob("step-*.safetensors"))[:-self.n]:
                old.unlink()

    def average(self, trainee: Trainee, meta: dict) -> Path | None:
        """Write ``averaged.safetensors`` (the mean of the kept weights); None if fewer than 2."""
        from safetensors.torch import load_file

        folder = trainee.run_dir / "avg"
        files = sorted(folder.glob("step-*.safetensors"))[-self.n:] if folder.is_dir() else []
        if len(files) < 2:
            return None
        total = None
        for f in files:
            state = load_file(str(f))
            total = {k: v.double() for k, v in state.items()} if total is None else {
                k: total[k] + state[k].double() for k in total}
        model = trainee.whole_model
        current = _unique_state(model)
        model.load_state_dict({k: (v / len(files)).to(current[k].dtype) for k, v in total.items()}, strict=False)
        path = trainee.run_dir / "averaged.safetensors"
        ckpt.save_checkpoint(model, path, {**meta, "averaged_steps": [int(f.stem.split("-")[1]) for f in files]})
        model.load_state_dict(current, strict=False)
        return path


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (tied weights under their first name), on the CPU."""
    seen, state = set(), {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().cpu().clone()
    return state


def _test_tasks(model: nn.Module, tokenizer: Tokenizer, tasks: Mapping[str, Split], run_dir: Path,
                opts: dict) -> dict:
    """Each task's test split scored (``test-<task>.hyp`` written): the per-task scores under
    ``tasks``, ``bleu``/``chrf`` their means, the speed over all of them."""
    from gatezoo.eval.translate import evaluate_translation

    by_task = Translation.routes_by_task(model)
    per, seconds, sentences, signature = {}, 0.0, 0, {}
    for i, (name, split) in enumerate(tasks.items()):
        if not split.test:
            continue
        ev = evaluate_translation(model, tokenizer, split.test, task_ids=i if by_task else None, **opts)
        (run_dir / f"test-{name}.hyp").write_text("".join(f"{h}\n" for h in ev.pop("hypotheses")), encoding="utf-8")
        per[name] = ev
        seconds, sentences = seconds + ev["seconds"], sentences + ev["sentences"]
        signature = {k: ev[k] for k in ("bleu_signature", "chrf_signature")}
        print(f"  task {name}: test BLEU {ev['bleu']:.2f} chrF {ev['chrf']:.2f} ({ev['sentences']} sentences)")
    mean = {k: sum(ev[k] for ev in per.values()) / len(per) for k in ("bleu", "chrf")}
    return {**mean, **signature, "sentences": sentences, "seconds": seconds,
            "sent_per_s": sentences / max(seconds, 1e-9), "tasks": per}


def _final_test(cfg: Mapping, t: Trainee, averager: _Averager | None, split: Split, tokenizer: Tokenizer,
                device: torch.device, steps: int, tasks: Mapping[str, Split] | None = None) -> dict | None:
    """Average the last checkpoints (if asked) and score the test split with the final weights
    (each task's, with ``tasks``: see :func:`_test_tasks`)."""
    from gatezoo.eval.translate import evaluate_translation

    meta = ckpt.read_checkpoint_metadata(t.run_dir / "last.safetensors")
    final = "averaged" if averager is not None and averager.average(t, meta) is not None else "last"
    if not (cfg["final_test"] and split.test):
        return None
    model, _ = ckpt.load_checkpoint(t.run_dir / f"{final}.safetensors", device)
    opts = dict(beam_size=cfg["beam_size"], length_penalty=cfg["length_penalty"], max_len_a=cfg["max_len_a"],
                max_len_b=cfg["max_len_b"], batch_sentences=cfg["eval_batch_size"], device=device,
                progress=cfg["progress"])
    if tasks is not None:
        test = _test_tasks(model.eval(), tokenizer, tasks, t.run_dir, opts)
    else:
        test = evaluate_translation(model.eval(), tokenizer, split.test, **opts)
        (t.run_dir / "test.hyp").write_text("".join(f"{h}\n" for h in test.pop("hypotheses")), encoding="utf-8")
    test.update(model=t.spec, checkpoint=final, beam_size=cfg["beam_size"], step=steps, train_tok_per_s=t.rate)
    (t.run_dir / "test.json").write_text(json.dumps(test, indent=2))
    print(f"{t.spec} test ({final} weights, beam {cfg['beam_size']}): BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f} "
          f"{'(mean over tasks) ' if tasks is not None else ''}[{test['bleu_signature']}], "
          f"{test['sent_per_s']:.1f} sentences/s")
    return test


def _spec_model_args(spec: str, model_args: Mapping, num_tasks: int | None) -> dict:
    """The constructor overrides of model ``spec`` in this run: ``model_args``, with
    ``router_args.num_tasks`` set to the run's number of tasks when the spec (or ``model_args``)
    picks the ``task_aware`` router of a multi-task run and does not give it."""
    args = dict(model_args)
    if num_tasks is None:
        return args
    try:
        own = parse_model_spec(spec)[1]
    except ValueError:
        return args  # build_model reports the malformed spec
    if own.get("router", args.get("router")) == "task_aware":
        given = {**(args.get("router_args") or {}), **(own.get("router_args") or {})}
        if "num_tasks" not in given:
            args["router_args"] = {**(args.get("router_args") or {}), "num_tasks": num_tasks}
    return args


def _check_model_tasks(spec: str, num_tasks: int | None, tasks: list[str] | None) -> None:
    """A model that routes by task needs a multi-task run with as many tasks as it has."""
    if num_tasks is None:
        return
    if tasks is None:
        raise ConfigError(f"model {spec!r} routes by task (router task_aware, num_tasks={num_tasks}): it needs a "
                          f"multi-task run (tasks: [...]); choose another router for a single-task run")
    if num_tasks != len(tasks):
        raise ConfigError(f"model {spec!r} has router_args.num_tasks={num_tasks}, but the run has {len(tasks)} tasks "
                          f"({', '.join(tasks)}); leave num_tasks out (it is set from the tasks)")


def _safe(spec: str) -> str:
    return spec.replace("/", "_").replace(":", "_").replace(",", "_").replace("=", "-")


SIDEBYSIDE = ("model", "params", "steps", "tok_per_s", "speed_ratio", "dev_bleu", "best_dev_bleu", "test_bleu",
              "test_chrf", "test_sent_per_s", "beam_size", "checkpoint")
"""The columns of ``sidebyside.csv`` (a run of several models)."""


def train(cfg: dict, resume: str | Path | None = None, models: list[str] | None = None) -> dict:
    """Run (or, with ``resume``, continue) the translation training ``cfg`` describes.

    ``models`` (several model specs) trains them side by side instead of ``cfg["model"]``: each
    takes its optimizer step on the same batches in turns (the one going first rotating), each with
    its own subdirectory of the run directory, and ``sidebyside.csv`` sums them up. Throughput
    counts each model's own steps only.

    Returns ``{"run_dir", "dev_bleu" (last evaluation), "best_bleu", "step", "epoch", "test",
    "tok_per_s", "rows"}`` (``test``: final test scores or None; ``rows``: the side-by-side rows)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    env = distributed.setup(device)
    device = distributed.device_for(env, device)
    fresh = resume is None
    specs = list(models) if models else [cfg["model"]]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"--models lists a model twice: {specs}")
    if len(specs) > 1 and not fresh:
        raise ConfigError("--resume continues a single-model run, not a side-by-side one")
    if cfg["fsdp"] and not env.active:
        raise ConfigError("fsdp: true needs several processes; launch with torchrun --nproc_per_node=N")
    if not fresh:
        check_resume_config(resume, load_mt_config(config_source(None, resume)), cfg, RESUME_FIXED)
    name = cfg["name"] or (specs[0].split(":")[0] if len(specs) == 1 else "mt-sidebyside")
    run_dir = start_run_dir(env, cfg["out"], name) if fresh else Path(resume)
    try:
        split, tokenizer, data = _prepare_data_once(env, cfg, run_dir, fresh)
        if cfg["model_args"].get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ConfigError(f"model_args.vocab_size {cfg['model_args']['vocab_size']} differs from the tokenizer's "
                              f"{tokenizer.vocab_size}; leave it out (it is set from the tokenizer)")
        model_args = {**cfg["model_args"], "vocab_size": tokenizer.vocab_size}
        multi = isinstance(split, Mapping)
        if not multi and model_args.get("router") == "task_aware":
            raise ConfigError("model_args.router task_aware routes by task: it needs a multi-task run (tasks: [...]); "
                              "choose another router for a single-task run")
        cfg = {**cfg, "model_args": model_args}
        spec_args = {spec: _spec_model_args(spec, model_args, len(split) if multi else None) for spec in specs}
        dirs = [run_dir] if len(specs) == 1 else [run_dir / _safe(s) for s in specs]
        max_len = None
        for spec in specs:
            try:
                probe = build_model(spec, **spec_args[spec])
            except (ValueError, TypeError) as e:
                raise model_error(spec, spec_args[spec], e) from e
            limit = model_max_len(probe)
            max_len = limit if max_len is None else min(max_len, limit)
            _check_model_tasks(spec, getattr(probe, "num_tasks", None), list(split) if multi else None)
            del probe
        task = Translation(split, tokenizer, max_tokens=cfg["max_tokens"], max_len=max_len, seed=cfg["seed"],
                           label_smoothing=cfg["label_smoothing"], eval_batch_size=cfg["eval_batch_size"],
                           dev_sentences=cfg["dev_sentences"], device=device, data=data, max_len_a=cfg["max_len_a"],
                           max_len_b=cfg["max_len_b"],
                           where=None if multi else PairOrigins(cfg, run_dir, fresh and env.main, split))
        per_epoch = steps_per_epoch(task, cfg["accum_steps"])
        trainees = []
        for spec, d in zip(specs, dirs):
            if d != run_dir and env.main:  # each model's directory is a complete run directory
                d.mkdir()
                shutil.copytree(run_dir / "data", d / "data")
                for f in ("spm.model", "spm.vocab"):
                    if (run_dir / f).is_file():
                        shutil.copyfile(run_dir / f, d / f)
            trainees.append(make_mt_trainee(cfg, spec, spec_args[spec], per_epoch, device, d, env))
        if env.rank > 0:  # dropout noise of its own
            torch.manual_seed(cfg["seed"] * 1_000_003 + env.rank)

        def write_configs() -> None:
            # once fit has accepted the run (a resume restored): a refused resume keeps RUN_DIR as it was
            for t in trainees:
                if env.main:
                    ckpt.write_text(t.run_dir / "config.yaml",
                                    dump_config({**cfg, "model": t.spec, "model_args": spec_args[t.spec]}, MT_KEYS))

        if fresh and env.main:
            if multi:
                for name, part in split.items():
                    print(f"task {name}: {len(part.train):,} train / {len(part.dev):,} dev / {len(part.test):,} test "
                          f"pairs")
            whole = task.split
            print(f"{data}: {len(whole.train):,} train / {len(whole.dev):,} dev / {len(whole.test):,} test pairs, "
                  f"vocabulary {tokenizer.vocab_size:,}, {task.train_batches.tokens:,} target tokens per epoch")
            print(", ".join(f"{t.spec}: {t.params:,} parameters" for t in trainees)
                  + f"; {per_epoch} steps/epoch on {device}" + (f", {env.world} processes" if env.active else "")
                  + f"; run directory {run_dir}")
        averager = _Averager(cfg["average_last"]) if cfg["average_last"] > 1 else None
        title = f"{specs[0] if len(specs) == 1 else ' vs '.join(specs)} on {data}"
        pos = fit(task, trainees, resume=not fresh, title=title, epochs=cfg["epochs"], device=device,
                  bf16=cfg["bf16"], grad_clip=cfg["grad_clip"], accum_steps=cfg["accum_steps"],
                  max_steps=cfg["max_steps"], progress=cfg["progress"], eval_every=cfg["eval_every"],
                  on_eval=averager, checkpoint_every=cfg["checkpoint_every"], nonfinite=cfg["nonfinite"], env=env,
                  on_start=write_configs)
    except BaseException:
        if fresh and env.main and not any((d / STATE_FILE).exists() for d in [run_dir, *run_dir.glob("*")]):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: no half-made run directory
        raise
    finally:
        distributed.teardown(env)
    if not env.main:
        return {"run_dir": run_dir, "rank": env.rank}
    rows = []
    for t in trainees:
        test = _final_test(cfg, t, averager, task.split, tokenizer, device, pos["global_step"],
                           tasks=task.task_splits)
        last = t.rows[-1] if t.rows else {}
        rows.append({"model": t.spec, "params": t.params, "steps": pos["global_step"], "tok_per_s": t.rate,
                     "speed_ratio": t.rate / trainees[0].rate, "dev_bleu": last.get("dev_bleu", float("nan")),
                     "best_dev_bleu": t.best, "test_bleu": test["bleu"] if test else float("nan"),
                     "test_chrf": test["chrf"] if test else float("nan"),
                     "test_sent_per_s": test["sent_per_s"] if test else float("nan"), "beam_size": cfg["beam_size"],
                     "checkpoint": test["checkpoint"] if test else "last", "_test": test})
    if len(trainees) > 1:
        write_metrics([{k: r[k] for k in SIDEBYSIDE} for r in rows], run_dir / "sidebyside.csv")
        print(f"{'model':<28} {'params':>10} {'tok/s':>7} {'ratio':>6} {'dev BLEU':>8} {'test BLEU':>9} "
              f"{'chrF':>6}")
        for r in rows:
            print(f"{r['model']:<28} {r['params']:>10,} {r['tok_per_s']:>7.0f} {r['speed_ratio']:>6.3f} "
                  f"{r['dev_bleu']:>8.2f} {r['test_bleu']:>9.2f} {r['test_chrf']:>6.2f}")
    if pos["stopped"] and pos["epoch"] < cfg["epochs"]:
        print(f"stopped at max_steps={cfg['max_steps']} (step {pos['global_step']} of {cfg['epochs'] * per_epoch})")
    first = rows[0]
    return {"run_dir": run_dir, "dev_bleu": first["dev_bleu"], "best_bleu": first["best_dev_bleu"],
            "step": pos["global_step"], "epoch": pos["global_step"] / per_epoch, "test": first["_test"],
            "tok_per_s": first["tok_per_s"], "rows": [{k: r[k] for k in SIDEBYSIDE} for r in rows]}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``--config``, ``--resume``; every config key as ``--key value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.translate",
        description="Train a translation model (gatezoo EncoderDecoder or a peer) from a YAML config. Every config "
        "key can be overridden as --key VALUE (VALUE parsed as YAML; dotted keys reach into model_args, e.g. "
        "--model_args.ffn swiglu).",
        epilog=keys_help(MT_KEYS) + "\n\nexamples:\n"
        "  python -m gatezoo.train.translate --config configs/transformer_mt_quick.yaml\n"
        "  python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml \\\n"
        "      --model transformer_mt_tiny_rela\n"
        "  python -m gatezoo.train.translate --src train.en --tgt train.es --vocab_size 4000\n"
        "  python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml \\\n"
        "      --models transformer_mt_tiny torch_transformer_mt_tiny xtransformer_mt_tiny\n"
        "  python -m gatezoo.train.translate --resume runs/transformer_mt_tiny-20260101-120000\n"
        "\nexit status: 0 on success, 2 on a bad config or missing/unreadable data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="YAML", help="config file (keys below; omitted keys take their defaults)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest intact snapshot (RUN_DIR/checkpoints/), "
                        "with RUN_DIR/config.yaml as the config")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="train these models side by side on the same batches (instead of --model); each gets "
                        "a subdirectory, and sidebyside.csv compares them")
    return parser


def unused_options(cfg: Mapping, given, *, models: list[str] | None = None) -> list[str]:
    """The problems of command-line options (``given``: the config keys set on the command line)
    that would do nothing with the rest of ``cfg``: each names the option and what overrides it.
    A command refuses them rather than let a user believe they took effect."""
    given = set(given)
    problems = check_warmup_option(cfg, given)
    for part in ("dev", "test"):
        if f"{part}_size" in given and cfg[f"{part}_src"] is not None:
            problems.append(f"--{part}_size does nothing with {part}_src/{part}_tgt: the {part} pairs are those "
                            f"files")
    if "split_seed" in given and cfg["dev_src"] is not None and cfg["test_src"] is not None:
        problems.append("--split_seed does nothing when dev_src and test_src are both given: nothing is split off")
    if "vocab_size" in given and cfg["tokenizer"] is not None:
        problems.append(f"--vocab_size does nothing with tokenizer {cfg['tokenizer']!r}: its vocabulary is used")
    if "data" in given and cfg["tasks"] is not None:
        problems.append("--data does nothing with tasks: each task names its own data")
    if "data" in given and cfg["data"] == "bible" and (cfg["src"] is not None or cfg["tgt"] is not None):
        problems.append("--data bible does nothing with --src/--tgt, which train on those files (data: files)")
    if models and "model" in given:
        problems.append("--model does nothing with --models, which names every model of a side-by-side run")
    if "length_penalty" in given and cfg["beam_size"] == 1:
        problems.append("--length_penalty does nothing with beam_size 1: it ranks the hypotheses of beam search, "
                        "and greedy search has one")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        config_path = config_source(args.config, args.resume)
        overrides = parse_overrides(rest, MT_KEYS)
        cfg = load_mt_config(config_path, overrides)
        if args.models and args.resume is not None:
            raise ConfigError("--models starts a side-by-side run; --resume continues a single-model one")
        raise_all(unused_options(cfg, given_keys(overrides), models=args.models))
        result = train(cfg, resume=args.resume, models=args.models)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "rank" in result:  # a distributed run's other processes: rank 0 reports
        return 0
    print(f"final dev BLEU: {result['dev_bleu']:.2f} (best {result['best_bleu']:.2f}), "
          f"{result['tok_per_s']:.0f} target tokens/s -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
