"""The l1-penalised (Lasso) estimator of a softmax-gated Gaussian mixture of experts.

Nguyen, Nguyen, Chamroukhi and McLachlan, "Non-asymptotic oracle inequalities for the Lasso in
high-dimensional mixture of experts". With many more inputs than samples (p >> n), the
maximum-likelihood estimate is replaced by::

    maximise  (1/n) sum_n log p(y_n | x_n)  -  lam * sum_i (||beta1_i||_1 + ||a_i||_1)

(the intercepts beta0, b and the variances are not penalised). The paper's oracle inequality
holds once ``lam`` exceeds a lower bound of order ``sqrt(log p / n)`` (up to constants and log
factors).

:func:`fit_lasso_em` maximises it by EM. The E-step is unchanged. The M-step's two pieces are
each an l1-penalised problem:

- **experts**: a weighted Lasso per expert, ``min (1/2) sum_n w_n (y_n - a^T x_n - b)^2 /
  sum_n w_n + lam * var_i * (n / N_i) * ||a||_1`` (the weights are the responsibilities ``w_n =
  r_ni``, ``N_i = sum_n r_ni``: the expert's part of the expected log-likelihood, ``-(1/n)
  sum_n r_ni (y_n - a^T x_n - b)^2 / (2 var_i) - lam ||a||_1``, multiplied by ``n var_i / N_i``),
  by scikit-learn's coordinate descent (:func:`weighted_lasso`). The variance is then the
  weighted mean squared residual.
- **gate**: the soft-label multinomial logistic regression with ``lam * ||beta1||_1``, by
  proximal gradient steps (ISTA with backtracking, so that the penalised objective never rises).

With ``lam = 0`` both reduce to the plain M-step, so :func:`fit_lasso_em` from the same start
gives :func:`~gatezoo.stats.moe.fit_em`'s fit (tested). Each M-step raises the penalised
objective, so EM never lowers it; restarts keep the best penalised objective.

:func:`lasso_path` fits a grid of ``lam`` with warm starts. The penalised likelihood is not
concave, and its penalty on the experts, in units of squared error, is ``lam * var_i``: it grows
with the variance. So the null fit (every slope 0, the variance that of y) is a fixed point of
EM for every ``lam`` above about ``max |x^T y| / (n var(y))``, far below the ``lam`` at which the
fit with the true, small variance loses its slopes; a path that starts at ``lam_max`` (every
coefficient 0, as for the convex Lasso) stays in that trap. The other way round, a path from a
light penalty with p close to n starts from an over-fit whose variance is tiny, and so is its
penalty; the over-fit persists as ``lam`` grows. By default the path is walked both ways and
each ``lam`` keeps the fit of the higher penalised objective (:func:`penalized_objective`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from .moe import EMResult, GaussianMoE, _as64, _check_fit, _softmax_objective, run_em

__all__ = ["fit_lasso_em", "lasso_path", "penalized_objective", "support_f1", "weighted_lasso"]

_F64 = torch.float64


def _check_lam(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _penalty(model: GaussianMoE, lam: float, lam_gate: float) -> float:
    """``lam ||a||_1 + lam_gate ||beta1||_1`` on the gate's canonical slopes."""
    return lam * float(model.a.abs().sum()) + lam_gate * float(model.canonical().beta1.abs().sum())


def _soft(v: torch.Tensor, t) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - t).clamp_min(0)


def weighted_lasso(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lam: float, *, coef=None,
                   max_iter: int = 10000, tol: float = 1e-8) -> tuple[torch.Tensor, float]:
    """``argmin_(a, b) (1/2) sum_n w_n (y_n - a^T x_n - b)^2 / sum_n w_n + lam ||a||_1``: scikit-learn's
    ``Lasso`` (coordinate descent; its ``sample_weight`` is this weighting), warm-started from
    ``coef`` when given. Returns ``(a, b)`` in float64. Needs scikit-learn (the ``stats`` extra)."""
    _check_lam("lam", lam)
    try:
        from sklearn.linear_model import Lasso, LinearRegression
    except ImportError as e:  # pragma: no cover - the stats extra brings it
        raise ImportError("gatezoo.stats.lasso needs scikit-learn: pip install 'gatezoo[stats]'") from e
    xs, ys = np.asfortranarray(x.numpy()), np.ascontiguousarray(y.numpy())
    ws = (weights / weights.sum().clamp_min(1e-300) * len(weights)).numpy()
    if lam == 0:  # least squares (coordinate descent at alpha = 0 is slow and warns)
        reg = LinearRegression().fit(xs, ys, sample_weight=ws)
    else:
        reg = Lasso(alpha=lam, max_iter=max_iter, tol=tol, warm_start=coef is not None, selection="cyclic")
        if coef is not None:
            reg.coef_ = coef.numpy().copy()
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the EM loop is what has to converge
            reg.fit(xs, ys, sample_weight=ws, check_input=False)  # float64, Fortran order: checked here
    return torch.as_tensor(reg.coef_, dtype=_F64).clone(), float(reg.intercept_)


