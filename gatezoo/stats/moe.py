"""The softmax-gated Gaussian mixture of experts and its EM estimator.

The model (Nguyen, Nguyen and Ho 2023, "Demystifying Softmax Gating Function in Gaussian Mixture
of Experts"), for an input ``x`` in R^d and a response ``y`` in R::

    p(y | x) = sum_i g_i(x) N(y | a_i^T x + b_i, s_i)        (s_i: the variance of expert i)
    g(x)     = softmax(beta1 M(x) + beta0)                  gate="softmax" (M the identity)
                                                            gate="modified": M bounded, tanh default
    g(x)     = softmax over the top K of (beta1 x + beta0), 0 elsewhere      gate="topk"

The gate is invariant to adding one vector to every row of ``beta1`` and one number to every
``beta0``; :meth:`GaussianMoE.canonical` picks the representative whose last expert's gate
parameters are 0.

:func:`fit_em` maximises the likelihood by EM. The E-step takes the posterior responsibilities
``r_ni`` of expert i for sample n. The M-step fits each expert by weighted least squares (closed
form) with its variance the weighted mean squared residual. It fits the gate by maximising
``sum_n sum_i r_ni log g_i(x_n)``, a multinomial logistic regression with soft labels: Newton's
method on the (K - 1)(d + 1) free parameters (the last expert's are fixed at 0), with a
backtracking line search so that the objective never decreases. A generalised EM step, it never
lowers the likelihood (for the softmax and modified gates; the top-K gate is not smooth and is
fitted with the softmax gate step, then used with its top-K, which can lower it: see
:func:`fit_em`). Restarts from random initialisations keep the best likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

__all__ = ["GATES", "EMResult", "GatedMixture", "GaussianMoE", "fit_em", "gate_step", "run_em", "softmax_newton"]

GATES = ("softmax", "topk", "modified")
"""Gate kinds of :class:`GaussianMoE`."""
_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _as64(name: str, value) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=_F64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


class GatedMixture:
    """What every gated mixture of :mod:`gatezoo.stats` shares: the gate (fields ``beta1`` (K, d),
    ``beta0`` (K,), ``gate``, ``top_k``, ``transform``), its checks and its canonical form. A
    subclass adds its experts and ``expert_log_densities(x, y)``."""

    def _check_gate(self) -> tuple[int, int]:
        k = self.beta0.shape[0] if self.beta0.dim() == 1 else 0
        if k < 1:
            raise ValueError(f"the mixture needs k >= 1 experts (beta0 of shape (k,)), got {tuple(self.beta0.shape)}")
        d = self.beta1.shape[-1] if self.beta1.dim() == 2 else -1
        if tuple(self.beta1.shape) != (k, d) or d < 1:
            raise ValueError(f"beta1 must have shape ({k}, d) with d >= 1, got {tuple(self.beta1.shape)}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate == "topk":
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= k:
                raise ValueError(f"top_k must be an int in [1, {k}] for gate='topk', got {self.top_k!r}")
        elif self.top_k is not None:
            raise ValueError(f"top_k applies to gate='topk' only, got top_k={self.top_k} with gate={self.gate!r}")
        if self.gate == "modified" and self.transform is None:
            object.__setattr__(self, "transform", torch.tanh)
        return k, d

    @property
    def k(self) -> int:
        """The number of experts."""
        return self.beta0.shape[0]

    @property
    def d(self) -> int:
        """The input dimension."""
        return self.beta1.shape[1]

    def _check_x(self, x) -> torch.Tensor:
        x = _as64("x", x)
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (n, {self.d}), got {tuple(x.shape)}")
        return x

    def gate_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the gate sees: ``M(x)`` for the modified gate, else ``x``."""
        return self.transform(x) if self.gate == "modified" else x

    def gate_logits(self, x) -> torch.Tensor:
        """``beta1 M(x) + beta0``, (n, K)."""
        x = self._check_x(x)
        return self.gate_features(x) @ self.beta1.T + self.beta0

    def gate_log_probs(self, x) -> torch.Tensor:
        """log g(x), (n, K); -inf for the experts outside a top-K gate's choice."""
        logits = self.gate_logits(x)
        if self.gate == "topk" and self.top_k < self.k:
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(self.top_k, dim=1).indices, True)
            logits = logits.masked_fill(~keep, -math.inf)
        return torch.log_softmax(logits, dim=1)

    def log_density(self, x, y) -> torch.Tensor:
        """log p(y_n | x_n), (n,)."""
        return torch.logsumexp(self.gate_log_probs(x) + self.expert_log_densities(x, y), dim=1)

    def log_likelihood(self, x, y) -> float:
        """The mean log-likelihood of the sample."""
        return float(self.log_density(x, y).mean())

    def canonical(self):
        """The same model with the last expert's gate parameters at 0 (the gate's translation removed)."""
        return replace(self, beta1=self.beta1 - self.beta1[-1], beta0=self.beta0 - self.beta0[-1])


