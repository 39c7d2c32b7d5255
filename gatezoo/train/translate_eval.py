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

Without ``--evaluate`` the command reads sentences from stdin, one per line, and writes their
translations to stdout in the same order. With it, the command translates a split of the run (or
``--src`` files) and prints BLEU and chrF on detokenised text with their sacreBLEU signatures,
the decoding speed, and, for a ReLA model, per layer and attention kind the share of
exactly-zero attention weights, of all-zero ("null") and of zero-free ("full") query rows (the
sparsity figures of Zhang et al. 2021), and the share of the scores that is a row's common
offset (:func:`gatezoo.eval.translate.record_rela_sparsity`). ``--ctranslate2`` adds a
comparison with CTranslate2 on the exported weights: decoding speed with the same beam, length
penalty, batches and threads, and the share of sentences whose greedy outputs are
token-identical (:func:`gatezoo.eval.translate.compare_ctranslate2`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gatezoo.eval.translate import compare_ctranslate2, evaluate_translation, rela_sparsity, translate_texts

from .core.checkpoint import load_checkpoint
from .data.images import DataFormatError, DataNotFoundError
from .data.text import Split, Tokenizer, read_parallel

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


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.train.translate_eval",
        description="Translate stdin to stdout with a trained translation run, or (--evaluate) score a split or "
        "files with sacreBLEU BLEU and chrF.",
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", help="a run directory written by python -m gatezoo.train.translate")
    parser.add_argument("--checkpoint", default="best", choices=CHECKPOINTS, help="which weights [best]")
    parser.add_argument("--evaluate", action="store_true", help="score a split of the run (or --src/--ref)")
    parser.add_argument("--split", default="test", choices=("test", "dev"), help="the split to score [test]")
    parser.add_argument("--src", help="source file to score instead of a split (with --ref)")
    parser.add_argument("--ref", help="reference file of --src")
    parser.add_argument("--beam_size", type=int, default=5, help="1 = greedy [5]")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="score / length**penalty [1.0]")
    parser.add_argument("--max_len_a", type=float, default=1.2, help="length limit a * source + b [1.2]")
    parser.add_argument("--max_len_b", type=int, default=10, help="length limit a * source + b [10]")
    parser.add_argument("--batch_sentences", type=int, default=64, help="sentences per decoding batch [64]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... [cpu]")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--ctranslate2", action="store_true",
                        help="--evaluate: also export the model to CTranslate2 and compare decoding speed (beam "
                        "--beam_size) and greedy outputs on the same sentences, batches and threads")
    parser.add_argument("--output", help="--evaluate: also write the translations to this file")
    parser.add_argument("--json", help="--evaluate: also write the scores to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("beam_size", "batch_sentences"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    options = dict(beam_size=args.beam_size, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                   max_len_b=args.max_len_b, batch_sentences=args.batch_sentences, device=args.device)
    try:
        model, tokenizer, meta = load_run(args.run_dir, args.checkpoint, args.device)
        if not args.evaluate:
            lines = [line.strip() for line in sys.stdin]
            kept = [i for i, line in enumerate(lines) if line]
            result = translate_texts(model, tokenizer, [lines[i] for i in kept], **options)
            out = [""] * len(lines)
            for i, hyp in zip(kept, result["hypotheses"]):
                out[i] = hyp
            sys.stdout.write("".join(f"{line}\n" for line in out))
            return 0
        if (args.src is None) != (args.ref is None):
            raise ValueError("--src and --ref go together")
        if args.src is not None:
            pairs, what = read_parallel(args.src, args.ref), f"{args.src} -> {args.ref}"
        else:
            pairs, what = getattr(Split.load(Path(args.run_dir) / "data"), args.split), f"the {args.split} split"
            if not pairs:
                raise ValueError(f"the run's {args.split} split is empty")
        ev = evaluate_translation(model, tokenizer, pairs, progress=True, **options)
        print(f"{meta['model']} ({args.checkpoint}, step {meta.get('step')}) on {what}, {len(pairs)} sentences, "
              f"beam {args.beam_size}")
        print(f"BLEU {ev['bleu']:.2f}  [{ev['bleu_signature']}]")
        print(f"chrF {ev['chrf']:.2f}  [{ev['chrf_signature']}]")
        print(f"{ev['sent_per_s']:.1f} sentences/s, {ev['tok_per_s']:.0f} target tokens/s ({ev['seconds']:.1f} s)")
        sparsity = rela_sparsity(model, tokenizer, pairs, device=args.device)
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
                                             length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                                             max_len_b=args.max_len_b, batch_sentences=args.batch_sentences,
                                             threads=args.threads or torch.get_num_threads())
            c = comparison
            print(f"CTranslate2 {c['ctranslate2_version']} (float32, {c['threads']} threads, beam {c['beam_size']}): "
                  f"{c['ctranslate2_tok_per_s']:.0f} target tokens/s; gatezoo {c['gatezoo_tok_per_s']:.0f} "
                  f"({c['speed_ratio']:.2f}x); greedy outputs token-identical on "
                  f"{100 * c['greedy_identical']:.1f}% of {c['sentences']} sentences")
        if args.output:
            Path(args.output).write_text("".join(f"{h}\n" for h in ev["hypotheses"]), encoding="utf-8")
        if args.json:
            record = {k: v for k, v in ev.items() if k != "hypotheses"}
            record.update(model=meta["model"], checkpoint=args.checkpoint, beam_size=args.beam_size,
                          rela_sparsity=sparsity, ctranslate2=comparison)
            Path(args.json).write_text(json.dumps(record, indent=2))
    except (ValueError, FileNotFoundError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
