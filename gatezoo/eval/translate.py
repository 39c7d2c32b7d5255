"""Translate with a trained run, and score translations: sacreBLEU, chrF and ReLA sparsity.

    echo "In the beginning was the Word" | python -m gatezoo.eval.translate RUN_DIR
    python -m gatezoo.eval.translate RUN_DIR --evaluate                 # the run's test split
    python -m gatezoo.eval.translate RUN_DIR --evaluate --split dev --beam_size 1
    python -m gatezoo.eval.translate RUN_DIR --evaluate --src my.en --ref my.es
    python -m gatezoo.eval.translate RUN_DIR --evaluate --ctranslate2 --threads 2   # against CTranslate2

A run directory (written by :mod:`gatezoo.train.translate`) holds the tokenizer (``spm.model``),
the split (``data/``) and the checkpoints; ``--checkpoint`` picks ``best`` (default, the highest
dev BLEU), ``last`` or ``averaged`` (the mean of the last evaluations' weights).

Without ``--evaluate`` the command reads sentences from stdin, one per line, and writes their
translations to stdout in the same order. With it, the command translates a split of the run (or
``--src`` files) and prints BLEU and chrF on detokenised text with their sacreBLEU signatures,
the decoding speed, and, for a ReLA model, per layer and attention kind the share of
exactly-zero attention weights, of all-zero ("null") and of zero-free ("full") query rows (the
sparsity figures of Zhang et al. 2021), and the share of the scores that is a row's common
offset (:func:`record_rela_sparsity`). ``--ctranslate2`` adds a comparison with CTranslate2 on
the exported weights: decoding speed with the same beam, length penalty, batches and threads,
and the share of sentences whose greedy outputs are token-identical (:func:`compare_ctranslate2`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from gatezoo.blocks import ReLAAttention

from .decode import translate_ids

CHECKPOINTS = ("best", "last", "averaged")
"""Checkpoint names of a translation run directory (``<name>.safetensors``)."""


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"):
    """``(model, tokenizer, metadata)`` of a translation run directory (eval mode)."""
    from gatezoo.train.checkpoint import load_checkpoint
    from gatezoo.train.text import Tokenizer

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


def _batches(lengths: Sequence[int], max_sentences: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), at most ``max_sentences``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), max_sentences):
        yield order[start:start + max_sentences]


def translate_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, beam_size: int = 5,
                    length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                    batch_sentences: int = 64, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Translate ``texts``; returns ``{"hypotheses", "seconds", "tokens"}`` (detokenised strings in
    input order, decoding wall time, generated target tokens with EOS).

    Sources longer than the model allows raise ``ValueError`` naming the sentence."""
    from tqdm import tqdm

    from gatezoo.eval.decode import model_max_len
    from gatezoo.train.text import collate

    ids = tokenizer.encode(list(texts))
    limit = model_max_len(model)
    for i, row in enumerate(ids):
        if len(row) > limit:
            raise ValueError(f"sentence {i + 1} has {len(row)} tokens, more than the model's max_len={limit}")
        if not row:
            raise ValueError(f"sentence {i + 1} is empty")
    out: list[list[int]] = [[] for _ in ids]
    model.eval()
    t0 = time.perf_counter()
    groups = list(_batches([len(r) for r in ids], batch_sentences))
    with torch.no_grad():
        for group in tqdm(groups, disable=not progress, desc="translating", unit="batch", leave=False):
            src = collate([ids[i] for i in group], [[] for _ in group]).src.to(device)
            hyps = translate_ids(model, src, beam_size=beam_size, length_penalty=length_penalty,
                                 max_len_a=max_len_a, max_len_b=max_len_b)
            for i, h in zip(group, hyps):
                out[i] = h
    seconds = time.perf_counter() - t0
    return {"hypotheses": [tokenizer.decode(h) for h in out], "seconds": seconds,
            "tokens": sum(len(h) + 1 for h in out)}


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF of detokenised ``hypotheses`` against ``references`` (sacreBLEU's
    defaults: 13a tokenisation, exponential smoothing; chrF with char order 6, beta 2)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def evaluate_translation(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], **options) -> dict:
    """Translate the sources of ``pairs`` (keyword ``options`` as :func:`translate_texts`) and
    score them against the targets: BLEU, chrF, signatures, ``sent_per_s``, ``tok_per_s``."""
    result = translate_texts(model, tokenizer, [s for s, _ in pairs], **options)
    scores = score(result["hypotheses"], [t for _, t in pairs])
    seconds = max(result["seconds"], 1e-9)
    return {**scores, "sentences": len(pairs), "seconds": result["seconds"], "sent_per_s": len(pairs) / seconds,
            "tok_per_s": result["tokens"] / seconds, "hypotheses": result["hypotheses"]}


