"""Batched greedy and beam search over the narrow decoding interface.

The search functions see a model only through

- ``memory = model.encode(src)`` with ``memory.select(index)``,
- ``logits, cache = model.decode_step(tokens, memory, cache)`` (``cache=None`` to start), and
- ``cache.reorder(index)``,

plus ``model.config.max_len`` (or ``model.max_len``), the most target positions it allows. So
they decode every attention kind of :class:`gatezoo.models.EncoderDecoder` and the peers alike.

A hypothesis stops at EOS or at its length limit ``floor(max_len_a * source_length + max_len_b)``
generated tokens (EOS included), whichever comes first. Finished sentences leave the batch, so a
long sentence does not keep the short ones computing. The returned token lists hold neither BOS
nor EOS.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gatezoo.blocks.checks import ArgumentTypeError
from gatezoo.models.translation import BOS_ID, EOS_ID, PAD_ID

SRC_DTYPES = (torch.int64, torch.int32)
"""The dtypes of source ids the search functions take (an embedding's index types)."""


@dataclass
class Hypothesis:
    """A finished translation: its tokens (no BOS/EOS), total log-probability and the score the
    search ranked it by (``logprob / length ** length_penalty``; length counts EOS)."""

    tokens: list[int]
    logprob: float
    score: float


def model_max_len(model) -> int:
    """The most target positions ``model`` takes: ``model.config.max_len`` or ``model.max_len``."""
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "max_len", None) if cfg is not None else None
    value = getattr(model, "max_len", None) if value is None else value
    if value is None:
        raise TypeError(f"{type(model).__name__} has neither config.max_len nor max_len: the decoder needs the "
                        f"length limit of the model")
    return int(value)


