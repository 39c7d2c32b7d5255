"""Kolmogorov-Arnold layers: :class:`KANLayer` and the gated residual KAN :class:`GRKAN`.

Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks". Every edge (input i -> output o) carries a
learnable univariate function; a layer sums them:

```
y_o = sum_i  W_b[o, i] * base(x_i)  +  sum_i sum_j  C[o, i, j] * B_j(x_i)
```

``base`` is SiLU by default and ``B_j`` one of two bases over ``grid_range = (lo, hi)`` cut into
``grid_size = G`` equal cells of width ``h = (hi - lo) / G``:

* ``"bspline"``: B-splines of degree ``p = spline_order`` on the uniform grid extended by ``p``
  cells on each side, knots ``t_m = lo + (m - p) * h`` for ``m = 0 .. G + 2p``, built by the
  Cox-de Boor recursion

  ```
  B_{m,0}(x) = 1 if t_m <= x < t_{m+1} else 0
  B_{m,q}(x) = (x - t_m) / (t_{m+q} - t_m) * B_{m,q-1}(x)
             + (t_{m+q+1} - x) / (t_{m+q+1} - t_{m+1}) * B_{m+1,q-1}(x)
  ```

  which gives ``G + p`` basis functions that sum to 1 everywhere on ``[lo, hi)`` (and vanish
  outside the extended grid, where only the base branch is left).
* ``"rbf"``: Gaussian bumps ``B_j(x) = exp(-((x - c_j) / h)^2)`` centred on the ``G + 1`` grid
  points ``c_j = lo + j * h`` (the radial-basis variant of Li 2024, "Kolmogorov-Arnold Networks
  are Radial Basis Function Networks"); ``spline_order`` is not used.

The grid is fixed (no grid updates during training).

:class:`GRKAN` is the gated residual KAN of the KAMoE gate (Inzirillo and Genet 2024, "A Gated
Residual Kolmogorov-Arnold Networks for Mixtures of Experts"), in two structures:

* ``"paper"`` (the default), the paper's GRKAN and the authors' code (github.com/remigenet/KAMoE,
  ``kamoe/grkan.py``), optionally behind the KAMoE gate's input layer ``h = ReLU(W_d x + b_d)``
  (``dense_width``; without it ``h = x``):

  ```
  GRKAN(h) = LayerNorm(W_s h + b_s + GLU(eta)),   eta = KAN2(KAN1(h))
  GLU(eta) = sigmoid(W_4 eta + b_4) * (W_5 eta + b_5)
  ```

  with an ELU base for ``KAN1`` and a SiLU base for ``KAN2`` by default.
* ``"compact"``: ``LayerNorm(W_s x + a * sigmoid(b))``, ``[a | b] = KAN2(KAN1(x))`` with ``KAN2``
  twice as wide, SiLU bases, no skip bias and no affine GLU maps (gatezoo's structure before the
  paper's became the default; kept for its checkpoints).

See docs/architecture.md, 'Kolmogorov-Arnold layers and GRKAN'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.kan import BASES, bspline_basis, kan_linear, rbf_basis  # noqa: F401 (bspline_basis re-exported)
from .checks import (
    ArgumentTypeError,
    check_bool,
    check_float_tensor,
    check_non_negative,
    check_positive,
    check_probability,
)

_ACT_NAMES = {nn.SiLU: "silu", nn.ReLU: "relu"}


def _fused_activation(module) -> str | None:
    """The name :func:`~gatezoo.kernels.kan_linear` knows a base activation module by, or None
    when it must run as a module beside the op (a class the op does not fuse, or an ELU with
    alpha other than 1)."""
    if type(module) in _ACT_NAMES:
        return _ACT_NAMES[type(module)]
    if type(module) is nn.ELU and module.alpha == 1.0:
        return "elu"
    return None


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class KANLayer(nn.Module):
    """One Kolmogorov-Arnold layer, ``y = W_b base(x) + sum_j C_j B_j(x)`` (module docstring).

    Args:
        in_features, out_features: widths.
        basis: ``"bspline"`` (Cox-de Boor B-splines) or ``"rbf"`` (Gaussian bumps).
        grid_size: number of equal grid cells G over ``grid_range``.
        spline_order: B-spline degree p (``"bspline"`` only); 3 gives cubic splines.
        grid_range: ``(lo, hi)`` with ``lo < hi``.
        base_activation: class of the residual branch (default ``nn.SiLU``), or None for none.
        scale_noise: the spline coefficients start as ``N(0, scale_noise^2 / in_features)``, so
            the layer starts close to its base branch; ``W_b`` starts like an ``nn.Linear``.
        bias: an output bias (default False).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``: the layer runs as the fused op
            :func:`gatezoo.kernels.kan_linear`, which never stores the (..., in, basis) tensor and
            saves only its input for backward (``nn.SiLU``, ``nn.ReLU`` and ``nn.ELU()`` bases are
            fused; another base class runs as a module beside it).
        device, dtype: factory arguments.

    Input (..., in_features), output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, *, basis: str = "bspline", grid_size: int = 5,
                 spline_order: int = 3, grid_range: tuple[float, float] = (-2.0, 2.0),
                 base_activation=nn.SiLU, scale_noise: float = 0.1, bias: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        _positive_int("grid_size", grid_size)
        _positive_int("spline_order", spline_order, 0)
        try:
            lo, hi = (float(v) for v in grid_range)
        except (TypeError, ValueError):
            raise ValueError(f"grid_range must be a pair (lo, hi) of numbers, got {grid_range!r}") from None
        if not lo < hi:
            raise ValueError(f"grid_range must have lo < hi, got {grid_range!r}")
        scale_noise = check_non_negative("scale_noise", scale_noise)
        check_bool("bias", bias)
        if base_activation is not None and not callable(base_activation):
            raise ArgumentTypeError(f"base_activation must be an nn.Module class or None, got {base_activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.basis, self.grid_size, self.spline_order, self.grid_range = basis, grid_size, spline_order, (lo, hi)
        h = (hi - lo) / grid_size
        if basis == "bspline":
            steps = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64)
            self.num_basis = grid_size + spline_order
        else:
            steps = torch.arange(0, grid_size + 1, dtype=torch.float64)
            self.num_basis = grid_size + 1
        # knots (B-splines) or centres (RBF); float64 master copy, cast to x's dtype on use
        self.register_buffer("grid", lo + steps * h, persistent=False)
        self.cell = h
        self.base_act = base_activation() if base_activation is not None else None
        has_base = self.base_act is not None
        self.fused_act = _fused_activation(self.base_act) if has_base else None
        self.backend = backend
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features, **dd)) if has_base else None
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, self.num_basis, **dd))
        self.bias = nn.Parameter(torch.zeros(out_features, **dd)) if bias else None
        self.scale_noise = scale_noise
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.base_weight is not None:
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.normal_(self.spline_weight, std=self.scale_noise / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def basis_values(self, x: torch.Tensor) -> torch.Tensor:
        """The basis functions at every input: (..., in_features) -> (..., in_features, num_basis)
        (the plain composition, for inspection; ``forward`` never builds this tensor)."""
        if self.basis == "bspline":
            return bspline_basis(x, self.grid, self.spline_order)
        return rbf_basis(x, self.grid, self.cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape "
                             f"{tuple(x.shape)}")
        fused = self.fused_act is not None
        y = kan_linear(x, self.spline_weight, self.base_weight if fused else None, self.bias, basis=self.basis,
                       grid_range=self.grid_range, grid_size=self.grid_size, spline_order=self.spline_order,
                       base_activation=self.fused_act, backend=self.backend)
        if self.base_act is not None and not fused:
            y = y + nn.functional.linear(self.base_act(x), self.base_weight)
        return y

    def extra_repr(self) -> str:
        order = f", spline_order={self.spline_order}" if self.basis == "bspline" else ""
        return (f"{self.in_features}, {self.out_features}, basis={self.basis!r}, grid_size={self.grid_size}"
                f"{order}, grid_range={self.grid_range}")


_DEFAULT = object()  # "the structure's own base activations" (None already means "no base branch")


def saved_grkan_structure(state_dict, prefix: str = "") -> str | None:
    """The :class:`GRKAN` structure (``"paper"`` or ``"compact"``) a state dict was saved with,
    read from its keys under ``prefix``, or None when it holds no GRKAN there."""
    if f"{prefix}glu_gate.weight" in state_dict:
        return "paper"
    if f"{prefix}kan2.spline_weight" in state_dict:
        return "compact"
    return None


class GRKAN(nn.Module):
    """Gated residual KAN, the paper's structure by default (module docstring).

    ``structure="paper"``::

        h       = ReLU(W_d x + b_d)      with dense_width (the KAMoE gate's input layer), else x
        eta     = Dropout(KAN2(KAN1(h)))  KAN1: width(h) -> hidden, ELU base; KAN2: hidden -> hidden, SiLU base
        GLU     = sigmoid(W_4 eta + b_4) * (W_5 eta + b_5)          (hidden -> out each)
        GRKAN   = LayerNorm(W_s h + b_s + GLU)                      (W_s: width(h) -> out)

    Parameters: ``dense`` (``W_d``, ``b_d``; only with ``dense_width``), ``kan1``, ``kan2``,
    ``skip`` (``W_s``, ``b_s``), ``glu_gate`` (``W_4``, ``b_4``), ``glu_value`` (``W_5``,
    ``b_5``), ``norm``.

    ``structure="compact"``: ``LayerNorm(W_s x + a * sigmoid(b))``, ``[a | b] = KAN2(KAN1(x))``
    with ``KAN1: dim -> hidden``, ``KAN2: hidden -> 2 * out`` (the GLU halves) and a bias-free
    ``W_s``; parameters ``kan1``, ``kan2``, ``skip``, ``norm``.

    A state dict saved with the other structure is refused by ``load_state_dict`` with a
    message saying how to build the module that loads it.

    Args:
        dim: input width.
        hidden: width between the two KAN layers (default ``dim``).
        out_features: output width (default ``dim``).
        structure: ``"paper"`` (default) or ``"compact"``.
        dense_width: ``"paper"`` only: width of the input layer ``h = ReLU(W_d x + b_d)``, or None
            (default) for none.
        dropout: ``"paper"`` only: dropout rate on ``eta`` in training (default 0, as the
            authors' KAMoE layer).
        base_activation: the KAN layers' base: one ``nn.Module`` class (or None) for both, or a
            pair ``(KAN1's, KAN2's)``; default ``(nn.ELU, nn.SiLU)`` for ``"paper"`` and
            ``nn.SiLU`` for ``"compact"``.
        eps: the LayerNorm's epsilon.
        **kan_args: passed to both :class:`KANLayer` (``basis``, ``grid_size``, ``spline_order``,
            ``grid_range``, ``scale_noise``, ``backend``).
    """

    STRUCTURES = ("paper", "compact")

    def __init__(self, dim: int, hidden: int | None = None, out_features: int | None = None, *,
                 structure: str = "paper", dense_width: int | None = None, dropout: float = 0.0,
                 base_activation=_DEFAULT, eps: float = 1e-5, device=None, dtype=None, **kan_args):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _positive_int("dim", dim)
        hidden = dim if hidden is None else _positive_int("hidden", hidden)
        out = dim if out_features is None else _positive_int("out_features", out_features)
        if not isinstance(structure, str):
            raise ArgumentTypeError(f"structure must be one of {self.STRUCTURES}, got {structure!r} "
                                    f"({type(structure).__name__})")
        if structure not in self.STRUCTURES:
            raise ValueError(f"structure must be one of {self.STRUCTURES}, got {structure!r}")
        if dense_width is not None:
            _positive_int("dense_width", dense_width)
        dropout = check_probability("dropout", dropout)
        eps = check_positive("eps", eps)
        if structure == "compact" and dense_width is not None:
            raise ValueError(f"dense_width: the compact structure has no input layer, so dense_width must be None, "
                             f"got {dense_width!r}")
        if structure == "compact" and dropout:
            raise ValueError(f"dropout: the compact structure has no dropout, so dropout must be 0, got {dropout!r}")
        if base_activation is _DEFAULT:
            bases = (nn.ELU, nn.SiLU) if structure == "paper" else (nn.SiLU, nn.SiLU)
        elif isinstance(base_activation, (tuple, list)):
            if len(base_activation) != 2:
                raise ValueError(f"base_activation must be one class (or None) or a pair (KAN1's, KAN2's), got "
                                 f"{base_activation!r}")
            bases = tuple(base_activation)
        else:
            bases = (base_activation, base_activation)
        self.dim, self.hidden, self.out_features = dim, hidden, out
        self.structure, self.dense_width, self.dropout = structure, dense_width, dropout
        if structure == "compact":
            self.dense = None
            self.kan1 = KANLayer(dim, hidden, base_activation=bases[0], **kan_args, **dd)
            self.kan2 = KANLayer(hidden, 2 * out, base_activation=bases[1], **kan_args, **dd)
            self.skip = nn.Linear(dim, out, bias=False, **dd)
            self.glu_gate = self.glu_value = None
        else:
            self.dense = nn.Linear(dim, dense_width, **dd) if dense_width is not None else None
            width = dim if dense_width is None else dense_width
            self.kan1 = KANLayer(width, hidden, base_activation=bases[0], **kan_args, **dd)
            self.kan2 = KANLayer(hidden, hidden, base_activation=bases[1], **kan_args, **dd)
            self.skip = nn.Linear(width, out, **dd)
            self.glu_gate = nn.Linear(hidden, out, **dd)
            self.glu_value = nn.Linear(hidden, out, **dd)
        self.norm = nn.LayerNorm(out, eps=eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} features in its last dimension, got shape {tuple(x.shape)}")
        if self.structure == "compact":
            a, b = self.kan2(self.kan1(x)).chunk(2, dim=-1)
            return self.norm(self.skip(x) + a * torch.sigmoid(b))
        h = x if self.dense is None else torch.relu(self.dense(x))
        eta = self.kan2(self.kan1(h))
        if self.dropout:  # a Python constant: no dropout op at all in the default (0) case
            eta = nn.functional.dropout(eta, self.dropout, self.training)
        glu = torch.sigmoid(self.glu_gate(eta)) * self.glu_value(eta)
        return self.norm(self.skip(h) + glu)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = saved_grkan_structure(state_dict, prefix)
        if saved is not None and saved != self.structure:
            raise ValueError(f"GRKAN state dict{f' at {prefix!r}' if prefix else ''} was saved with the {saved!r} "
                             f"structure, but this GRKAN has structure={self.structure!r}: build it with "
                             f"GRKAN(..., structure={saved!r}) to load it")
        if saved == "paper" and (f"{prefix}dense.weight" in state_dict) != (self.dense is not None):
            had = "an input layer (dense_width set)" if self.dense is None else "no input layer (dense_width=None)"
            raise ValueError(f"GRKAN state dict{f' at {prefix!r}' if prefix else ''} was saved with {had}, but this "
                             f"GRKAN has dense_width={self.dense_width!r}: build it with the dense_width it was "
                             f"saved with")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        dense = f", dense_width={self.dense_width}" if self.dense is not None else ""
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return (f"{self.dim}, hidden={self.hidden}, out_features={self.out_features}, structure={self.structure!r}"
                f"{dense}{drop}")
