"""Translate with a trained run, or score it: the command line over :mod:`gatezoo.eval.translate`.

    echo "In the beginning was the Word" | python -m gatezoo.train.translate_eval RUN_DIR
    python -m gatezoo.train.translate_eval RUN_DIR --evaluate                 # the run's test split
    python -m gatezoo.train.translate_eval RUN_DIR --evaluate --split dev --beam_size 1
    python -m gatezoo.train.translate_eval RUN_DIR --evaluate --src my.en --ref my.es
    python -m gatezoo.train.translate_eval RUN_DIR --evaluate --ctranslate2 --threads 2   # against CTranslate2

(``gatezoo-translate-eval`` is the same command once the package is installed.)

A run directory (written by :mod:`gatezoo.train.translate`) holds the tokenizer (``spm.model``),
the split (``data/``) and the checkpoints; ``--checkpoint`` picks ``best`` (default, the highest
dev BLEU), ``last`` or ``averaged`` (the mean of the last evaluations' weights).

Without ``--evaluate`` the command reads sentences from stdin (UTF-8, one per line; ``\n``,
``\r\n`` and a bare ``\r`` end a line, as in the training files) and writes their translations to
stdout in the same order, a blank line for a blank line. Bytes that are not UTF-8, or a sentence
longer than the model allows, stop it with an error naming ``stdin``, the physical line (and
the byte offset), exit status 2. With it, the command translates a split of the run (or
``--src`` files) and prints BLEU and chrF on detokenised text with their sacreBLEU signatures,
the decoding speed, and, for a ReLA model, per layer and attention kind the share of
exactly-zero attention weights, of all-zero ("null") and of zero-free ("full") query rows (the
sparsity figures of Zhang et al. 2021), and the share of the scores that is a row's common
offset (:func:`gatezoo.eval.translate.record_rela_sparsity`). ``--ctranslate2`` adds a
comparison with CTranslate2 on the exported weights: decoding speed with the same beam, length
penalty, batches and threads, and the share of sentences whose greedy outputs are
token-identical (:func:`gatezoo.eval.translate.compare_ctranslate2`); a model CTranslate2 cannot
run (ReLA, say) is refused before the decoding.

A multi-task run (trained with ``tasks:``) needs ``--task NAME``, one of the run's tasks: the
sentences are translated as that task (its task id goes to a task-aware model) and
``--evaluate`` scores the task's split (``data/<task>/``); a single-task run refuses
``--task``.

Every option is checked before the run is loaded (:func:`check_args`): a NaN or infinite
``--length_penalty`` or ``--max_len_a``, ``--threads`` or ``--beam_size`` below 1, and an option
that would do nothing in the mode chosen (``--split``, ``--src``, ``--ref``, ``--ctranslate2``,
``--output``, ``--json`` without ``--evaluate``; ``--split`` with ``--src``; ``--length_penalty``
with ``--beam_size 1``) are errors with exit status 2. The command never writes into the run
directory; ``--output`` and ``--json`` are written only once everything succeeded, each through a
temporary file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from gatezoo.eval.translate import (
    check_ctranslate2,
    compare_ctranslate2,
    evaluate_translation,
    rela_sparsity,
    translate_texts,
)

from .core.checkpoint import load_checkpoint
from .core.runs import resolve_device
from .data.images import DataFormatError, DataNotFoundError
from .data.text import Split, Tokenizer, decode_lines, read_parallel

CHECKPOINTS = ("best", "last", "averaged")
"""Checkpoint names of a translation run directory (``<name>.safetensors``)."""


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"):
    """``(model, tokenizer, metadata)`` of a translation run directory (eval mode)."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    path = run_dir / f"{checkpoint}.safetensors"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} not found")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found (checkpoints there: "
                                f"{sorted(p.stem for p in run_dir.glob('*.safetensors'))})")
    model, meta = load_checkpoint(path, device)
    task = meta.get("task", {})
    if task.get("name") != "translation":
        raise ValueError(f"{str(path)!r} is not a translation checkpoint (task {task.get('name')!r})")
    tokenizer = Tokenizer(run_dir / task.get("tokenizer", "spm.model"))
    return model.eval(), tokenizer, meta