def pad_ids(rows, *, bos: bool = False) -> torch.Tensor:
    """Token id lists as one ``(len(rows), width)`` int64 tensor, right-padded with ``PAD_ID``
    (``width`` the longest row, at least 1); with ``bos`` every row starts with ``BOS_ID`` (a
    decoder input for teacher forcing). The ids are not checked: the model's ``encode`` and
    ``decode`` check them."""
    rows = [[BOS_ID, *r] if bos else list(r) for r in rows]
    out = torch.full((len(rows), max(1, max((len(r) for r in rows), default=0))), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_search_options(*, beam_size=1, length_penalty=1.0, max_len_a=1.2, max_len_b=10, n_best=1) -> dict:
    """The search options checked, as plain Python numbers: ``beam_size`` an int >= 1, ``n_best``
    an int in [1, beam_size], ``length_penalty`` and ``max_len_a`` finite numbers >= 0, ``max_len_b``
    an int >= 0 (numpy integers and floats count as such; bools and strings do not). Raises
    :class:`~gatezoo.blocks.checks.ArgumentTypeError` (a TypeError) for a wrong type and ValueError
    for a wrong value, naming the option: a NaN penalty or an infinite limit would otherwise rank
    every hypothesis alike or never stop, and a float beam is no size."""
    for name, value in (("beam_size", beam_size), ("n_best", n_best)):
        if not _is_int(value):
            raise ArgumentTypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_best > beam_size:
        raise ValueError(f"n_best must be an int in [1, beam_size={beam_size}], got {n_best!r}")
    for name, value in (("length_penalty", length_penalty), ("max_len_a", max_len_a)):
        if not _is_real(value):
            raise ArgumentTypeError(f"{name} must be a finite number >= 0, got {value!r} ({type(value).__name__})")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not _is_int(max_len_b):
        raise ArgumentTypeError(f"max_len_b must be an int >= 0, got {max_len_b!r} ({type(max_len_b).__name__})")
    if max_len_b < 0:
        raise ValueError(f"max_len_b must be an int >= 0, got {max_len_b!r}")
    return {"beam_size": int(beam_size), "length_penalty": float(length_penalty), "max_len_a": float(max_len_a),
            "max_len_b": int(max_len_b), "n_best": int(n_best)}


def length_limit(source_length: int, max_len_a: float, max_len_b: int, cap: int) -> int:
    """The most tokens (EOS included) generated for a source of ``source_length`` tokens:
    ``floor(max_len_a * source_length + max_len_b)``, at least 1 and at most ``cap`` (the model's
    ``max_len``)."""
    value = max_len_a * source_length + max_len_b
    # compared before the floor: a huge (finite) max_len_a would overflow int()
    return max(1, cap if value >= cap else int(math.floor(value)))


def _limits(src: torch.Tensor, model, max_len_a: float, max_len_b: int) -> list[int]:
    # generated token j is predicted at input position j - 1 (BOS at 0) and the last one, EOS, is
    # never fed back: a model of cap positions can generate cap tokens, EOS included
    cap = model_max_len(model)
    return [length_limit(n, max_len_a, max_len_b, cap) for n in (src != PAD_ID).sum(1).tolist()]


def _finite(logits: torch.Tensor, step: int) -> torch.Tensor:
    # one reduction instead of an elementwise isfinite: a NaN or an inf anywhere makes the sum
    # non-finite (logits are far too small for a finite sum to overflow)
    logits = logits.float()
    if not bool(torch.isfinite(logits.sum())):
        raise FloatingPointError(f"the model produced non-finite logits (NaN or inf) at decoding step {step + 1}; "
                                 f"its weights or inputs are broken")
    return logits


def _check_src(src) -> None:
    if not isinstance(src, torch.Tensor):
        raise ArgumentTypeError(f"src must be a (batch, length) int64 tensor of token ids, got {type(src).__name__}")
    if src.dtype not in SRC_DTYPES:  # a narrow integer dtype has wrapped large ids around; bools are no ids
        raise ArgumentTypeError(f"src must be a (batch, length) int64 (or int32) tensor of token ids, got dtype "
                                f"{src.dtype}")
    if src.dim() != 2:
        raise ValueError(f"src must be a (batch, length) tensor of token ids, got shape {tuple(src.shape)}")


def _encode(model, src: torch.Tensor, task_ids):
    # models without tasks (the peers too) keep the one-argument encode
    return model.encode(src) if task_ids is None else model.encode(src, task_ids=task_ids)


@torch.no_grad()
def greedy_search(model, src: torch.Tensor, *, max_len_a: float = 1.2, max_len_b: int = 10,
                  task_ids=None) -> list[list[int]]:
    """The most probable next token at every step, for each sentence of ``src`` (B, S), pad 0.

    ``task_ids`` (a multi-task model): an int or one id per sentence, passed to ``model.encode``.
    Returns B token lists (no BOS/EOS). Equals :func:`beam_search` with ``beam_size=1``."""
    _check_src(src)
    opts = check_search_options(max_len_a=max_len_a, max_len_b=max_len_b)
    limits = _limits(src, model, opts["max_len_a"], opts["max_len_b"])
    memory = _encode(model, src, task_ids)
    b = src.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))  # sentence of each batch row
    tokens = torch.full((b, 1), BOS_ID, dtype=torch.long, device=src.device)
    cache, step = None, 0
    while alive:
        logits, cache = model.decode_step(tokens, memory, cache)
        logits = _finite(logits, step)
        logits[:, PAD_ID] = logits[:, BOS_ID] = -math.inf
        forced = [i for i, s in enumerate(alive) if step + 1 >= limits[s]]
        if forced:
            logits[forced] = -math.inf
            logits[forced, EOS_ID] = 0.0
        nxt = logits.argmax(-1)
        keep = []
        for i, (s, t) in enumerate(zip(alive, nxt.tolist())):
            if t == EOS_ID:
                continue
            out[s].append(t)
            keep.append(i)
        step += 1
        if len(keep) < len(alive):
            if not keep:
                break
            index = torch.tensor(keep, device=src.device)
            cache.reorder(index)
            memory = memory.select(index)
            nxt = nxt[index]
            alive = [alive[i] for i in keep]
        tokens = nxt[:, None]
    return out


