"""Models for tabular data: an MLP and mixtures of MLP experts under three gates, each with or
without a piecewise-linear embedding of the numerical features.

The GG MoE paper (Chernov 2025, "(GG) MoE vs. MLP on Tabular Data") pits a mixture of MLP experts
with a Gumbel-softmax gate and a feature embedding against an MLP; the KAMoE paper (Inzirillo and
Genet 2024) replaces the softmax gate with a gated residual KAN (GRKAN). Every model here is::

    e = PLE(x)                      optional (``embedding="ple"``); else e = x
    h = Dropout(ReLU(W_0 e + b_0))  the shared input stem, e -> width
    MLP:  h <- Dropout(ReLU(W_l h + b_l)),  l = 1 .. depth - 1
    MoE:  h <- Dropout(ReLU(sum_i g_i(h) f_i(h)))   f_i(h) = ReLU(h A_i + a_i) B_i + b_i
    y = W_out h + b_out             classes (logits) or one regression output

with E experts (:class:`~gatezoo.blocks.MoEFeedForward`, ``"mlp-relu"`` experts with biases) of
hidden width ``expert_hidden`` (default ``width * (depth - 1) // (2 num_experts)``), so that the
experts hold as many weights as the MLP's hidden layers (a matched budget: each expert has two
``width x expert_hidden`` matrices). The gate g reads the
stem's output: ``"softmax"`` (dense), ``"gumbel"`` (GG MoE: ``softmax((l + G) / tau)``, one sample
per row in training, the mean of S seeded samples in eval) or ``"grkan"`` (sigmoid gates of a
GRKAN, not renormalised); docs/architecture.md, "The math", has each formula.

**Piecewise-linear encoding** (Gorishniy, Rubachev and Babenko 2022, "On Embeddings for Numerical
Features in Tabular Deep Learning"; the embedding the GG MoE code uses). Feature j has bin edges
``b_0 < b_1 < ... < b_T`` (quantiles of its training values, :meth:`PiecewiseLinearEmbedding.fit`),
and ``x`` is encoded as the T numbers::

    z_t = (x - b_{t-1}) / (b_t - b_{t-1})
    e_t = clip(z_t, 0, 1)     for 1 < t < T
    e_1 = min(z_1, 1)         (open below)        e_T = max(z_T, 0)   (open above)

(a single bin is left unclipped: ``e_1 = z_1``), then one linear map per feature, ``T -> d_emb``,
with a bias; the outputs of all features are concatenated (``num_features * d_emb`` wide).
A feature with fewer distinct quantiles gets fewer bins; the unused slots encode to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gatezoo.blocks import MoEFeedForward
from gatezoo.blocks.checks import ArgumentTypeError, check_float_tensor, check_int, check_probability, check_str

__all__ = ["EMBEDDINGS", "GATES", "PiecewiseLinearEmbedding", "TabularConfig", "TabularMLP", "TabularMoE",
           "quantile_edges"]

EMBEDDINGS = ("none", "ple")
"""The feature embeddings of :class:`TabularConfig` (``embedding``)."""
GATES = ("softmax", "gumbel", "grkan")
"""The gates of :class:`TabularMoE` (router names of :data:`gatezoo.blocks.ROUTERS`)."""


def quantile_edges(x: torch.Tensor | np.ndarray, bins: int) -> list[np.ndarray]:
    """Per column of ``x`` (N, F): the distinct quantiles at ``linspace(0, 1, bins + 1)``, at least
    two of them (a constant column gets ``[v, v + 1]``, one bin)."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty (N, F) table, got shape {x.shape}")
    check_int("bins", bins)
    out = []
    for col in x.T:
        e = np.unique(np.quantile(col, np.linspace(0.0, 1.0, bins + 1)))
        out.append(e if len(e) >= 2 else np.array([e[0], e[0] + 1.0]))
    return out


