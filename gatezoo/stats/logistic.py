"""The softmax-gated multinomial logistic mixture of experts (classification) and its EM.

Nguyen et al. 2024, "A General Theory for Softmax Gating Multinomial Logistic Mixture of
Experts". For an input ``x`` in R^d and a class ``y`` in {0, ..., C - 1}::

    p(y | x) = sum_i g_i(x) softmax(eta_i x + tau_i)_y

with the gate ``g`` of :class:`~gatezoo.stats.moe.GaussianMoE` (softmax, top-K, or the modified
softmax, which applies a bounded ``M`` such as tanh to x first). ``eta`` is (K, C, d) and ``tau``
(K, C). The last class's row of each expert is its reference and is fixed at 0 by
:meth:`LogisticMoE.canonical`.

The paper's claim:

- when some expert parameters ``eta_i`` vanish, they interact with the softmax gate's
  parameters through a partial differential equation, and the parameter estimates converge
  slower than any polynomial rate;
- the modified gate, ``softmax(beta1 M(x) + beta0)`` with a bounded ``M``, removes the
  interaction and restores polynomial rates.

:func:`fit_em_logistic` is EM like :func:`~gatezoo.stats.moe.fit_em`. The difference is the
experts' M-step, a responsibility-weighted multinomial logistic regression per expert, solved by
:func:`~gatezoo.stats.moe.softmax_newton`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .moe import EMResult, GatedMixture, _as64, _check_fit, run_em, softmax_newton

__all__ = ["LogisticMoE", "fit_em_logistic"]

_F64 = torch.float64


@dataclass(frozen=True)
class LogisticMoE(GatedMixture):
    """K multinomial logistic experts over C classes on d inputs, with a softmax-type gate.

    beta1 (K, d), beta0 (K,): the gate; eta (K, C, d), tau (K, C): the experts; gate, top_k,
    transform: as for :class:`~gatezoo.stats.moe.GaussianMoE`.
    """

    beta1: torch.Tensor
    beta0: torch.Tensor
    eta: torch.Tensor
    tau: torch.Tensor
    gate: str = "softmax"
    top_k: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        for name in ("beta1", "beta0", "eta", "tau"):
            object.__setattr__(self, name, _as64(name, getattr(self, name)))
        k, d = self._check_gate()
        c = self.tau.shape[-1] if self.tau.dim() == 2 else 0
        if c < 2 or tuple(self.tau.shape) != (k, c):
            raise ValueError(f"tau must have shape ({k}, C) with C >= 2 classes, got {tuple(self.tau.shape)}")
        if tuple(self.eta.shape) != (k, c, d):
            raise ValueError(f"eta must have shape ({k}, {c}, {d}), got {tuple(self.eta.shape)}")

    @property
    def classes(self) -> int:
        """The number of classes C."""
        return self.tau.shape[1]

    def expert_log_densities(self, x, y) -> torch.Tensor:
        """log softmax(eta_i x_n + tau_i)_{y_n}, (n, K)."""
        x = self._check_x(x)
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
            raise ValueError(f"y must be ({x.shape[0]},) integer class labels, got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.classes):
            raise ValueError(f"y must lie in [0, {self.classes}), got [{int(y.min())}, {int(y.max())}]")
        logits = torch.einsum("nd,kcd->nkc", x, self.eta) + self.tau  # (n, K, C)
        logp = torch.log_softmax(logits, dim=2)
        return logp.gather(2, y.long()[:, None, None].expand(-1, self.k, 1)).squeeze(2)

    def sample(self, n: int, seed: int = 0, x_low: float = -1.0,
               x_high: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: n inputs uniform on ``[x_low, x_high]^d`` and classes drawn from the model."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        x = x_low + (x_high - x_low) * torch.rand(n, self.d, generator=g, dtype=_F64)
        expert = torch.multinomial(self.gate_log_probs(x).exp(), 1, generator=g).squeeze(1)
        logits = torch.einsum("nd,ncd->nc", x, self.eta[expert]) + self.tau[expert]
        y = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g).squeeze(1)
        return x, y

    def canonical(self) -> LogisticMoE:
        """The gate's translation removed (last expert's gate at 0) and each expert's last class at 0."""
        gated = super().canonical()
        return replace(gated, eta=self.eta - self.eta[:, -1:], tau=self.tau - self.tau[:, -1:])


def fit_em_logistic(x, y, k: int, classes: int, *, gate: str = "softmax", top_k: int | None = None,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, restarts: int = 5,
                    max_iter: int = 500, tol: float = 1e-8, seed: int = 0,
                    init: LogisticMoE | None = None) -> EMResult:
    """Maximum-likelihood fit of a :class:`LogisticMoE` with ``k`` experts and ``classes``
    classes by EM (restarts, stopping and refusals as :func:`~gatezoo.stats.moe.fit_em`)."""
    x = _as64("x", x)
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    d = x.shape[-1] if x.dim() == 2 else 0
    _check_fit(x, y, k, restarts, (k - 1) * (d + 1) + k * (classes - 1) * (d + 1) if isinstance(k, int) else 0)
    n = x.shape[0]
    template = LogisticMoE(torch.zeros(k, d), torch.zeros(k), torch.zeros(k, classes, d), torch.zeros(k, classes),
                           gate=gate, top_k=top_k, transform=transform)
    template.expert_log_densities(x[:1], y[:1])  # checks the labels' range up front
    xb = torch.cat([x, x.new_ones(n, 1)], dim=1)
    onehot = torch.nn.functional.one_hot(y.long(), classes).to(_F64)

    def experts(model, resp):
        canon = model.canonical()
        eta, tau = [], []
        for i in range(k):
            theta = torch.cat([canon.eta[i, :-1], canon.tau[i, :-1, None]], dim=1)  # (C-1, d+1)
            theta = softmax_newton(theta, xb, onehot, weights=resp[:, i])
            eta.append(torch.cat([theta[:, :d], x.new_zeros(1, d)]))
            tau.append(torch.cat([theta[:, d], x.new_zeros(1)]))
        return replace(model, eta=torch.stack(eta), tau=torch.stack(tau))

    def start(g):
        resp = torch.rand(n, k, generator=g, dtype=_F64) ** 4
        resp = resp / resp.sum(1, keepdim=True)
        return experts(replace(template, beta1=0.1 * torch.randn(k, d, generator=g, dtype=_F64)), resp)

    return run_em(x, y, start, experts, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, init=init)