EVALUATE_ONLY = ("split", "src", "ref", "ctranslate2", "output", "json")
"""Options that apply to ``--evaluate`` only (refused without it: they would do nothing)."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.translate_eval",
        description="Translate stdin to stdout with a trained translation run, or (--evaluate) score a split or "
        "files with sacreBLEU BLEU and chrF. Input is UTF-8, one sentence per line (\\n, \\r\\n or \\r line "
        "ends); a blank input line gives a blank output line.",
        epilog="exit status: 0 on success, 2 on a bad option, a missing or damaged run directory, or unusable input "
        "(nothing is written then).",
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", help="a run directory written by python -m gatezoo.train.translate")
    parser.add_argument("--checkpoint", default="best", choices=CHECKPOINTS, help="which weights [best]")
    parser.add_argument("--evaluate", action="store_true", help="score a split of the run (or --src/--ref)")
    parser.add_argument("--split", default=None, choices=("test", "dev"),
                        help="--evaluate: the split to score [test]; not with --src")
    parser.add_argument("--src", help="--evaluate: source file to score instead of a split (with --ref)")
    parser.add_argument("--ref", help="--evaluate: reference file of --src")
    parser.add_argument("--beam_size", type=int, default=5, help="1 = greedy [5]")
    parser.add_argument("--length_penalty", type=float, default=None,
                        help="beam search: score / length**penalty, a finite number >= 0 [1.0]; not with "
                        "--beam_size 1")
    parser.add_argument("--max_len_a", type=float, default=1.2, help="length limit a * source + b, a >= 0 [1.2]")
    parser.add_argument("--max_len_b", type=int, default=10, help="length limit a * source + b, b >= 0 [10]")
    parser.add_argument("--batch_sentences", type=int, default=64, help="sentences per decoding batch [64]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, >= 1")
    parser.add_argument("--ctranslate2", action="store_true",
                        help="--evaluate: also export the model to CTranslate2 and compare decoding speed (beam "
                        "--beam_size) and greedy outputs on the same sentences, batches and threads")
    parser.add_argument("--task", help="a multi-task run: the task to translate or evaluate (required there, "
                        "refused for a single-task run)")
    parser.add_argument("--output", help="--evaluate: also write the translations to this file")
    parser.add_argument("--json", help="--evaluate: also write the scores to this JSON file")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem of the parsed options, before anything is loaded: a value out of range, an
    option that does nothing in the mode chosen (an ``--evaluate`` option without it, ``--split``
    with ``--src``, ``--length_penalty`` with greedy search), an output path that cannot be written."""
    problems = []
    if not args.evaluate:
        problems.extend(f"--{name} needs --evaluate (without it the command translates stdin, and --{name} would do "
                        f"nothing)" for name in EVALUATE_ONLY
                        if getattr(args, name) not in (None, False))
    else:
        if args.split is not None and args.src is not None:
            problems.append(f"--split {args.split} does nothing with --src: the sentences scored are those of --src")
        if (args.src is None) != (args.ref is None):
            problems.append("--src and --ref go together")
    for name in ("beam_size", "batch_sentences"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.length_penalty is not None:
        if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
            problems.append(f"--length_penalty must be a finite number >= 0, got {args.length_penalty}")
        elif args.beam_size == 1:
            problems.append("--length_penalty does nothing with --beam_size 1: it ranks the hypotheses of beam "
                            "search, and greedy search has one")
    if not (math.isfinite(args.max_len_a) and args.max_len_a >= 0):
        problems.append(f"--max_len_a must be a finite number >= 0, got {args.max_len_a}")
    if args.max_len_b < 0:
        problems.append(f"--max_len_b must be >= 0, got {args.max_len_b}")
    paths = {}
    for name in ("output", "json"):
        path = getattr(args, name) if args.evaluate else None
        if path is None:
            continue
        target = Path(path)
        if target.is_dir():
            problems.append(f"--{name} {path!r} is a directory; give a file name")
        elif not target.parent.is_dir():
            problems.append(f"--{name} {path!r}: the directory {str(target.parent)!r} does not exist")
        elif target.resolve() in paths.values():
            problems.append(f"--{name} and --{next(iter(paths))} name the same file {path!r}")
        paths[name] = target.resolve()
    return problems


def run_task(meta: dict, task: str | None, model) -> tuple[int | None, str | None]:
    """``(task id for the model, task name)`` of ``--task`` for a run with checkpoint metadata
    ``meta``: the task id is None for a model that does not route by task, the name None for a
    single-task run. Raises ValueError for a missing, unknown or needless ``--task``."""
    tasks = meta.get("task", {}).get("tasks")
    if not tasks:
        if task is not None:
            raise ValueError(f"--task {task} does nothing: this run has a single task (it was not trained with tasks:)")
        return None, None
    if task is None:
        raise ValueError(f"this is a multi-task run: choose the task with --task (one of {', '.join(tasks)})")
    if task not in tasks:
        raise ValueError(f"--task {task!r} is not a task of this run; its tasks are {', '.join(tasks)}")
    index = tasks.index(task)
    return (index if getattr(model, "num_tasks", None) is not None else None), task


def _read_stdin() -> list[str]:
    """The lines of stdin, decoded as UTF-8 like a file (:func:`~gatezoo.train.data.text.decode_lines`),
    stripped; blank lines kept."""
    stream = sys.stdin
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8", "surrogatepass")
    return [line.strip() for line in decode_lines(raw, "stdin")]


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so an error leaves no half file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        print("error: " + ("; ".join(problems) if len(problems) == 1 else
                           f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)), file=sys.stderr)
        return 2
    length_penalty = 1.0 if args.length_penalty is None else args.length_penalty
    try:
        device = resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        options = dict(beam_size=args.beam_size, length_penalty=length_penalty, max_len_a=args.max_len_a,
                       max_len_b=args.max_len_b, batch_sentences=args.batch_sentences, device=device)
        model, tokenizer, meta = load_run(args.run_dir, args.checkpoint, device)
        task_id, task = run_task(meta, args.task, model)
        options["task_ids"] = task_id
        if not args.evaluate:
            lines = _read_stdin()
            kept = [i for i, line in enumerate(lines) if line]
            result = translate_texts(model, tokenizer, [lines[i] for i in kept],
                                     names=[f"stdin line {i + 1}" for i in kept], **options)
            out = [""] * len(lines)
            for i, hyp in zip(kept, result["hypotheses"]):
                out[i] = hyp
            sys.stdout.write("".join(f"{line}\n" for line in out))
            return 0
        if args.src is not None:
            pairs, what = read_parallel(args.src, args.ref), f"{args.src} -> {args.ref}"
            names = [f"{args.src} line {i + 1}" for i in range(len(pairs))]
        else:
            split = args.split or "test"
            data = Path(args.run_dir) / "data"
            if task is not None:
                data = data / task
            pairs, what = getattr(Split.load(data), split), f"the {split} split"
            if not pairs:
                raise ValueError(f"the run's {split} split is empty")
            names = [f"{data / f'{split}.src'} line {i + 1}" for i in range(len(pairs))]
        if args.ctranslate2:  # refuse a model CTranslate2 cannot run before the long decoding, not after
            check_ctranslate2(model, tokenizer)
        ev = evaluate_translation(model, tokenizer, pairs, progress=True, names=names, **options)
        print(f"{meta['model']} ({args.checkpoint}, step {meta.get('step')}) on {what}"
              f"{f' of task {task}' if task else ''}, {len(pairs)} sentences, beam {args.beam_size}")
        print(f"BLEU {ev['bleu']:.2f}  [{ev['bleu_signature']}]")
        print(f"chrF {ev['chrf']:.2f}  [{ev['chrf_signature']}]")
        print(f"{ev['sent_per_s']:.1f} sentences/s, {ev['tok_per_s']:.0f} target tokens/s ({ev['seconds']:.1f} s)")
        sparsity = rela_sparsity(model, tokenizer, pairs, device=device, task_ids=task_id)
        if sparsity:
            print("ReLA sparsity (first 200 sentences, teacher-forced): layer, kind, zero weights, null rows, "
                  "full rows, row offset share of the scores")
            for row in sparsity:
                print(f"  {row['layer']}  {row['kind']:<12}  {100 * row['zero_share']:5.1f}%  "
                      f"{100 * row['null_row_share']:5.1f}%  {100 * row['full_row_share']:5.1f}%  "
                      f"{100 * row['offset_share']:5.1f}%")
        comparison = None
        if args.ctranslate2:
            comparison = compare_ctranslate2(model, tokenizer, [src for src, _ in pairs], beam_size=args.beam_size,
                                             length_penalty=length_penalty, max_len_a=args.max_len_a,
                                             max_len_b=args.max_len_b, batch_sentences=args.batch_sentences,
                                             threads=args.threads or torch.get_num_threads())
            c = comparison
            print(f"CTranslate2 {c['ctranslate2_version']} (float32, {c['threads']} threads, beam {c['beam_size']}): "
                  f"{c['ctranslate2_tok_per_s']:.0f} target tokens/s; gatezoo {c['gatezoo_tok_per_s']:.0f} "
                  f"({c['speed_ratio']:.2f}x); greedy outputs token-identical on "
                  f"{100 * c['greedy_identical']:.1f}% of {c['sentences']} sentences")
        writes = {}
        if args.output:
            writes[args.output] = "".join(f"{h}\n" for h in ev["hypotheses"])
        if args.json:
            record = {k: v for k, v in ev.items() if k != "hypotheses"}
            record.update(model=meta["model"], checkpoint=args.checkpoint, beam_size=args.beam_size,
                          rela_sparsity=sparsity, ctranslate2=comparison, task=task)
            writes[args.json] = json.dumps(record, indent=2)
    except (ValueError, FileNotFoundError, ImportError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        for path, text in writes.items():
            _write_atomically(path, text)
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
