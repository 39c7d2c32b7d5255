"""The torch backend of the KAN layer: :class:`KANLinearFunction`.

The plain composition (:func:`~.naive.kan_linear_composed`) evaluates the Cox-de Boor recursion
on every (token, input) pair against every knot and lets autograd keep each level, an
(N, in, knots) tensor per level. This path uses instead that on a uniform grid a B-spline of
degree p is one polynomial per cell: an input in cell ``c`` at offset ``u`` in [0, 1) touches
only the ``p + 1`` functions ``B_{c-p}, ..., B_c``, with values ``[1, u, ..., u^p] @ M`` for a
fixed (p+1, p+1) matrix ``M`` (:func:`piece_matrix`). It scatters those values into a dense
(rows, in * width) block that stays in cache (each input's basis columns with ``p`` zero-weight
columns on either side, where an edge cell's values beyond the basis land: no bounds masks),
contracts it with the zero-padded spline weights by one matmul, and moves on to the next block
of rows. Nothing of the basis is kept: backward
recomputes it block by block (with the derivatives ``[0, 1, 2u, ...] @ M / h``), so the layer
saves only its input. Computes in float32 (float64 for float64 input), returns x's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..backend import composed_grads, in_compute_dtype
from ..scratch import Scratch, row_chunks
from .naive import kan_linear_composed


class KANSpec(NamedTuple):
    """What fixes a layer's basis and base branch (everything but the tensors)."""

    basis: str           # "bspline" or "rbf"
    lo: float
    hi: float
    grid_size: int
    spline_order: int    # p (``"bspline"`` only)
    base_act: str | None  # "silu", "elu", "relu" or None

    @property
    def cell(self) -> float:
        return (self.hi - self.lo) / self.grid_size

    @property
    def num_basis(self) -> int:
        return self.grid_size + self.spline_order if self.basis == "bspline" else self.grid_size + 1

    def composed_args(self) -> dict:
        return dict(basis=self.basis, grid_range=(self.lo, self.hi), grid_size=self.grid_size,
                    spline_order=self.spline_order, base_act=self.base_act)


@functools.cache
def piece_matrix(order: int) -> torch.Tensor:
    """``M`` (p+1, p+1), float64: in a cell at offset u, ``B_{c-p+r}(x) = sum_k M[k, r] u^k``.

    From Cox-de Boor on a uniform grid: with ``N^q_r`` the value of ``B_{c-q+r, q}``,
    ``N^q_r = ((u + q - r) N^{q-1}_{r-1} + (r + 1 - u) N^{q-1}_r) / q`` and ``N^0_0 = 1``
    (polynomials in u, as coefficient lists)."""
    polys = [[1.0]]
    for q in range(1, order + 1):
        new = []
        for r in range(q + 1):
            acc = [0.0] * (q + 1)
            if r >= 1:  # (u + q - r) * N^{q-1}_{r-1}
                for k, a in enumerate(polys[r - 1]):
                    acc[k] += (q - r) * a / q
                    acc[k + 1] += a / q
            if r <= q - 1:  # (r + 1 - u) * N^{q-1}_r
                for k, a in enumerate(polys[r]):
                    acc[k] += (r + 1) * a / q
                    acc[k + 1] -= a / q
            new.append(acc)
        polys = new
    return torch.tensor(polys, dtype=torch.float64).T.contiguous()


def act_and_slope(name: str, x: torch.Tensor, slope: bool, finite: bool = False):
    """``(act(x), act'(x) or None)`` with gatezoo's values at +-inf (SiLU: +inf / -0, slopes 1 / 0);
    ``finite=True`` promises that x holds no inf or NaN (a faster route)."""
    if name == "silu" and finite:
        s = torch.sigmoid(x)
        return x * s, (s * (1 + x * (1 - s)) if slope else None)
    if name == "silu":
        inf = torch.isinf(x)
        xs = torch.where(inf, 0.0, x)
        s = torch.sigmoid(xs)
        y = torch.where(inf, torch.where(x > 0, x, -0.0), xs * s)
        d = torch.where(inf, (x > 0).to(x.dtype), s * (1 + xs * (1 - s))) if slope else None
        return y, d
    if name == "elu":
        y = F.elu(x)
        return y, (torch.where(x > 0, 1.0, torch.exp(torch.clamp(x, max=0.0))) if slope else None)
    return torch.relu(x), ((x > 0).to(x.dtype) if slope else None)


def width(spec: KANSpec) -> int:
    """Columns per input in the torch path's basis block: the basis, plus ``p`` zero columns on
    each side for B-splines (the functions an edge cell touches beyond the basis), so that the
    ``p + 1`` values of every cell land in the block without a bounds mask."""
    return spec.num_basis + 2 * spec.spline_order if spec.basis == "bspline" else spec.num_basis