@contextlib.contextmanager
def record_rela_sparsity(model: nn.Module):
    """Within the block, every :class:`~gatezoo.blocks.ReLAAttention` of ``model`` also counts its
    attention weights ``relu(q k^T * scale)`` over the keys it may see (padding and future keys
    excluded): yields a dict ``module name -> [zero weights, weights, null rows, rows, full rows,
    offset energy, score energy]``. A null row has no positive weight, a full row no zero weight;
    the offset energy is the sum over rows of (visible keys) x (mean score of the row)^2 and the
    score energy the sum of squared scores, so their ratio is the share of the scores that shifts
    a whole row alike (which softmax ignores and ReLA turns into "attend to all or to nothing").
    Use it with batch size 1 (padded query rows would count as rows)."""
    stats: dict[str, list[float]] = {}
    patched = []

    def wrap(name, module):
        original = module._attend

        def attend(q, k, v, key_padding_mask, causal):
            k_ = k.repeat_interleave(module.heads // module.kv_heads, 1) if module.kv_heads != module.heads else k
            tq, tk = q.shape[2], k_.shape[2]
            keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
            if causal:
                keep = keep.tril(tk - tq)
            keep = keep[None, None].expand(q.shape[0], q.shape[1], tq, tk)
            if key_padding_mask is not None:
                keep = keep & key_padding_mask[:, None, None, :]
            scores = (q.double() @ k_.double().transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~keep, 0.0)
            zero = (scores <= 0) & keep
            visible, zeros = keep.sum(-1), zero.sum(-1)
            row_has_keys = visible > 0
            mean = scores.sum(-1) / visible.clamp(min=1)
            s = stats.setdefault(name, [0] * 7)
            s[0] += int(zero.sum())
            s[1] += int(keep.sum())
            s[2] += int(((zeros == visible) & row_has_keys).sum())
            s[3] += int(row_has_keys.sum())
            s[4] += int(((zeros == 0) & row_has_keys).sum())
            s[5] += float((visible * mean.square()).sum())
            s[6] += float(scores.square().sum())
            return original(q, k, v, key_padding_mask, causal)

        module._attend = attend
        patched.append(module)

    for name, module in model.named_modules():
        if isinstance(module, ReLAAttention):
            wrap(name, module)
    try:
        yield stats
    finally:
        for module in patched:
            del module._attend


def rela_sparsity(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, sentences: int = 200,
                  device: str | torch.device = "cpu") -> list[dict]:
    """Per ReLA attention layer: ``{"layer", "kind", "zero_share", "null_row_share",
    "full_row_share", "offset_share"}`` over the first ``sentences`` pairs, teacher-forced one
    sentence at a time (see :func:`record_rela_sparsity` for what each counts). ``kind`` is
    ``encoder self``, ``decoder self`` or ``cross``. Empty for a model without ReLA."""
    from gatezoo.train.text import collate

    pairs = list(pairs)[:sentences]
    with torch.no_grad(), record_rela_sparsity(model) as stats:
        if not any(isinstance(m, ReLAAttention) for m in model.modules()):
            return []
        model.eval()
        for src, tgt in pairs:
            batch = collate([tokenizer.encode(src)], [tokenizer.encode(tgt)]).to(device)
            model(batch.src, batch.tgt_in)
    rows = []
    for name, (zeros, total, null, nrows, full, offset, energy) in stats.items():
        parts = name.split(".")
        kind = {"attn": "encoder self", "self_attn": "decoder self", "cross_attn": "cross"}.get(parts[-1], parts[-1])
        layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        rows.append({"layer": layer, "kind": kind, "zero_share": zeros / max(total, 1),
                     "null_row_share": null / max(nrows, 1), "full_row_share": full / max(nrows, 1),
                     "offset_share": offset / energy if energy > 0 else 0.0})
    return rows


def compare_ctranslate2(model: nn.Module, tokenizer, texts: Sequence[str], *, beam_size: int = 5,
                        length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                        batch_sentences: int = 64, threads: int = 1, directory: str | Path | None = None) -> dict:
    """gatezoo's decoder against CTranslate2 on the same weights (exported with
    :func:`gatezoo.models.export_ctranslate2`), the same sentences and batches, beam, length
    penalty, length limits and CPU threads, in float32.

    Returns the target tokens/s (EOS included) of each with ``beam_size``, their ratio
    (gatezoo / CTranslate2), and the share of sentences whose greedy outputs are token-identical."""
    import tempfile

    import ctranslate2

    from gatezoo.eval.decode import model_max_len
    from gatezoo.models.export import export_ctranslate2
    from gatezoo.train.text import collate

    torch.set_num_threads(threads)
    model = model.float().eval().cpu()  # both on the CPU, in float32
    pieces = tokenizer.pieces()
    piece_id = {p: i for i, p in enumerate(pieces)}
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ct2"
        export_ctranslate2(model, directory, pieces, force=True)
        translator = ctranslate2.Translator(str(directory), device="cpu", compute_type="float32",
                                           intra_threads=threads, inter_threads=1)
        ids = tokenizer.encode(list(texts))
        cap = model_max_len(model)
        limits = [max(1, min(cap, int(max_len_a * len(r) + max_len_b))) for r in ids]
        groups = list(_batches([len(r) for r in ids], batch_sentences))

        def run_gatezoo(beam):
            out = [None] * len(ids)
            t0 = time.perf_counter()
            with torch.no_grad():
                for group in groups:
                    src = collate([ids[i] for i in group], [[] for _ in group]).src
                    for i, h in zip(group, translate_ids(model, src, beam_size=beam, length_penalty=length_penalty,
                                                         max_len_a=max_len_a, max_len_b=max_len_b)):
                        out[i] = h
            return out, time.perf_counter() - t0

        def run_ct2(beam):
            out = [None] * len(ids)
            t0 = time.perf_counter()
            for group in groups:
                results = translator.translate_batch(
                    [[pieces[t] for t in ids[i]] for i in group], beam_size=beam, length_penalty=length_penalty,
                    max_batch_size=len(group), max_decoding_length=max(limits[i] for i in group) - 1,
                    min_decoding_length=0, suppress_sequences=[["<pad>"], ["<s>"]])
                for i, r in zip(group, results):
                    # one limit per batch in CTranslate2: cut each output at its own limit, as gatezoo does
                    out[i] = [piece_id[p] for p in r.hypotheses[0]][:limits[i] - 1]
            return out, time.perf_counter() - t0

        g_greedy, _ = run_gatezoo(1)
        c_greedy, _ = run_ct2(1)
        g_beam, g_seconds = run_gatezoo(beam_size)
        c_beam, c_seconds = run_ct2(beam_size)
    same = sum(a == b for a, b in zip(g_greedy, c_greedy))
    g_tok = sum(len(h) + 1 for h in g_beam) / g_seconds
    c_tok = sum(len(h) + 1 for h in c_beam) / c_seconds
    return {"sentences": len(ids), "beam_size": beam_size, "threads": threads, "gatezoo_tok_per_s": g_tok,
            "ctranslate2_tok_per_s": c_tok, "speed_ratio": g_tok / c_tok, "gatezoo_seconds": g_seconds,
            "ctranslate2_seconds": c_seconds, "greedy_identical": same / max(len(ids), 1),
            "beam_identical": sum(a == b for a, b in zip(g_beam, c_beam)) / max(len(ids), 1),
            "ctranslate2_version": ctranslate2.__version__}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m gatezoo.eval.translate",
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
    from gatezoo.train.data import DataFormatError, DataNotFoundError
    from gatezoo.train.text import Split, read_parallel

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
