"""Voronoi losses between a fitted and a true softmax-gated Gaussian mixture of experts.

Nguyen, Nguyen and Ho 2023 measure how far a fitted mixing measure ``G = sum_i exp(beta0_i)
delta_(beta1_i, a_i, b_i, var_i)`` is from the truth ``G*`` by Voronoi losses. Each fitted atom
goes to the cell ``A_j`` of its nearest true atom (distance ``||d beta1|| + ||d a|| + |d b| +
|d var|``). Then::

    D(G, G*) = sum_j | sum_{i in A_j} exp(beta0_i) - exp(beta0*_j) |
             + sum_{j: |A_j| = 1} sum_{i in A_j} exp(beta0_i) (||d beta1|| + ||d a|| + |d b| + |d var|)
             + sum_{j: |A_j| > 1} sum_{i in A_j} exp(beta0_i) (||d beta1||^r + |d b|^r + ||d a||^(r/2) + |d var|^(r/2))

with ``r = rbar(|A_j|)``: 4 for a cell of two atoms and 6 for three (the solvability of the
paper's polynomial system; larger cells are refused). With every cell a single atom (the
exact-fitted case) this is the paper's ``D1``. The over-fitted loss converges at n^(-1/2), so
the parameters of a cell of two atoms converge at n^(-1/8) (``beta1``, ``b``) and n^(-1/4)
(``a``, ``var``).

The softmax gate is unchanged when one number is added to every ``beta0_i`` and one vector to
every ``beta1_i``, so the loss is taken between canonical forms (:func:`canonical_gate`): the
weights ``exp(beta0)`` scaled to sum to 1, and ``beta1`` centred at its weighted mean. The
authors' code instead fixes the last expert's gate parameters at 0 in both models; the two
conventions differ in the constants, not in the rates.
"""

from __future__ import annotations

import torch

from .logistic import LogisticMoE
from .moe import GaussianMoE

__all__ = ["RBAR", "atom_distances", "canonical_gate", "voronoi_cells", "voronoi_loss"]

RBAR = {1: 1, 2: 4, 3: 6}
"""The exponent ``rbar(m)`` of a Voronoi cell of m fitted atoms (the paper's Lemma: 4 for two, 6
for three)."""


def canonical_gate(model) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta1, beta0)`` of ``model`` with the gate's translation removed: ``sum_i exp(beta0_i) = 1``
    and ``sum_i exp(beta0_i) beta1_i = 0``."""
    beta0 = model.beta0 - torch.logsumexp(model.beta0, dim=0)
    weights = beta0.exp()
    return model.beta1 - (weights[:, None] * model.beta1).sum(0), beta0


def _groups(model) -> tuple[list[torch.Tensor], list[float] | None]:
    """Each atom's parameter groups as (K, p) tensors (the gate's slope first, on the canonical
    gate), and the exponent of each group in a cell of several atoms as a multiple of rbar (None:
    the over-fitted loss is not defined for this model)."""
    beta1, _ = canonical_gate(model)
    if isinstance(model, GaussianMoE):
        return [beta1, model.a, model.b[:, None], model.var[:, None]], [1.0, 0.5, 1.0, 0.5]
    if isinstance(model, LogisticMoE):
        c = model.canonical()
        return [beta1, c.eta.reshape(model.k, -1), c.tau], None
    raise TypeError(f"a Voronoi loss needs a GaussianMoE or a LogisticMoE, got {type(model).__name__}")


def _distances(fitted, truth):
    if type(fitted) is not type(truth):
        raise TypeError(f"the models differ in kind: {type(fitted).__name__} and {type(truth).__name__}")
    if fitted.d != truth.d:
        raise ValueError(f"the models have different input dimensions: {fitted.d} and {truth.d}")
    (f, scale), (t, _) = _groups(fitted), _groups(truth)
    diff = [(fg[:, None, :] - tg[None, :, :]).norm(dim=2) for fg, tg in zip(f, t)]
    return sum(diff), diff, scale, canonical_gate(fitted)[1], canonical_gate(truth)[1]


def atom_distances(fitted, truth) -> torch.Tensor:
    """(K_fitted, K_true): the summed parameter distances (``||d beta1|| + ||d a|| + |d b| +
    |d var|`` for Gaussian experts, ``||d beta1|| + ||d eta|| + ||d tau||`` for logistic ones)
    between every fitted and true atom, on the canonical forms."""
    return _distances(fitted, truth)[0]


def voronoi_cells(fitted, truth) -> list[int]:
    """For each fitted atom, the index of its nearest true atom (its Voronoi cell)."""
    return atom_distances(fitted, truth).argmin(dim=1).tolist()


def voronoi_loss(fitted, truth) -> float:
    """The Voronoi loss of the module docstring (``D1`` when every cell holds one atom). For
    logistic experts (:class:`~gatezoo.stats.logistic.LogisticMoE`), whose cell exponents are not
    part of the theory here, every cell takes the exponent 1 (the ``D1`` form)."""
    total, diff, scale, beta0, beta0_true = _distances(fitted, truth)
    cells = total.argmin(dim=1)
    sizes = torch.bincount(cells, minlength=truth.k)
    too_big = [int(s) for s in sizes if int(s) > max(RBAR)]
    if too_big:
        raise ValueError(f"a Voronoi cell holds {max(too_big)} fitted atoms; rbar is known for cells of at most "
                         f"{max(RBAR)}")
    loss = torch.zeros((), dtype=torch.float64)
    mass = beta0.exp()
    for j in range(truth.k):
        members = (cells == j).nonzero().flatten()
        loss = loss + (mass[members].sum() - beta0_true[j].exp()).abs()
        r = RBAR.get(len(members), 1)
        for i in members.tolist():
            if len(members) == 1 or scale is None:
                term = sum(dg[i, j] for dg in diff)
            else:
                term = sum(dg[i, j] ** (r * e) for dg, e in zip(diff, scale))
            loss = loss + mass[i] * term
    return float(loss)
