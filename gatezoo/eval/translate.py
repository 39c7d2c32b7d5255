"""Score translations: decode a list of texts with any model of the decoding interface, sacreBLEU
BLEU and chrF, ReLA attention sparsity, and a comparison with CTranslate2 on the same weights.

This module knows models and tokenizers, not run directories: the command that translates or
scores with a trained run is ``python -m gatezoo.train.translate_eval`` (it loads the run and calls
the functions here). A tokenizer is any object with ``encode(texts) -> list[list[int]]``,
``decode(ids) -> str`` and, for :func:`compare_ctranslate2`, ``pieces() -> list[str]``, as
:class:`gatezoo.train.data.text.Tokenizer` has.

- :func:`translate_texts`: batched greedy or beam search (:mod:`gatezoo.eval.decode`), detokenised.
- :func:`score`: corpus BLEU and chrF with their sacreBLEU signatures.
- :func:`evaluate_translation`: both, plus decoding speed.
- :func:`record_rela_sparsity`, :func:`rela_sparsity`: the share of exactly-zero attention weights,
  of all-zero ("null") and zero-free ("full") query rows (the sparsity figures of Zhang et al.
  2021), and the share of the scores that is a row's common offset.
- :func:`compare_ctranslate2`: decoding speed and greedy agreement against CTranslate2
  (:func:`check_ctranslate2` says beforehand whether CTranslate2 can run a model).
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from gatezoo.blocks import ReLAAttention
from gatezoo.blocks.checks import ArgumentTypeError

from .decode import check_search_options, length_limit, model_max_len, pad_ids, translate_ids


def _check_count(name: str, value) -> int:
    """A positive int option (sentences per batch, threads); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_texts(texts, names) -> tuple[list[str], list[str]]:
    """``texts`` as a list of str, and what to call each in an error (``names``, or "sentence i")."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise ArgumentTypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ArgumentTypeError(f"texts[{i}] must be a str, got {t!r} ({type(t).__name__})")
    if names is None:
        return texts, [f"sentence {i + 1}" for i in range(len(texts))]
    names = list(names)
    if len(names) != len(texts) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must hold one str per text ({len(texts)}), got {len(names)} items")
    return texts, names


def _batches(lengths: Sequence[int], max_sentences: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), at most ``max_sentences``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), max_sentences):
        yield order[start:start + max_sentences]


def translate_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, beam_size: int = 5,
                    length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                    batch_sentences: int = 64, device: str | torch.device = "cpu", progress: bool = False,
                    names: Sequence[str] | None = None, task_ids: int | None = None) -> dict:
    """Translate ``texts``; returns ``{"hypotheses", "seconds", "tokens"}`` (detokenised strings in
    input order, decoding wall time, generated target tokens with EOS).

    The options are checked first (:func:`gatezoo.eval.decode.check_search_options`;
    ``batch_sentences`` a positive int). A source longer than the model allows, or one that
    encodes to nothing, raises ``ValueError`` naming it: as ``names[i]`` when given (say
    ``"news.en line 7"``), else as ``"sentence i + 1"``. ``task_ids`` (a multi-task model): the
    task of every text, passed to the search (:func:`gatezoo.eval.decode.translate_ids`)."""
    from tqdm import tqdm

    opts = check_search_options(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                max_len_b=max_len_b)
    opts.pop("n_best")
    batch_sentences = _check_count("batch_sentences", batch_sentences)
    texts, names = _check_texts(texts, names)
    ids = tokenizer.encode(texts)
    limit = model_max_len(model)
    for name, row in zip(names, ids):
        if len(row) > limit:
            raise ValueError(f"{name} has {len(row)} tokens, more than the model's max_len={limit}: shorten or "
                             f"split it")
        if not row:
            raise ValueError(f"{name} encodes to no tokens")
    out: list[list[int]] = [[] for _ in ids]
    model.eval()
    t0 = time.perf_counter()
    groups = list(_batches([len(r) for r in ids], batch_sentences))
    with torch.no_grad():
        for group in tqdm(groups, disable=not progress, desc="translating", unit="batch", leave=False):
            src = pad_ids([ids[i] for i in group]).to(device)
            hyps = translate_ids(model, src, **opts, task_ids=task_ids)
            for i, h in zip(group, hyps):
                out[i] = h
    seconds = time.perf_counter() - t0
    return {"hypotheses": [tokenizer.decode(h) for h in out], "seconds": seconds,
            "tokens": sum(len(h) + 1 for h in out)}


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF of detokenised ``hypotheses`` against ``references`` (sacreBLEU's
    defaults: 13a tokenisation, exponential smoothing; chrF with char order 6, beta 2)."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError as e:
        raise ImportError("BLEU and chrF need sacrebleu: pip install 'gatezoo[mt]' (or pip install sacrebleu)") from e

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
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ArgumentTypeError(f"pairs must be a sequence of (source, target) pairs, got {type(pairs).__name__}")
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ArgumentTypeError(f"pairs[{i}] must be a (source, target) pair of str, got {pair!r}")
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
                  device: str | torch.device = "cpu", task_ids: int | None = None) -> list[dict]:
    """Per ReLA attention layer: ``{"layer", "kind", "zero_share", "null_row_share",
    "full_row_share", "offset_share"}`` over the first ``sentences`` pairs, teacher-forced one
    sentence at a time (see :func:`record_rela_sparsity` for what each counts). ``kind`` is
    ``encoder self``, ``decoder self`` or ``cross``. Empty for a model without ReLA. ``task_ids``:
    the pairs' task (a multi-task model)."""
    pairs = list(pairs)[:sentences]
    with torch.no_grad(), record_rela_sparsity(model) as stats:
        if not any(isinstance(m, ReLAAttention) for m in model.modules()):
            return []
        model.eval()
        for src, tgt in pairs:
            src_ids, tgt_in = pad_ids([tokenizer.encode(src)]), pad_ids([tokenizer.encode(tgt)], bos=True)
            extra = {} if task_ids is None else {"task_ids": task_ids}
            model(src_ids.to(device), tgt_in.to(device), **extra)
    rows = []
    for name, (zeros, total, null, nrows, full, offset, energy) in stats.items():
        parts = name.split(".")
        kind = {"attn": "encoder self", "self_attn": "decoder self", "cross_attn": "cross"}.get(parts[-1], parts[-1])
        layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        rows.append({"layer": layer, "kind": kind, "zero_share": zeros / max(total, 1),
                     "null_row_share": null / max(nrows, 1), "full_row_share": full / max(nrows, 1),
                     "offset_share": offset / energy if energy > 0 else 0.0})
    return rows