def padded_weight(spline_weight: torch.Tensor, spec: KANSpec, dtype: torch.dtype) -> torch.Tensor:
    """The spline weights (out, in, basis) as the (out, in * width) matrix the basis block meets,
    zero in the padding columns."""
    n_out, n_in, nb = spline_weight.shape
    p = width(spec) - nb
    if p == 0:
        return spline_weight.to(dtype).reshape(n_out, n_in * nb)
    w = torch.zeros(n_out, n_in, nb + p, dtype=dtype, device=spline_weight.device)
    w[..., p // 2: p // 2 + nb] = spline_weight
    return w.view(n_out, -1)


class _Basis:
    """The basis of one block of rows ``xc`` (m, in): ``dense`` (m, in * width(spec)) and, when
    asked, what the input derivative needs."""

    def __init__(self, xc: torch.Tensor, spec: KANSpec, tmp: Scratch, deriv: bool, finite: bool):
        m, n_in = xc.shape
        nb, h, wd = spec.num_basis, spec.cell, width(spec)
        dense = tmp.get("basis", m, n_in, wd)
        # the masks for +-inf and NaN cost more than the rest; skipped when every input is finite
        nan = None if finite else torch.isnan(xc).unsqueeze(-1)
        if spec.basis == "rbf":
            centres = spec.lo + h * torch.arange(nb, dtype=xc.dtype, device=xc.device)
            inf = None if finite else torch.isinf(xc)
            xf = xc if finite else torch.where(inf, 0.0, xc)
            d = torch.sub(xf.unsqueeze(-1), centres, out=tmp.get("d", m, n_in, nb)).div_(h)
            torch.exp(torch.mul(d, d, out=dense).neg_(), out=dense)
            if not finite:
                inf = inf.unsqueeze(-1)
                dense.masked_fill_(inf, 0.0)
            if deriv:  # d/dx exp(-d^2) = -2 d / h * exp(-d^2)
                self.slope = d.mul_(dense).mul_(-2.0 / h)
                if not finite:
                    self.slope.masked_fill_(inf, 0.0)
            self.dense = dense.view(m, n_in * wd)
            return
        # cell c of the extended grid and offset u; B_{c-p+r} = (powers(u) @ M)[r] sits in
        # column c + r of the input's padded block (basis j in column j + p)
        p = spec.spline_order
        ncell = spec.grid_size + 2 * p
        s = (xc - (spec.lo - p * h)) / h
        valid = ((s >= 0) & (s < ncell)).unsqueeze(-1).to(xc.dtype)  # 0 outside the extended grid
        if not finite:  # any cell for +-inf and NaN (their values are then set apart)
            s = torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
        c = s.floor().clamp_(0, ncell - 1)
        u = (s - c).clamp_(0, 1)
        powers = tmp.get("pow", m, n_in, p + 1)
        powers[..., 0] = 1
        for k in range(1, p + 1):
            torch.mul(powers[..., k - 1], u, out=powers[..., k])
        M = piece_matrix(p).to(device=xc.device, dtype=xc.dtype)
        vals = torch.matmul(powers, M).mul_(valid)
        if not finite:
            vals.masked_fill_(nan, float("nan"))
        idx = c.long().unsqueeze(-1) + torch.arange(p + 1, device=xc.device)
        dense.zero_().scatter_(-1, idx, vals)
        self.dense = dense.view(m, n_in * wd)
        if deriv:
            self.idx = idx
            if p == 0:
                self.slope = torch.zeros_like(vals)
            else:  # [0, 1, 2u, ..., p u^(p-1)] @ M / h
                dpow = torch.zeros_like(powers)
                torch.mul(powers[..., :-1], torch.arange(1, p + 1, dtype=xc.dtype, device=xc.device),
                          out=dpow[..., 1:])
                self.slope = torch.matmul(dpow, M).mul_(valid.div_(h))
            if not finite and p > 0:  # the steps of degree 0 have slope 0 everywhere, as in the composition
                self.slope.masked_fill_(nan, float("nan"))

    def input_grad(self, g: torch.Tensor, spec: KANSpec) -> torch.Tensor:
        """``sum_j g[:, i, j] * B_j'(x_i)`` for ``g`` (m, in * width): (m, in)."""
        g3 = g.view(g.shape[0], -1, width(spec))
        if spec.basis == "rbf":
            return (g3 * self.slope).sum(-1)
        return (g3.gather(-1, self.idx) * self.slope).sum(-1)


# Basis elements per block of rows on CPU: the block and its handful of temporaries stay in cache.
CPU_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(rows: int, per_row: int, device: torch.device):
    return row_chunks(rows, per_row, device, CPU_CHUNK_ELEMENTS)


def _all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no inf or NaN (a sum reads x once; one that overflows only sends a
    finite x down the slower route, which gives the same values)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)))


