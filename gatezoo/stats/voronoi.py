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

from .moe import GaussianMoE

__all__ = ["RBAR", "atom_distances", "canonical_gate", "voronoi_cells", "voronoi_loss"]

RBAR = {1: 1, 2: 4, 3: 6}
"""The exponent ``rbar(m)`` of a Voronoi cell of m fitted atoms (the paper's Lemma: 4 for two, 6
for three)."""


def canonical_gate(model: GaussianMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta1, beta0)`` of ``model`` with the gate's translation removed: ``sum_i exp(beta0_i) = 1``
    and ``sum_i exp(beta0_i) beta1_i = 0``."""
    beta0 = model.beta0 - torch.logsumexp(model.beta0, dim=0)
    weights = beta0.exp()
    return model.beta1 - (weights[:, None] * model.beta1).sum(0), beta0


def _parts(model: GaussianMoE):
    beta1, beta0 = canonical_gate(model)
    return beta1, beta0, model.a, model.b, model.var


def atom_distances(fitted: GaussianMoE, truth: GaussianMoE) -> torch.Tensor:
    """(K_fitted, K_true): ``||d beta1|| + ||d a|| + |d b| + |d var|`` between every fitted and true
    atom, on the canonical gates."""
    return _distances(fitted, truth)[0]


def voronoi_cells(fitted: GaussianMoE, truth: GaussianMoE) -> list[int]:
    """For each fitted atom, the index of its nearest true atom (its Voronoi cell)."""
    return _distances(fitted, truth)[0].argmin(dim=1).tolist()


def _distances(fitted: GaussianMoE, truth: GaussianMoE):
    if fitted.d != truth.d:
        raise ValueError(f"the models have different input dimensions: {fitted.d} and {truth.d}")
    f, t = _parts(fitted), _parts(truth)
    diff = [
        (f[0][:, None, :] - t[0][None, :, :]).norm(dim=2),  # beta1
        (f[2][:, None, :] - t[2][None, :, :]).norm(dim=2),  # a
        (f[3][:, None] - t[3][None, :]).abs(),  # b
        (f[4][:, None] - t[4][None, :]).abs(),  # var
    ]
    return sum(diff), diff, f[1], t[1]


def voronoi_loss(fitted: GaussianMoE, truth: GaussianMoE) -> float:
    """The Voronoi loss of the module docstring (``D1`` when every cell holds one atom)."""
    total, (d_beta1, d_a, d_b, d_var), beta0, beta0_true = _distances(fitted, truth)
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
            if len(members) == 1:
                term = d_beta1[i, j] + d_a[i, j] + d_b[i, j] + d_var[i, j]
            else:
                term = d_beta1[i, j] ** r + d_b[i, j] ** r + d_a[i, j] ** (r / 2) + d_var[i, j] ** (r / 2)
            loss = loss + mass[i] * term
    return float(loss)
