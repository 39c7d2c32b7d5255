"""The readable oracle of ReLA, rectified linear attention (Zhang, Titov & Sennrich 2021).

    S = (q k^T) * scale, with masked entries (padded keys, future keys when causal) set to 0
    A = relu(S)                       no normalisation over keys
    A = A ⊙ M / (1 - p)               attention dropout at rate p (training), M of .dropout
    O = A v

:func:`rela_composed` builds the whole T x T matrix and lets autograd differentiate it: the
float64 oracle in the tests, the "naive" peer in the benchmarks, what ``torch.compile`` traces
and what the backward passes differentiate for second-order gradients (see
docs/architecture.md, 'The math').

Grouped-query attention: k and v may have ``Hk`` heads with ``H % Hk == 0``; query head ``h``
reads key/value head ``h // (H // Hk)``. Causal attention with ``Tq != Tk`` is aligned
bottom-right: query ``i`` sees keys ``j <= i + Tk - Tq`` (incremental decoding).

Dropout keeps or drops each weight by the position hash of :mod:`.dropout` (the same on every
path), and a dropped weight is selected out, not multiplied by 0: a dropped inf or NaN weight
gives 0, as a masked score does.
"""

from __future__ import annotations

import torch

from .dropout import keep_weights


def keep_mask(tq: int, tk: int, causal: bool, key_padding_mask, device):
    """Bool mask of the scores that survive, broadcastable to (B, 1, Tq, Tk), or None when
    nothing is masked."""
    keep = None
    if causal:
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        keep = j <= i + (tk - tq)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        keep = pad if keep is None else keep & pad
    return keep


def rela_composed_args(q, k, v, key_padding_mask, causal, scale, dropout_p=0.0, dropout_seed=None):
    """:func:`rela_composed` with the arguments in the order of the autograd functions' forward
    (what their second-order fallback differentiates)."""
    return rela_composed(q, k, v, causal, key_padding_mask, scale, dropout_p, dropout_seed)


def rela_composed(q, k, v, causal: bool = False, key_padding_mask=None, scale=None, dropout_p: float = 0.0,
                  dropout_seed=None):
    """ReLA as one composition over the full score matrix (autograd differentiates it).

    ``dropout_p > 0`` drops attention weights by the hash of :mod:`.dropout` with
    ``dropout_seed`` (an int in [0, 2**32), or a 0-dim int64 tensor; required then) and scales
    the kept ones by ``1/(1 - dropout_p)``. The arguments are not checked here: the oracle takes
    what :func:`~gatezoo.kernels.rela.rela_attention` has checked."""
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = keep_mask(tq, tk, causal, key_padding_mask, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, 0.0)
    a = torch.relu(s)
    if dropout_p > 0:
        if dropout_seed is None:
            raise ValueError("rela_composed needs a dropout_seed when dropout_p > 0")
        bh = (torch.arange(b, device=q.device)[:, None] * h + torch.arange(h, device=q.device))[:, :, None, None]
        rows = torch.arange(tq, device=q.device)[:, None]
        cols = torch.arange(tk, device=q.device)
        # a select, not a product: a dropped inf or NaN weight must become 0
        a = torch.where(keep_weights(dropout_seed, bh, rows, cols, dropout_p), a * (1.0 / (1.0 - dropout_p)), 0.0)
    return torch.matmul(a, v)