class KANLinearFunction(torch.autograd.Function):
    """``y = base(x) @ W_b^T + B(x) @ C^T + b`` (see :mod:`.naive`), saving only its inputs.

    ``forward(ctx, x, spline_weight, base_weight, bias, spec)``: ``x`` (..., in),
    ``spline_weight`` (out, in, basis), ``base_weight`` (out, in) or None, ``bias`` (out,) or
    None, ``spec`` a :class:`KANSpec`."""

    @staticmethod
    def forward(ctx, x, spline_weight, base_weight, bias, spec: KANSpec):
        n_in, n_out = x.shape[-1], spline_weight.shape[0]
        x2 = x.reshape(-1, n_in)
        cdt = in_compute_dtype(x2[:0]).dtype
        cw = padded_weight(spline_weight, spec, cdt)
        bw = None if base_weight is None else base_weight.to(cdt)
        y = torch.empty((x2.shape[0], n_out), dtype=cdt, device=x.device)
        tmp = Scratch(cdt, x.device)
        finite = _all_finite(x2)
        for sl in _row_chunks(x2.shape[0], n_in * width(spec), x.device):
            xc = x2[sl].to(cdt)
            basis = _Basis(xc, spec, tmp, deriv=False, finite=finite)
            torch.mm(basis.dense, cw.t(), out=y[sl])
            if bw is not None:
                y[sl].addmm_(act_and_slope(spec.base_act, xc, False, finite)[0], bw.t())
        if bias is not None:
            y += bias.to(cdt)
        ctx.spec = spec
        ctx.save_for_backward(x, spline_weight, base_weight, bias)
        return y.to(x.dtype).view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy):
        saved, second_order = begin_backward(ctx, dy)
        if second_order is not None:
            return second_order
        x, spline_weight, base_weight, bias, spec, (need_x, need_c, need_b, need_bias) = saved
        n_in, n_out = x.shape[-1], spline_weight.shape[0]
        x2, dy2 = x.reshape(-1, n_in), dy.reshape(-1, n_out)
        cdt = in_compute_dtype(x2[:0]).dtype
        cw = padded_weight(spline_weight, spec, cdt)
        bw = None if base_weight is None else base_weight.to(cdt)
        dx = torch.empty(x2.shape, dtype=cdt, device=x.device) if need_x else None
        dc = torch.zeros(cw.shape, dtype=cdt, device=x.device) if need_c else None
        db = torch.zeros(bw.shape, dtype=cdt, device=x.device) if need_b else None
        tmp = Scratch(cdt, x.device)
        finite = _all_finite(x2)
        for sl in _row_chunks(x2.shape[0], n_in * width(spec), x.device):
            xc, dyc = x2[sl].to(cdt), dy2[sl].to(cdt)
            if need_c or need_x:
                basis = _Basis(xc, spec, tmp, deriv=need_x, finite=finite)
                if need_c:
                    dc.addmm_(dyc.t(), basis.dense)
                if need_x:
                    g = torch.mm(dyc, cw, out=tmp.get("g", *basis.dense.shape))
                    dx[sl] = basis.input_grad(g, spec)
            if bw is not None and (need_b or need_x):
                a, slope = act_and_slope(spec.base_act, xc, need_x, finite)
                if need_b:
                    db.addmm_(dyc.t(), a)
                if need_x:
                    dx[sl].addcmul_(dyc @ bw, slope)
        return (
            dx.to(x.dtype).view(x.shape) if need_x else None,
            _unpad(dc, spline_weight, spec) if need_c else None,
            db.to(base_weight.dtype) if need_b else None,
            dy2.to(cdt).sum(0).to(bias.dtype) if need_bias else None,
            None,
        )


def begin_backward(ctx, dy):
    """What both autograd functions' backward starts from: ``((x, spline_weight, base_weight,
    bias, spec, needs), None)``, or ``(None, grads)`` when the backward is itself differentiated
    (``create_graph=True``), the grads then taken through the plain composition."""
    x, spline_weight, base_weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        return None, composed_grads(ctx, _composed, (x, spline_weight, base_weight, bias, ctx.spec), dy)
    return (x, spline_weight, base_weight, bias, ctx.spec, ctx.needs_input_grad[:4]), None


def _unpad(dc: torch.Tensor, spline_weight: torch.Tensor, spec: KANSpec) -> torch.Tensor:
    """The spline weights' gradient without the padding columns, in their shape and dtype."""
    n_out, n_in, nb = spline_weight.shape
    p = (width(spec) - nb) // 2
    return dc.view(n_out, n_in, -1)[..., p:p + nb].to(spline_weight.dtype).contiguous()


def _composed(x, spline_weight, base_weight, bias, spec: KANSpec):
    return kan_linear_composed(x, spline_weight, base_weight, bias, **spec.composed_args())
