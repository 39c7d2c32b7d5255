"""Train a translation model from a YAML config, on the shared loop.

    python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml
    python -m gatezoo.train.translate --config configs/transformer_mt_quick.yaml      # ~10 min, 2 cores
    python -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml --model transformer_mt_tiny_rela
    python -m gatezoo.train.translate --src train.en --tgt train.es --max_steps 2000
    python -m gatezoo.train.translate --resume runs/transformer_mt_tiny-20260101-120000

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
- ``last.safetensors``, ``best.safetensors`` (highest dev BLEU), ``state.pt`` for ``--resume``;
- with ``average_last N`` > 1: ``averaged.safetensors``, the mean of the weights at the last N
  evaluations (kept under ``avg/``);
- ``test.json``: test BLEU/chrF of the final (averaged, else last) weights with ``beam_size``,
  unless ``final_test false``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .classify import new_run_dir
from .config import KEYS, ConfigError, Key, dump_config, keys_help, load_config, warmup_steps
from .data import DataFormatError, DataNotFoundError
from .factory import build_model, count_params, parse_model_spec
from .loop import STATE_FILE, Trainee, fit, resolve_device, steps_per_epoch
from .optim import SCHEDULES, build_optimizer, build_scheduler
from .text import PAD_ID, Split, TextDataError, TokenBatches, Tokenizer, bible_pairs, read_parallel, split_pairs

_SHARED = ("model_args", "epochs", "lr", "weight_decay", "warmup_epochs", "accum_steps", "label_smoothing", "bf16",
           "seed", "out", "name", "device", "max_steps", "threads", "progress")

MT_KEYS: dict[str, Key] = {
    "model": Key("transformer_mt_tiny", "str", "model: transformer_mt_tiny, transformer_mt_tiny_rela, a translation "
                 "peer (torch_transformer_mt_tiny, xtransformer_mt_tiny), optionally NAME:key=value,..."),
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
}
"""The config keys of the translation command (its own schema; see :mod:`gatezoo.train.config`)."""

_DEFAULTS = {"epochs": 10, "lr": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.1}

METRICS = ("epoch", "step", "train_loss", "train_acc", "dev_loss", "dev_bleu", "lr", "tok_per_s", "seconds")
"""The columns of a translation run's ``metrics.csv``."""


def load_mt_config(path=None, overrides=(), base: Mapping | None = None) -> dict:
    """The translation config: :data:`MT_KEYS` defaults (with this command's own: 10 epochs,
    lr 1e-3, no weight decay), ``base``, the YAML file, then overrides; validated."""
    return load_config(path, overrides, base={**_DEFAULTS, **(base or {})}, keys=MT_KEYS)


class Translation:
    """The translation task for :func:`gatezoo.train.loop.fit`.

    Args:
        split: the train/dev/test pairs. tokenizer: the joint :class:`~gatezoo.train.text.Tokenizer`.
        max_tokens: padded target tokens per training batch. max_len: the model's length limit
            (a longer training pair is an error naming it). seed: of the batch order.
        label_smoothing: of the training loss. eval_batch_size: sentences per decoding batch.
        dev_sentences: dev pairs decoded for BLEU. device: where the batches go.
    """

    unit = "tok"
    score = "dev_bleu"
    curves = (("cross-entropy per token", ("train_loss", "dev_loss")), ("dev BLEU", ("dev_bleu",)))

    def __init__(self, split: Split, tokenizer: Tokenizer, *, max_tokens: int = 2500, max_len: int = 256,
                 seed: int = 0, label_smoothing: float = 0.1, eval_batch_size: int = 64, dev_sentences: int = 500,
                 device: torch.device | str = "cpu", data: str = "bible"):
        self.split, self.tokenizer, self.data = split, tokenizer, data
        self.device = torch.device(device)
        self.label_smoothing, self.eval_batch_size = label_smoothing, eval_batch_size
        self.train_batches = self._batches(split.train, max_tokens, seed, True, max_len, "train")
        self.dev_batches = self._batches(split.dev, max_tokens, seed, False, max_len, "dev") if split.dev else None
        self.dev_pairs = list(split.dev[:dev_sentences])

    def _batches(self, pairs, max_tokens, seed, shuffle, max_len, part):
        src = self.tokenizer.encode([s for s, _ in pairs])
        tgt = self.tokenizer.encode([t for _, t in pairs])
        for i, (s, t) in enumerate(zip(src, tgt)):
            if len(s) > max_len or len(t) + 1 > max_len:
                raise TextDataError(f"{part} pair {i + 1} has {len(s)} source and {len(t)} target tokens; the model "
                                    f"allows {max_len} (source) and {max_len - 1} (target): drop the pair or raise "
                                    f"model_args.max_len")
            if not s or not t:
                raise TextDataError(f"{part} pair {i + 1} encodes to no tokens")
        return _DeviceBatches(TokenBatches(src, tgt, max_tokens=max_tokens, seed=seed, shuffle=shuffle), self.device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int, dict]:
        """Label-smoothed cross-entropy per target token (float32), the target tokens, and the
        number of them predicted right."""
        logits = model(batch.src, batch.tgt_in)
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
        """``dev_loss`` (plain cross-entropy per token) and ``dev_bleu`` (greedy, detokenised)."""
        from gatezoo.eval.translate import evaluate_translation

        if self.dev_batches is None:
            return {"dev_loss": float("nan"), "dev_bleu": float("nan")}
        total, count = 0.0, 0
        for batch in self.dev_batches.epoch(0):
            logits = model(batch.src, batch.tgt_in).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1),
                                           ignore_index=PAD_ID, reduction="sum"))
            count += batch.ntokens
        ev = evaluate_translation(model, self.tokenizer, self.dev_pairs, beam_size=1,
                                  batch_sentences=self.eval_batch_size, device=self.device)
        return {"dev_loss": total / max(count, 1), "dev_bleu": ev["bleu"]}

    def checkpoint_info(self) -> dict:
        """What a checkpoint needs to translate again: the tokenizer file (in the run directory)."""
        return {"name": "translation", "data": self.data, "tokenizer": "spm.model",
                "vocab_size": self.tokenizer.vocab_size}


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
    split = split_pairs(pairs, dev=0 if dev is not None else cfg["dev_size"],
                        test=0 if test is not None else cfg["test_size"], seed=cfg["split_seed"])
    split = Split(split.train, dev if dev is not None else split.dev, test if test is not None else split.test)
    split.save(data_dir)
    if cfg["tokenizer"]:
        source = Path(cfg["tokenizer"])
        tokenizer = Tokenizer(source)  # checks it
        shutil.copyfile(source, run_dir / "spm.model")
        if source.with_suffix(".vocab").is_file():
            shutil.copyfile(source.with_suffix(".vocab"), run_dir / "spm.vocab")
        tokenizer = Tokenizer(run_dir / "spm.model")
    else:
        sentences = [s for s, _ in split.train] + [t for _, t in split.train]
        tokenizer = Tokenizer.train(sentences, run_dir / "spm", vocab_size=cfg["vocab_size"])
    return split, tokenizer, data