class PiecewiseLinearEmbedding(nn.Module):
    """Piecewise-linear encoding of each numerical feature, then a linear map per feature
    (see the module docstring). Input (..., num_features), output (..., num_features * dim).

    The edges start uniform on [-2, 2] (T bins per feature, the range of a standardised
    feature); :meth:`fit` sets the quantile edges of the training data.

    Args:
        num_features: F, the columns of the input.
        bins: T, the most bins per feature.
        dim: d_emb, the width of each feature's embedding.
    """

    def __init__(self, num_features: int, bins: int = 16, dim: int = 8):
        super().__init__()
        self.num_features = check_int("num_features", num_features)
        self.bins = check_int("bins", bins)
        self.dim = check_int("dim", dim)
        edges = torch.linspace(-2.0, 2.0, bins + 1).expand(num_features, bins + 1)
        self.register_buffer("left", edges[:, :-1].contiguous())
        self.register_buffer("width", (edges[:, 1:] - edges[:, :-1]).contiguous())
        self.register_buffer("count", torch.full((num_features,), bins, dtype=torch.long))
        self.weight = nn.Parameter(torch.empty(num_features, bins, dim))
        self.bias = nn.Parameter(torch.empty(num_features, dim))
        bound = bins ** -0.5  # nn.Linear's init for a T -> d_emb layer
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def fit(self, x: torch.Tensor | np.ndarray) -> PiecewiseLinearEmbedding:
        """Set each feature's edges to the quantiles of its column of ``x`` (N, F), the training
        rows (:func:`quantile_edges`); returns self."""
        shape = tuple(x.shape)
        if len(shape) != 2 or shape[1] != self.num_features:
            raise ValueError(f"x must have shape (N, {self.num_features}), got {shape}")
        left = torch.zeros_like(self.left)
        width = torch.ones_like(self.width)
        count = torch.zeros_like(self.count)
        for j, e in enumerate(quantile_edges(x, self.bins)):
            n = len(e) - 1
            e = torch.as_tensor(e, dtype=left.dtype)
            left[j, :n], width[j, :n], count[j] = e[:-1], e[1:] - e[:-1], n
        self.left.copy_(left)
        self.width.copy_(width)
        self.count.copy_(count)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoding (..., F, T): ``e_t`` of every feature, 0 in a feature's unused bins."""
        z = (x.unsqueeze(-1) - self.left.to(x.dtype)) / self.width.to(x.dtype)
        t = torch.arange(self.bins, device=x.device)
        last = (self.count - 1).unsqueeze(-1)
        inf = torch.tensor(torch.inf, dtype=x.dtype, device=x.device)
        lower = torch.where(t == 0, -inf, torch.zeros((), dtype=x.dtype, device=x.device))
        upper = torch.where(t == last, inf, torch.ones((), dtype=x.dtype, device=x.device))
        z = torch.maximum(torch.minimum(z, upper), lower)
        return torch.where(t < self.count.unsqueeze(-1), z, torch.zeros((), dtype=x.dtype, device=x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must have shape (..., {self.num_features}), got {tuple(x.shape)}")
        e = self.encode(x)
        out = torch.einsum("...ft,ftd->...fd", e, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return out.flatten(-2)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, bins={self.bins}, dim={self.dim}"


@dataclass
class TabularConfig:
    """Fields of :class:`TabularMLP` and :class:`TabularMoE`.

    num_features: input columns (numerical, standardised).
    num_outputs: classes (logits) or 1 for regression.
    width: the stem's (and the MLP's hidden layers') width.
    depth: the MLP's layers, the stem included (the MoE models: the stem, then one MoE layer).
    dropout: after every hidden layer.
    embedding: ``"none"`` or ``"ple"`` (piecewise-linear encoding, then a linear map per feature).
    bins, emb_dim: the embedding's bins per feature and width per feature.
    gate: ``None`` (the MLP) or the MoE's gate, one of :data:`GATES`.
    num_experts: E.
    expert_hidden: each expert's hidden width (None: ``width * (depth - 1) // (2 num_experts)``,
        at least 1: the experts hold as many weights as the MLP's hidden layers).
    router_args: keyword arguments of the gate (``tau``, ``samples``, ``seed`` for ``"gumbel"``).
    """

    num_features: int = 8
    num_outputs: int = 2
    width: int = 64
    depth: int = 3
    dropout: float = 0.1
    embedding: str = "none"
    bins: int = 16
    emb_dim: int = 8
    gate: str | None = None
    num_experts: int = 4
    expert_hidden: int | None = None
    router_args: dict | None = None

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first field out of range."""
        for name in ("num_features", "num_outputs", "width", "bins", "emb_dim", "num_experts"):
            check_int(name, getattr(self, name))
        check_int("depth", self.depth, 2 if self.gate is None else 1)
        check_probability("dropout", self.dropout)
        check_str("embedding", self.embedding)
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {self.embedding!r}")
        if self.gate is not None:
            check_str("gate", self.gate)
            if self.gate not in GATES:
                raise ValueError(f"gate must be None (an MLP) or one of {list(GATES)}, got {self.gate!r}")
            if self.num_experts < 2:
                raise ValueError(f"num_experts must be >= 2 for a mixture, got {self.num_experts}")
        if self.expert_hidden is not None:
            check_int("expert_hidden", self.expert_hidden)
        if self.router_args is not None and not isinstance(self.router_args, dict):
            raise ArgumentTypeError(f"router_args must be a dict or None, got {self.router_args!r}")

    @property
    def hidden_per_expert(self) -> int:
        """The experts' hidden width: ``expert_hidden`` or the matched-budget default."""
        if self.expert_hidden is not None:
            return self.expert_hidden
        return max(1, self.width * max(1, self.depth - 1) // (2 * self.num_experts))


class _Tabular(nn.Module):
    """The embedding and stem every tabular model shares, and the input check."""

    def __init__(self, cfg: TabularConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.embedding == "ple":
            self.embed: nn.Module | None = PiecewiseLinearEmbedding(cfg.num_features, cfg.bins, cfg.emb_dim)
            stem_in = cfg.num_features * cfg.emb_dim
        else:
            self.embed, stem_in = None, cfg.num_features
        self.stem = nn.Linear(stem_in, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.width, cfg.num_outputs)

    def fit_embedding(self, x: torch.Tensor | np.ndarray) -> None:
        """Fit the embedding's bin edges to the training rows ``x`` (nothing without an embedding)."""
        if self.embed is not None:
            self.embed.fit(x)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.ndim != 2 or x.shape[1] != self.cfg.num_features:
            raise ValueError(f"x must have shape (B, {self.cfg.num_features}) (rows, features), got {tuple(x.shape)}")
        if self.embed is not None:
            x = self.embed(x)
        return self.drop(torch.relu(self.stem(x)))


class TabularMLP(_Tabular):
    """The MLP: embedding (optional), stem, ``depth - 1`` hidden layers (Linear, ReLU, dropout),
    head. Input (B, num_features), output (B, num_outputs)."""

    def __init__(self, cfg: TabularConfig):
        super().__init__(cfg)
        if cfg.gate is not None:
            raise ValueError(f"gate must be None for TabularMLP, got {cfg.gate!r} (use TabularMoE)")
        self.blocks = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._stem(x)
        for block in self.blocks:
            h = self.drop(torch.relu(block(h)))
        return self.head(h)


class TabularMoE(_Tabular):
    """A mixture of MLP experts: embedding (optional), stem, one dense MoE layer of
    ``num_experts`` MLP experts under ``gate``, ReLU, dropout, head. Input (B, num_features),
    output (B, num_outputs); :attr:`aux_loss` is the MoE layer's (0 for these dense gates)."""

    def __init__(self, cfg: TabularConfig):
        super().__init__(cfg)
        if cfg.gate is None:
            raise ValueError("gate must be one of " + str(list(GATES)) + " for TabularMoE, got None (use TabularMLP)")
        self.moe = MoEFeedForward(cfg.width, cfg.hidden_per_expert, cfg.width, bias=True,
                                  num_experts=cfg.num_experts, k=cfg.num_experts, router=cfg.gate,
                                  router_args=dict(cfg.router_args or {}), expert="mlp-relu", backend="torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._stem(x)
        h = self.drop(torch.relu(self.moe(h)))
        return self.head(h)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The MoE layer's auxiliary loss of the last forward."""
        return self.moe.aux_loss