def _gate_prox(model: GaussianMoE, feats: torch.Tensor, resp: torch.Tensor, lam: float, steps: int = 20):
    """Proximal gradient steps on ``-objective + lam ||beta1||_1`` for the gate (the last expert's
    parameters fixed at 0); each step backtracks until the penalised objective does not rise."""
    k, d = model.k, model.d
    if k == 1:
        return model.beta1 * 0, model.beta0 * 0
    canon = model.canonical()
    theta = torch.cat([canon.beta1[:-1], canon.beta0[:-1, None]], dim=1)

    def value(t):
        return float(-_softmax_objective(t, feats, resp) + lam * t[:, :d].abs().sum())

    step = 1.0
    current = value(theta)
    for _ in range(steps):
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(-_softmax_objective(t, feats, resp), [t])
        while True:
            trial = theta - step * grad
            trial = torch.cat([_soft(trial[:, :d], step * lam), trial[:, d:]], dim=1)
            new = value(trial)
            if new <= current + 1e-15 or step < 1e-10:
                break
            step /= 2
        if new > current:
            break
        gain, theta, current = current - new, trial, new
        step *= 2
        if gain < 1e-12:
            break
    zeros = feats.new_zeros(1, d)
    return torch.cat([theta[:, :d], zeros]), torch.cat([theta[:, d], zeros[0, :1]])


def fit_lasso_em(x, y, k: int, lam: float, *, lam_gate: float | None = None, restarts: int = 3,
                 max_iter: int = 300, tol: float = 1e-8, seed: int = 0, var_floor: float = 1e-8,
                 init: GaussianMoE | None = None) -> EMResult:
    """The l1-penalised fit of a softmax-gated :class:`~gatezoo.stats.moe.GaussianMoE` by EM
    (module docstring). ``lam`` penalises the experts' slopes; ``lam_gate`` the gate's (None: the
    same ``lam``, the single penalty of the oracle inequality; a separate gate penalty is
    Chamroukhi and Huynh's form). ``trace`` holds the unpenalised mean log-likelihood. Raises
    ValueError for ``lam < 0`` or ``lam_gate < 0`` and as :func:`~gatezoo.stats.moe.fit_em` does;
    with p > n the sample-size check is waived (the penalty identifies the model)."""
    lam_gate = lam if lam_gate is None else lam_gate
    _check_lam("lam", lam)
    _check_lam("lam_gate", lam_gate)
    x, y = _as64("x", x), _as64("y", y)
    d = x.shape[-1] if x.dim() == 2 else 0
    _check_fit(x, y, k, restarts, 3 * k - 1 if isinstance(k, int) else 0)
    n = x.shape[0]
    template = GaussianMoE(torch.zeros(k, d), torch.zeros(k), torch.zeros(k, d), torch.zeros(k), torch.ones(k))
    feats = torch.cat([x, x.new_ones(n, 1)], dim=1)

    def experts(model, resp):
        a, b, var = [], [], []
        for i in range(k):
            w = resp[:, i]
            mass = float(w.sum())
            if mass <= 1e-12 * n:  # an expert with no responsibility keeps its parameters
                a.append(model.a[i])
                b.append(float(model.b[i]))
                var.append(float(model.var[i]))
                continue
            ai, bi = weighted_lasso(x, y, w, lam * float(model.var[i]) * n / mass, coef=model.a[i])
            resid = y - x @ ai - bi
            var.append(max(float((w * resid ** 2).sum()) / mass, var_floor))
            a.append(ai)
            b.append(bi)
        return replace(model, a=torch.stack(a), b=torch.tensor(b, dtype=_F64), var=torch.tensor(var, dtype=_F64))

    def start(g):
        resp = torch.rand(n, k, generator=g, dtype=_F64) ** 4
        resp = resp / resp.sum(1, keepdim=True)
        model = replace(template, beta1=0.1 * torch.randn(k, d, generator=g, dtype=_F64),
                        var=torch.full((k,), float(y.var()), dtype=_F64))
        return experts(model, resp)

    def gate(model, resp):
        return _gate_prox(model, feats, resp, lam_gate)

    return run_em(x, y, start, experts, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, init=init,
                  gate=gate, penalty=lambda model: _penalty(model, lam, lam_gate))


def penalized_objective(fit: EMResult, lam: float, lam_gate: float | None = None) -> float:
    """The objective :func:`fit_lasso_em` maximises, at ``fit``: its mean log-likelihood minus
    ``lam ||a||_1 + lam_gate ||beta1||_1`` (the gate's canonical slopes; ``lam_gate`` None: ``lam``)."""
    return fit.log_likelihood - _penalty(fit.model, lam, lam if lam_gate is None else lam_gate)


def lasso_path(x, y, k: int, lams, *, direction: str = "both", **kwargs) -> list[EMResult]:
    """:func:`fit_lasso_em` over ``lams``, each fit warm-started from the one before: from the
    smallest ``lam`` up (``direction="up"``), from the largest down (``"down"``), or both ways,
    keeping at each ``lam`` the fit of the higher penalised objective (``"both"``, the default:
    see the module docstring for the traps of each direction). The first fit of a direction takes
    ``kwargs``' restarts, the others one run; the gate takes the same ``lam``. Returns the fits in
    the order of ``lams``."""
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
    lams = [float(v) for v in lams]

    def walk(up: bool) -> dict[int, EMResult]:
        fits: dict[int, EMResult] = {}
        prev = None
        for i in sorted(range(len(lams)), key=lambda i: lams[i] if up else -lams[i]):
            fits[i] = fit_lasso_em(x, y, k, lams[i], init=prev, **({**kwargs, "restarts": 1} if prev else kwargs))
            prev = fits[i].model
        return fits

    walks = [walk(d == "up") for d in (("up", "down") if direction == "both" else (direction,))]
    return [max((w[i] for w in walks), key=lambda f: penalized_objective(f, lam)) for i, lam in enumerate(lams)]


def support_f1(estimated: torch.Tensor, truth: torch.Tensor, threshold: float = 0.0) -> float:
    """F1 score of the support (entries with ``|value| > threshold``) of ``estimated`` against that of ``truth``."""
    est = estimated.abs() > threshold
    true = truth.abs() > 0
    tp = int((est & true).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / int(est.sum()), tp / int(true.sum())
    return 2 * precision * recall / (precision + recall)