@torch.no_grad()
def beam_search(model, src: torch.Tensor, *, beam_size: int = 5, length_penalty: float = 1.0,
                max_len_a: float = 1.2, max_len_b: int = 10, n_best: int = 1, task_ids=None
                ) -> list[list[Hypothesis]]:
    """Beam search for each sentence of ``src`` (B, S), pad 0.

    Each step extends every live beam by every token, keeps the ``2 * beam_size`` best
    continuations per sentence, finishes those among the first ``beam_size`` that end in EOS, and
    carries on with the best ``beam_size`` that do not. A sentence is done when it has
    ``beam_size`` finished hypotheses (or reaches its length limit, where EOS is forced).
    Hypotheses are ranked by ``logprob / length ** length_penalty`` (length counting EOS;
    ``length_penalty=0`` ranks by log-probability alone).

    ``task_ids`` (a multi-task model): an int or one id per sentence, passed to ``model.encode``;
    the memory carries them through the regrouping of beams.

    Returns, per sentence, the ``n_best`` best :class:`Hypothesis` objects, best first.
    """
    _check_src(src)
    opts = check_search_options(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                max_len_b=max_len_b, n_best=n_best)
    beam_size, length_penalty, n_best = opts["beam_size"], opts["length_penalty"], opts["n_best"]
    limits = _limits(src, model, opts["max_len_a"], opts["max_len_b"])
    k, b, dev = beam_size, src.shape[0], src.device
    memory = _encode(model, src, task_ids)
    memory = memory.select(torch.arange(b, device=dev).repeat_interleave(k))
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    alive = list(range(b))
    # per live beam: its score (total log-probability) and tokens so far
    scores = torch.full((b, k), -math.inf, device=dev)
    scores[:, 0] = 0.0
    prefixes: list[list[int]] = [[] for _ in range(b * k)]
    tokens = torch.full((b * k, 1), BOS_ID, dtype=torch.long, device=dev)
    cache, step = None, 0
    while alive:
        logits, cache = model.decode_step(tokens, memory, cache)
        logp = F.log_softmax(_finite(logits, step), dim=-1)
        logp[:, PAD_ID] = logp[:, BOS_ID] = -math.inf
        vocab = logp.shape[-1]
        logp = logp.view(len(alive), k, vocab)
        forced = [j for j, s in enumerate(alive) if step + 1 >= limits[s]]
        if forced:
            eos = logp[forced, :, EOS_ID].clone()
            logp[forced] = -math.inf
            logp[forced, :, EOS_ID] = eos
        cand = (scores[:, :, None] + logp).view(len(alive), k * vocab)
        top_scores, top_index = cand.topk(min(2 * k, k * vocab), dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        length = step + 1
        rows, new_tokens, new_scores, still = [], [], [], []
        for j, s in enumerate(alive):
            chosen = []
            for rank, (sc, idx) in enumerate(zip(top_scores[j], top_index[j])):
                if sc == -math.inf:
                    break
                beam, tok = divmod(idx, vocab)
                if tok == EOS_ID:
                    if rank < k:
                        norm = sc / (length ** length_penalty) if length_penalty else sc
                        finished[s].append(Hypothesis(list(prefixes[j * k + beam]), sc, norm))
                    continue
                if len(chosen) < k:
                    chosen.append((beam, tok, sc))
            if len(finished[s]) >= k or not chosen:
                continue
            while len(chosen) < k:  # too few live continuations: pad with dead beams
                chosen.append((chosen[0][0], chosen[0][1], -math.inf))
            still.append(s)
            for beam, tok, sc in chosen:
                rows.append(j * k + beam)
                new_tokens.append(tok)
                new_scores.append(sc)
        step += 1
        if not still:
            break
        index = torch.tensor(rows, device=dev)
        cache.reorder(index)
        memory = memory.select(index)
        prefixes = [prefixes[r] + [t] for r, t in zip(rows, new_tokens)]
        tokens = torch.tensor(new_tokens, device=dev)[:, None]
        scores = torch.tensor(new_scores, device=dev).view(len(still), k)
        alive = still
    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
        results.append(hyps[:n_best])
    return results


def translate_ids(model, src: torch.Tensor, *, beam_size: int = 1, length_penalty: float = 1.0,
                  max_len_a: float = 1.2, max_len_b: int = 10, task_ids=None) -> list[list[int]]:
    """The best token list per sentence: :func:`greedy_search` for ``beam_size=1``, else the top
    hypothesis of :func:`beam_search`. Every option is checked (:func:`check_search_options`), the
    length penalty too when greedy search does not use it. ``task_ids`` goes to ``model.encode``
    (a multi-task model)."""
    opts = check_search_options(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                max_len_b=max_len_b)
    beam_size, length_penalty, max_len_a, max_len_b = (opts[k] for k in ("beam_size", "length_penalty", "max_len_a",
                                                                        "max_len_b"))
    if beam_size == 1:
        return greedy_search(model, src, max_len_a=max_len_a, max_len_b=max_len_b, task_ids=task_ids)
    hyps = beam_search(model, src, beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                       max_len_b=max_len_b, task_ids=task_ids)
    return [h[0].tokens for h in hyps]