def check_ctranslate2(model: nn.Module, tokenizer) -> None:
    """Raise now if :func:`compare_ctranslate2` cannot run ``model``: ImportError when the
    ``ctranslate2`` package is missing, ValueError naming what CTranslate2 cannot run (ReLA, an
    activation it lacks, a model that is not a gatezoo ``EncoderDecoder``, a vocabulary that does not
    fit). It exports into a temporary directory, removed again, and leaves ``model`` as it was: a
    command calls it before a long decoding rather than fail after it."""
    import tempfile

    try:
        import ctranslate2  # noqa: F401
    except ImportError as e:
        raise ImportError("the CTranslate2 comparison needs the ctranslate2 package: pip install ctranslate2 (or "
                          "pip install 'gatezoo[mt-peers]')") from e
    from gatezoo.models.export import export_ctranslate2

    with tempfile.TemporaryDirectory() as directory:
        export_ctranslate2(model, Path(directory) / "ct2", tokenizer.pieces())


def compare_ctranslate2(model: nn.Module, tokenizer, texts: Sequence[str], *, beam_size: int = 5,
                        length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                        batch_sentences: int = 64, threads: int = 1, directory: str | Path | None = None) -> dict:
    """gatezoo's decoder against CTranslate2 on the same weights (exported with
    :func:`gatezoo.models.export_ctranslate2`), the same sentences and batches, beam, length
    penalty, length limits and CPU threads, in float32.

    Returns the target tokens/s (EOS included) of each with ``beam_size``, their ratio
    (gatezoo / CTranslate2), and the share of sentences whose greedy outputs are token-identical."""
    import tempfile

    opts = check_search_options(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                max_len_b=max_len_b)
    beam_size, length_penalty, max_len_a, max_len_b = (opts[k] for k in ("beam_size", "length_penalty", "max_len_a",
                                                                        "max_len_b"))
    batch_sentences = _check_count("batch_sentences", batch_sentences)
    threads = _check_count("threads", threads)
    texts, _ = _check_texts(texts, None)

    import ctranslate2

    from gatezoo.models.export import export_ctranslate2
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
        limits = [length_limit(len(r), max_len_a, max_len_b, cap) for r in ids]
        groups = list(_batches([len(r) for r in ids], batch_sentences))

        def run_gatezoo(beam):
            out = [None] * len(ids)
            t0 = time.perf_counter()
            with torch.no_grad():
                for group in groups:
                    src = pad_ids([ids[i] for i in group])
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