def make_mt_trainee(cfg: Mapping, spec: str, model_args: Mapping, per_epoch: int, device: torch.device,
                    run_dir: Path | None = None) -> Trainee:
    """Model ``spec`` seeded with ``cfg["seed"]``, Adam (0.9, ``adam_beta2``) and the schedule of
    ``cfg``, as a :class:`~gatezoo.train.loop.Trainee`."""
    try:
        parse_model_spec(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    torch.manual_seed(cfg["seed"])
    try:
        model = build_model(spec, **model_args).to(device)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {spec!r} with model_args {dict(model_args)}: {e}") from e
    if not hasattr(model, "decode_step"):
        raise ConfigError(f"model {spec!r} is not a translation model (no decode_step)")
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"], betas=(0.9, cfg["adam_beta2"]), eps=1e-9)
    scheduler = build_scheduler(optimizer, warmup_steps(cfg, per_epoch), cfg["epochs"] * per_epoch, cfg["schedule"])
    return Trainee(spec, model, optimizer, scheduler, model_args=dict(model_args), run_dir=run_dir,
                   params=count_params(model))


class _Averager:
    """Keeps the weights of the last ``n`` evaluations under ``run_dir/avg`` and averages them."""

    def __init__(self, trainee: Trainee, n: int):
        self.trainee, self.n = trainee, n
        self.dir = trainee.run_dir / "avg"

    def __call__(self, results) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(exist_ok=True)
        for t, row in results:
            state = {k: v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
            save_file(state, str(self.dir / f"step-{int(row['step']):08d}.safetensors"))
        for old in sorted(self.dir.glob("step-*.safetensors"))[:-self.n]:
            old.unlink()

    def average(self, meta: dict) -> Path | None:
        """Write ``averaged.safetensors`` (the mean of the kept weights); None if fewer than 2."""
        from safetensors.torch import load_file

        files = sorted(self.dir.glob("step-*.safetensors"))[-self.n:] if self.dir.is_dir() else []
        if len(files) < 2:
            return None
        total = None
        for f in files:
            state = load_file(str(f))
            total = {k: v.double() for k, v in state.items()} if total is None else {
                k: total[k] + state[k].double() for k in total}
        model = self.trainee.model
        reference = model.state_dict()
        averaged = {k: (v / len(files)).to(reference[k].dtype) for k, v in total.items()}
        current = {k: v.detach().clone() for k, v in reference.items()}
        model.load_state_dict(averaged)
        path = self.trainee.run_dir / "averaged.safetensors"
        ckpt.save_checkpoint(model, path, {**meta, "averaged_steps": [int(f.stem.split("-")[1]) for f in files]})
        model.load_state_dict(current)
        return path


def train(cfg: dict, resume: str | Path | None = None) -> dict:
    """Run (or, with ``resume``, continue) the translation training ``cfg`` describes.

    Returns ``{"run_dir", "dev_bleu" (last evaluation), "best_bleu", "step", "epoch", "test"}``
    (``test``: the final test scores, or None)."""
    from gatezoo.eval.translate import evaluate_translation

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    fresh = resume is None
    run_dir = new_run_dir(cfg["out"], cfg["name"] or cfg["model"].split(":")[0]) if fresh else Path(resume)
    try:
        split, tokenizer, data = prepare_data(cfg, run_dir, fresh)
        model_args = {**cfg["model_args"], "vocab_size": tokenizer.vocab_size}
        if cfg["model_args"].get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ConfigError(f"model_args.vocab_size {cfg['model_args']['vocab_size']} differs from the tokenizer's "
                              f"{tokenizer.vocab_size}; leave it out (it is set from the tokenizer)")
        cfg = {**cfg, "model_args": model_args}
        torch.manual_seed(cfg["seed"])
        probe = build_model(cfg["model"], **model_args)
        from gatezoo.eval.decode import model_max_len

        max_len = model_max_len(probe)
        del probe
        task = Translation(split, tokenizer, max_tokens=cfg["max_tokens"], max_len=max_len, seed=cfg["seed"],
                           label_smoothing=cfg["label_smoothing"], eval_batch_size=cfg["eval_batch_size"],
                           dev_sentences=cfg["dev_sentences"], device=device, data=data)
        per_epoch = steps_per_epoch(task, cfg["accum_steps"])
        trainee = make_mt_trainee(cfg, cfg["model"], model_args, per_epoch, device, run_dir)
        if fresh:
            print(f"{data}: {len(split.train):,} train / {len(split.dev):,} dev / {len(split.test):,} test pairs, "
                  f"vocabulary {tokenizer.vocab_size:,}, {task.train_batches.tokens:,} target tokens per epoch")
            print(f"{cfg['model']}: {trainee.params:,} parameters, {per_epoch} steps/epoch on {device}; "
                  f"run directory {run_dir}")
        (run_dir / "config.yaml").write_text(dump_config(cfg, MT_KEYS))
        averager = _Averager(trainee, cfg["average_last"]) if cfg["average_last"] > 1 else None
        pos = fit(task, [trainee], resume=not fresh, title=f"{cfg['model']} on {data}", epochs=cfg["epochs"],
                  device=device, bf16=cfg["bf16"], grad_clip=cfg["grad_clip"], accum_steps=cfg["accum_steps"],
                  max_steps=cfg["max_steps"], progress=cfg["progress"], eval_every=cfg["eval_every"],
                  on_eval=averager)
    except BaseException:
        if fresh and not (run_dir / STATE_FILE).exists():  # nothing worth keeping: no half-made run directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    meta = ckpt.read_checkpoint_metadata(run_dir / "last.safetensors")
    final = "last"
    if averager is not None and averager.average(meta) is not None:
        final = "averaged"
    test = None
    if cfg["final_test"] and split.test:
        model, _ = ckpt.load_checkpoint(run_dir / f"{final}.safetensors", device)
        test = evaluate_translation(model.eval(), tokenizer, split.test, beam_size=cfg["beam_size"],
                                    length_penalty=cfg["length_penalty"], max_len_a=cfg["max_len_a"],
                                    max_len_b=cfg["max_len_b"], batch_sentences=cfg["eval_batch_size"],
                                    device=device, progress=cfg["progress"])
        (run_dir / "test.hyp").write_text("".join(f"{h}\n" for h in test.pop("hypotheses")), encoding="utf-8")
        test.update(checkpoint=final, beam_size=cfg["beam_size"], step=pos["global_step"],
                    train_tok_per_s=trainee.rate)
        (run_dir / "test.json").write_text(json.dumps(test, indent=2))
        print(f"test ({final} weights, beam {cfg['beam_size']}): BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f} "
              f"[{test['bleu_signature']}], {test['sent_per_s']:.1f} sentences/s")
    if pos["stopped"] and pos["epoch"] < cfg["epochs"]:
        print(f"stopped at max_steps={cfg['max_steps']} (step {pos['global_step']} of {cfg['epochs'] * per_epoch})")
    last = trainee.rows[-1] if trainee.rows else {}
    return {"run_dir": run_dir, "dev_bleu": last.get("dev_bleu", float("nan")), "best_bleu": trainee.best,
            "step": pos["global_step"], "epoch": pos["global_step"] / per_epoch, "test": test,
            "tok_per_s": trainee.rate}


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
        "  python -m gatezoo.train.translate --resume runs/transformer_mt_tiny-20260101-120000\n"
        "\nexit status: 0 on success, 2 on a bad config or missing/unreadable data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="YAML", help="config file (keys below; omitted keys take their defaults)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its state.pt, with RUN_DIR/config.yaml as the config")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.resume is not None:
            if args.config is not None:
                raise ConfigError("give --config or --resume, not both (a resumed run uses RUN_DIR/config.yaml)")
            config_path = Path(args.resume) / "config.yaml"
            if not config_path.is_file():
                raise ConfigError(f"--resume {args.resume!r}: no config.yaml there (not a run directory)")
        else:
            config_path = args.config
        cfg = load_mt_config(config_path, rest)
        result = train(cfg, resume=args.resume)
    except (ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"final dev BLEU: {result['dev_bleu']:.2f} (best {result['best_bleu']:.2f}), "
          f"{result['tok_per_s']:.0f} target tokens/s -- {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