@dataclass(frozen=True)
class GaussianMoE(GatedMixture):
    """A Gaussian mixture of K linear experts on d-dimensional inputs, with a softmax-type gate.

    beta1 (K, d), beta0 (K,): the gate; a (K, d), b (K,): the experts' slopes and intercepts;
    var (K,): the experts' variances (> 0); gate: one of :data:`GATES`; top_k: K of the top-K
    gate; transform: M of the modified gate (default tanh).
    """

    beta1: torch.Tensor
    beta0: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    var: torch.Tensor
    gate: str = "softmax"
    top_k: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        for name in ("beta1", "beta0", "a", "b", "var"):
            object.__setattr__(self, name, _as64(name, getattr(self, name)))
        k, d = self._check_gate()
        shapes = {"a": (k, d), "b": (k,), "var": (k,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (k={k} experts, d={d} inputs), got "
                                 f"{tuple(getattr(self, name).shape)}")
        if not (self.var > 0).all():
            raise ValueError("var must be > 0 for every expert")

    def expert_log_densities(self, x, y) -> torch.Tensor:
        """log N(y_n | a_i^T x_n + b_i, var_i), (n, K)."""
        x = self._check_x(x)
        y = _as64("y", y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        mean = x @ self.a.T + self.b
        return -0.5 * (_LOG_2PI + self.var.log() + (y[:, None] - mean) ** 2 / self.var)

    def sample(self, n: int, seed: int = 0, x_low: float = -1.0,
               x_high: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: n inputs uniform on ``[x_low, x_high]^d`` and responses drawn from the model,
        from a generator seeded with ``seed``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        x = x_low + (x_high - x_low) * torch.rand(n, self.d, generator=g, dtype=_F64)
        expert = torch.multinomial(self.gate_log_probs(x).exp(), 1, generator=g).squeeze(1)
        mean = (x * self.a[expert]).sum(1) + self.b[expert]
        y = mean + self.var[expert].sqrt() * torch.randn(n, generator=g, dtype=_F64)
        return x, y



@dataclass
class EMResult:
    """What :func:`fit_em` returns: the fitted model, its mean log-likelihood, the likelihood
    after every iteration of the best restart, the iterations it took and whether it converged."""

    model: GaussianMoE
    log_likelihood: float
    trace: list
    iterations: int
    converged: bool


def _softmax_objective(theta: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples (weighted by ``weights``) of ``sum_c t_nc log softmax(theta phi_n)_c``,
    with the last row of theta fixed at 0 (theta has one row fewer than there are classes)."""
    logits = torch.cat([feats @ theta.T, feats.new_zeros(feats.shape[0], 1)], dim=1)
    per = (targets * torch.log_softmax(logits, dim=1)).sum(1)
    return per.mean() if weights is None else (weights * per).sum() / weights.sum().clamp_min(1e-300)


def softmax_newton(theta: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None = None, steps: int = 5) -> torch.Tensor:
    """Newton steps with backtracking on :func:`_softmax_objective`, never decreasing it: a
    (weighted) multinomial logistic regression with soft labels ``targets`` (n, C), parameters
    ``theta`` (C - 1, p) acting on ``feats`` (n, p), the last class's fixed at 0. The Hessian
    gets a ridge of 1e-8, so that a separable split of the targets cannot make it singular."""
    k1, p = theta.shape
    n = feats.shape[0]
    w = feats.new_ones(n) if weights is None else weights
    total = w.sum().clamp_min(1e-300)
    current = _softmax_objective(theta, feats, targets, weights)
    for _ in range(steps):
        logits = torch.cat([feats @ theta.T, feats.new_zeros(n, 1)], dim=1)
        prob = torch.softmax(logits, dim=1)[:, :k1]  # (n, C-1)
        mass = targets.sum(1, keepdim=True)  # 1 for proper soft labels
        grad = ((w[:, None] * (targets[:, :k1] - mass * prob)).T @ feats) / total  # (C-1, p)
        cov = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # (n, C-1, C-1)
        cov = cov * (w * mass.squeeze(1))[:, None, None]
        hess = torch.einsum("nij,np,nq->ipjq", cov, feats, feats).reshape(k1 * p, k1 * p) / total
        hess = hess + 1e-8 * torch.eye(k1 * p, dtype=_F64)
        direction = torch.linalg.solve(hess, grad.reshape(-1)).reshape(k1, p)
        step = 1.0
        while step > 1e-8:
            trial = theta + step * direction
            value = _softmax_objective(trial, feats, targets, weights)
            if value >= current:
                break
            step /= 2
        else:
            break
        theta, gain, current = trial, float(value - current), value
        if gain < 1e-12:
            break
    return theta


def _random_start(x: torch.Tensor, y: torch.Tensor, k: int, g: torch.Generator) -> tuple:
    """A random start: experts fitted on a random soft split of the data, a small random gate."""
    n, d = x.shape
    resp = torch.rand(n, k, generator=g, dtype=_F64) ** 4
    resp = resp / resp.sum(1, keepdim=True)
    beta1 = 0.1 * torch.randn(k, d, generator=g, dtype=_F64)
    beta0 = torch.zeros(k, dtype=_F64)
    return resp, beta1, beta0


def _experts_step(x: torch.Tensor, y: torch.Tensor, resp: torch.Tensor, var_floor: float):
    """Weighted least squares of every expert and its weighted residual variance."""
    n, d = x.shape
    xb = torch.cat([x, x.new_ones(n, 1)], dim=1)
    a, b, var = [], [], []
    for i in range(resp.shape[1]):
        w = resp[:, i]
        gram = (xb * w[:, None]).T @ xb + 1e-10 * torch.eye(d + 1, dtype=_F64)
        coef = torch.linalg.solve(gram, (xb * w[:, None]).T @ y)
        resid = y - xb @ coef
        var.append(max(float((w * resid ** 2).sum() / w.sum().clamp_min(1e-300)), var_floor))
        a.append(coef[:d])
        b.append(coef[d])
    return torch.stack(a), torch.stack(b), torch.tensor(var, dtype=_F64)


def _check_fit(x, y, k: int, restarts: int, params: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < params:
        raise ValueError(f"n = {x.shape[0]} samples cannot identify the {params} parameters of {k} experts on "
                         f"{x.shape[1]} inputs")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")


def gate_step(model: GatedMixture, feats: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's M-step: ``(beta1, beta0)`` maximising ``sum_n sum_i r_ni log g_i(x_n)`` by
    :func:`softmax_newton` from the current gate (last expert's parameters fixed at 0);
    ``feats`` is ``[M(x), 1]``."""
    k, d = model.k, model.d
    if k == 1:
        return model.beta1 * 0, model.beta0 * 0
    canon = model.canonical()
    theta = softmax_newton(torch.cat([canon.beta1[:-1], canon.beta0[:-1, None]], dim=1), feats, resp)
    zeros = feats.new_zeros(1, d)
    return torch.cat([theta[:, :d], zeros]), torch.cat([theta[:, d], zeros[0, :1]])


def run_em(x, y, start: Callable[[torch.Generator], GatedMixture], experts_step, *, restarts: int, max_iter: int,
           tol: float, seed: int, init: GatedMixture | None = None, gate=None, penalty=None) -> EMResult:
    """EM for a gated mixture: ``start(generator)`` draws a starting model, ``experts_step(model,
    resp)`` returns the model with its experts refitted to the responsibilities; the gate step is
    :func:`gate_step`, or ``gate(model, resp) -> (beta1, beta0)`` when given. A run stops when
    its objective, the mean log-likelihood minus ``penalty(model)`` when given, gains less than
    ``tol``; the best of ``restarts`` runs by that objective is returned (its ``trace`` and
    ``log_likelihood`` are the unpenalised likelihood)."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)

    def objective(model, loglik):
        return loglik if penalty is None else loglik - penalty(model)

    best = best_value = None
    for r in range(restarts):
        model = init if (r == 0 and init is not None) else start(g)
        feats = torch.cat([model.gate_features(x), x.new_ones(n, 1)], dim=1)
        trace = [model.log_likelihood(x, y)]
        values = [objective(model, trace[-1])]
        converged, it = False, 0
        while it < max_iter:
            it += 1
            resp = torch.softmax(model.gate_log_probs(x) + model.expert_log_densities(x, y), dim=1)  # E-step
            model = experts_step(model, resp)  # M-step: experts, then the gate
            beta1, beta0 = gate_step(model, feats, resp) if gate is None else gate(model, resp)
            model = replace(model, beta1=beta1, beta0=beta0)
            trace.append(model.log_likelihood(x, y))
            values.append(objective(model, trace[-1]))
            if abs(values[-1] - values[-2]) < tol:
                converged = True
                break
        if best is None or values[-1] > best_value:
            best, best_value = EMResult(model, trace[-1], trace, it, converged), values[-1]
    return best


def fit_em(x, y, k: int, *, gate: str = "softmax", top_k: int | None = None,
           transform: Callable[[torch.Tensor], torch.Tensor] | None = None, restarts: int = 5,
           max_iter: int = 500, tol: float = 1e-8, seed: int = 0, var_floor: float = 1e-8,
           init: GaussianMoE | None = None) -> EMResult:
    """Maximum-likelihood fit of a :class:`GaussianMoE` with ``k`` experts by EM.

    Each of ``restarts`` runs starts from random responsibilities (seeded by ``seed``; with
    ``init``, the first run starts from that model instead) and stops when the mean
    log-likelihood gains less than ``tol`` or after ``max_iter`` iterations; the run with the
    highest likelihood is returned. Variances are kept above ``var_floor`` (the likelihood of a
    Gaussian mixture is unbounded when an expert collapses onto one point). For the top-K gate the
    gate step fits the full softmax (the top-K likelihood is not smooth), so its trace may dip.

    Raises ValueError for k < 1, fewer samples than the model's parameters, non-finite data or
    a bad gate.
    """
    x, y = _as64("x", x), _as64("y", y)
    d = x.shape[-1] if x.dim() == 2 else 0
    _check_fit(x, y, k, restarts, (k - 1) * (d + 1) + k * (d + 2) if isinstance(k, int) else 0)
    template = GaussianMoE(torch.zeros(k, d), torch.zeros(k), torch.zeros(k, d), torch.zeros(k), torch.ones(k),
                           gate=gate, top_k=top_k, transform=transform)

    def experts(model, resp):
        a, b, var = _experts_step(x, y, resp, var_floor)
        return replace(model, a=a, b=b, var=var)

    def start(g):
        resp, beta1, beta0 = _random_start(x, y, k, g)
        return experts(replace(template, beta1=beta1, beta0=beta0), resp)

    return run_em(x, y, start, experts, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, init=init)
