"""The statistics of gating: mixture-of-experts models as statistical models, their estimators,
and the losses that measure how fast those estimators converge.

Everything here runs in float64 with torch on the CPU and imports nothing from
:mod:`gatezoo.train`. So far:

- :mod:`gatezoo.stats.moe`: the softmax-gated Gaussian mixture of experts (linear experts, a
  variance per expert), with the softmax, top-K sparse softmax and modified softmax (a bounded
  transform of the input before the gate) gates; its density and a seeded sampler; and EM with
  restarts (:func:`~gatezoo.stats.moe.fit_em`), whose gate step is Newton's method on the
  soft-label multinomial logistic regression.
- :mod:`gatezoo.stats.logistic`: the multinomial logistic mixture of experts (classification)
  and its EM.
- :mod:`gatezoo.stats.lasso`: the l1-penalised (Lasso) EM for p >> n, its warm-started path and
  support-recovery F1.
- :mod:`gatezoo.stats.voronoi`: the Voronoi losses between a fitted and a true mixing measure
  (exact-fitted ``D1``, and the over-fitted loss with the cell exponents ``rbar``), on the
  gate's canonical form.
- :mod:`gatezoo.stats.distance`: Hellinger and total-variation distances of conditional densities.
- :mod:`gatezoo.stats.rates`: rate experiments (``python -m gatezoo.stats.rates --experiment NAME``).

See docs/gating-theory.md.
"""

from .logistic import LogisticMoE, fit_em_logistic
from .moe import GATES, EMResult, GatedMixture, GaussianMoE, fit_em
from .voronoi import RBAR, canonical_gate, voronoi_cells, voronoi_loss

__all__ = ["GATES", "RBAR", "EMResult", "GatedMixture", "GaussianMoE", "LogisticMoE", "canonical_gate", "fit_em",
           "fit_em_logistic", "voronoi_cells", "voronoi_loss"]
