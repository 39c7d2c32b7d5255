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
  sum_n w_n + lam * var_i * ||a||_1`` (the expected log-likelihood multiplied by the current
  variance, weights the responsibilities), by cyclic coordinate descent
  (:func:`weighted_lasso`). The variance is then the weighted mean squared residual.
- **gate**: the soft-label multinomial logistic regression with ``lam * ||beta1||_1``, by
  proximal gradient steps (ISTA with backtracking, so that the penalised objective never rises).

With ``lam = 0`` both reduce to the plain M-step, so :func:`fit_lasso_em` from the same start
gives :func:`~gatezoo.stats.moe.fit_em`'s fit (tested). :func:`lasso_path` fits a decreasing
grid of ``lam`` with warm starts, from ``lam_max``, where every penalised coefficient is 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .moe import EMResult, GaussianMoE, _as64, _check_fit, _softmax_objective, run_em

__all__ = ["fit_lasso_em", "lasso_path", "support_f1", "weighted_lasso"]

_F64 = torch.float64


def _soft(v: torch.Tensor, t) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - t).clamp_min(0)


def weighted_lasso(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lam: float, *, coef=None,
                   intercept: float = 0.0, max_iter: int = 1000, tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """``argmin_(a, b) (1/2) sum_n w_n (y_n - a^T x_n - b)^2 / sum_n w_n + lam ||a||_1`` by cyclic
    coordinate descent (the intercept refitted after every sweep), from ``coef`` / ``intercept``.
    Returns ``(a, b)``. With unit weights it is scikit-learn's ``Lasso(alpha=lam)`` (tested)."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    n, p = x.shape
    w = weights / weights.sum().clamp_min(1e-300)
    a = torch.zeros(p, dtype=_F64) if coef is None else coef.clone()
    b = float(intercept)
    resid = y - x @ a - b
    col = (w[:, None] * x * x).sum(0)  # sum_n w_n x_nj^2
    for _ in range(max_iter):
        biggest = 0.0
        for j in range(p):
            if col[j] <= 0:
                continue
            old = a[j]
            rho = (w * x[:, j] * resid).sum() + col[j] * old
            new = _soft(rho, lam) / col[j]
            if new != old:
                resid = resid - x[:, j] * (new - old)
                a[j] = new
                biggest = max(biggest, abs(float(new - old)))
        shift = float((w * resid).sum())
        b += shift
        resid = resid - shift
        if biggest < tol and abs(shift) < tol:
            break
    return a, b


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


def fit_lasso_em(x, y, k: int, lam: float, *, restarts: int = 3, max_iter: int = 300, tol: float = 1e-8,
                 seed: int = 0, var_floor: float = 1e-8, init: GaussianMoE | None = None) -> EMResult:
    """The l1-penalised fit of a softmax-gated :class:`~gatezoo.stats.moe.GaussianMoE` by EM
    (module docstring). ``trace`` holds the unpenalised mean log-likelihood. Raises ValueError
    for ``lam < 0`` and as :func:`~gatezoo.stats.moe.fit_em` does; with p > n the sample-size
    check is waived (the penalty identifies the model)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
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
            ai, bi = weighted_lasso(x, y, w, lam * float(model.var[i]), coef=model.a[i], intercept=float(model.b[i]))
            resid = y - x @ ai - bi
            var.append(max(float((w * resid ** 2).sum() / w.sum().clamp_min(1e-300)), var_floor))
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
        return _gate_prox(model, feats, resp, lam)

    return run_em(x, y, start, experts, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, init=init,
                  gate=gate)


def lasso_path(x, y, k: int, lams, **kwargs) -> list[EMResult]:
    """:func:`fit_lasso_em` over ``lams`` taken in decreasing order, each fit warm-started from the
    previous one (the first from ``kwargs``' restarts); returns the fits in the order of ``lams``."""
    lams = [float(v) for v in lams]
    order = sorted(range(len(lams)), key=lambda i: -lams[i])
    fits: dict[int, EMResult] = {}
    prev = None
    for i in order:
        fit = fit_lasso_em(x, y, k, lams[i], init=prev, **({**kwargs, "restarts": 1} if prev else kwargs))
        fits[i] = fit
        prev = fit.model
    return [fits[i] for i in range(len(lams))]


def support_f1(estimated: torch.Tensor, truth: torch.Tensor, threshold: float = 0.0) -> float:
    """F1 score of the support (entries with ``|value| > threshold``) of ``estimated`` against that of ``truth``."""
    est = estimated.abs() > threshold
    true = truth.abs() > 0
    tp = int((est & true).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / int(est.sum()), tp / int(true.sum())
    return 2 * precision * recall / (precision + recall)
