"""PyTorch reference for the gated-activation / GLU family.

Two things live here:

* :func:`phi_composed`, the readable composition of DESIGN.md §3 built from ordinary autograd
  ops (``F.silu(a)``, ``(1 + 2 alpha) * sigmoid(a) - alpha`` ...). It is the float64 oracle in
  the tests and the "eager" peer in the benchmarks.
* :class:`GatedActFunction`, the memory-lean torch path used on CPU: one autograd node that saves
  only its inputs and recomputes the gate in backward. It walks the rows in chunks small enough
  to stay in cache, so the several elementwise passes of each formula read main memory once,
  and computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kinds import ARCTAN, IDENTITY, NORMCDF, RELU, SIGMOID, ActKind

_INV_PI = 1.0 / math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Elements per chunk on CPU: about 1 MiB of float32 per live tensor, so the handful of
# temporaries of one chunk stays in L2/L3 while the next is read from memory.
CPU_CHUNK_ELEMENTS = 1 << 18


def expand(g: torch.Tensor, alpha) -> torch.Tensor:
    """``expand(g, alpha) = (1 + 2 alpha) g - alpha``: stretches a (0, 1) gate to (-alpha, 1 + alpha)."""
    return (1 + 2 * alpha) * g - alpha


def gate_composed(a: torch.Tensor, spec: ActKind) -> torch.Tensor:
    """The gate g(a) of ``spec`` as a plain composition (sigmoid, arctan/pi + 1/2 or Phi)."""
    if spec.gate == SIGMOID:
        return torch.sigmoid(a)
    if spec.gate == ARCTAN:
        return torch.atan(a) / math.pi + 0.5
    if spec.gate == NORMCDF:
        return 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    raise ValueError(f"{spec.name} has no gate")


def phi_composed(a: torch.Tensor, spec: ActKind, alpha=None) -> torch.Tensor:
    """phi(a) written the way a user would in eager PyTorch (autograd saves what it likes)."""
    if spec.gate == IDENTITY:
        return a
    if spec.gate == RELU:
        return F.relu(a)
    if alpha is None:
        if spec.name == "silu":
            return F.silu(a)
        if spec.name == "gelu":
            return F.gelu(a)
        g = gate_composed(a, spec)
    else:
        g = expand(gate_composed(a, spec), alpha)
    return a * g if spec.order == 2 else g


# ----------------------------------------------------------------------------------------------
# Chunked, memory-lean autograd function (the torch backend)


# Order-2 kinds whose a * g(a) has a fused ATen kernel and backward (SiLU, GELU): much cheaper
# on CPU than composing sigmoid / ndtr with products.
_FUSED_ORDER2 = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward),
}


def _gate(a: torch.Tensor, gate: int) -> torch.Tensor:
    """g(a) into a fresh float32 tensor."""
    if gate == SIGMOID:
        return torch.sigmoid(a)
    if gate == ARCTAN:
        return torch.atan(a).mul_(_INV_PI).add_(0.5)
    return torch.special.ndtr(a)


def _times_gate_slope(x: torch.Tensor, a: torch.Tensor, g: torch.Tensor, gate: int):
    """x * g'(a) into a fresh tensor, using g = g(a) where that is cheaper."""
    if gate == SIGMOID:
        return torch.ops.aten.sigmoid_backward(x, g)  # x * g * (1 - g), one pass
    if gate == ARCTAN:
        t = torch.mul(a, a).add_(1.0).mul_(math.pi)  # g'(a) = 1 / (pi (1 + a^2))
        return torch.div(x, t)
    t = torch.mul(a, a).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI)  # standard normal pdf
    return t.mul_(x)


def _phi_chunk(a, spec: ActKind, alpha: float | None):
    """phi(a) for one float32 chunk, as a fresh tensor (never aliases ``a``)."""
    if spec.gate == IDENTITY:
        return a.clone()
    if spec.gate == RELU:
        return torch.relu(a)
    if spec.name in _FUSED_ORDER2:
        p = _FUSED_ORDER2[spec.name][0](a)  # a g(a)
        if alpha is not None:  # a expand(g) = (1 + 2 alpha) a g - alpha a
            p.mul_(1.0 + 2.0 * alpha).sub_(a, alpha=alpha)
        return p
    g = _gate(a, spec.gate)
    if alpha is not None:
        g.mul_(1.0 + 2.0 * alpha).sub_(alpha)
    if spec.order == 2:
        g.mul_(a)
    return g


def _backward_chunk(a, w, spec: ActKind, alpha: float | None, want_alpha: bool, da_out):
    """For one float32 chunk, with ``w`` the gradient reaching phi (dy, or dy * b for a GLU):
    writes w * phi'(a) into ``da_out`` (when given) and returns (phi(a), sum(w * dphi/dalpha)).
    The sum is a float64 0-dim tensor, or None when not wanted.
    """
    def put(t):
        if da_out is not None:
            da_out.copy_(t)

    if spec.gate == IDENTITY:
        put(w)
        return a, None
    if spec.gate == RELU:
        if da_out is not None:
            torch.ops.aten.threshold_backward.grad_input(w, a, 0.0, grad_input=da_out)
        return torch.relu(a), None
    scale = 1.0 if alpha is None else 1.0 + 2.0 * alpha
    if spec.name in _FUSED_ORDER2:
        # phi = scale (a g) - alpha a, so phi' = scale (a g)' - alpha and dphi/dalpha = 2 a g - a
        act, act_backward = _FUSED_ORDER2[spec.name]
        p = act(a)
        dalpha = None
        if want_alpha:
            dalpha = 2.0 * torch.dot(w.reshape(-1), torch.sub(p, a, alpha=0.5).reshape(-1)).double()
        if da_out is not None:
            if alpha is None:
                act_backward.grad_input(w, a, grad_input=da_out)
            else:
                torch.sub(act_backward(w, a).mul_(scale), w, alpha=alpha, out=da_out)
        if alpha is not None:
            p.mul_(scale).sub_(a, alpha=alpha)
        return p, dalpha
    g = _gate(a, spec.gate)
    # order 1: phi = expand(g),    phi' = scale g',            dphi/dalpha = 2g - 1
    # order 2: phi = a expand(g),  phi' = expand(g) + a scale g',  dphi/dalpha = a (2g - 1)
    v = w if spec.order == 1 else torch.mul(w, a)
    dalpha = None
    if want_alpha:
        dalpha = torch.dot(v.reshape(-1), torch.mul(g, 2.0).sub_(1.0).reshape(-1)).double()
    if da_out is not None:
        s = _times_gate_slope(v, a, g, spec.gate)
        if scale != 1.0:
            s.mul_(scale)
    e = g if alpha is None else g.mul_(scale).sub_(alpha)  # expand(g, alpha), in place
    if spec.order == 1:
        if da_out is not None:
            da_out.copy_(s)
        return e, dalpha
    if da_out is not None:
        torch.addcmul(s, w, e, out=da_out)
    return e.mul_(a), dalpha


def _rows_per_chunk(rows: int, cols: int, device: torch.device) -> int:
    if device.type != "cpu":  # on accelerators chunking only adds launches
        return max(rows, 1)
    return max(1, CPU_CHUNK_ELEMENTS // max(cols, 1))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class GatedActFunction(torch.autograd.Function):
    """phi(a) [* b] on 2-D row views, saving only the inputs.

    Arguments: ``a`` (R, N) or, when ``packed``, the packed input (R, 2N) whose halves are a and
    b; ``b`` (R, N) or None; ``alpha`` a 0-dim tensor or None; ``spec`` the table row.
    """

    @staticmethod
    def forward(ctx, a, b, alpha, spec: ActKind, packed: bool):
        x = a
        if packed:
            n = x.shape[1] // 2
            a, b = x[:, :n], x[:, n:]
        rows, cols = a.shape
        y = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
        al = None if alpha is None else float(alpha)
        # Bilinear has nothing to recompute or keep in cache: one product over the whole tensor
        step = rows if spec.gate == IDENTITY and b is not None else _rows_per_chunk(rows, cols, a.device)
        for r0 in range(0, rows, step):
            sl = slice(r0, r0 + step)
            if spec.gate == IDENTITY and b is not None:
                torch.mul(a[sl], b[sl], out=y[sl])
                continue
            p = _phi_chunk(_f32(a[sl]), spec, al)
            if b is None:
                y[sl].copy_(p)
            else:
                torch.mul(p, b[sl], out=y[sl])
        # alpha is kept as a number: backward needs its value, not the (tiny) tensor
        ctx.spec, ctx.packed, ctx.alpha = spec, packed, al
        ctx.alpha_like = None if alpha is None else (alpha.dtype, alpha.shape)
        ctx.save_for_backward(x, None if packed else b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        spec, packed, al = ctx.spec, ctx.packed, ctx.alpha
        need_a = ctx.needs_input_grad[0]
        need_b = packed or ctx.needs_input_grad[1]
        want_alpha = al is not None and ctx.needs_input_grad[2]
        if packed:
            n = x.shape[1] // 2
            a, b = x[:, :n], x[:, n:]
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            da, db = dx[:, :n], dx[:, n:]
        else:
            a = x
            da = torch.empty(a.shape, dtype=a.dtype, device=a.device) if need_a else None
            db = torch.empty(b.shape, dtype=b.dtype, device=b.device) if b is not None and need_b else None
        rows, cols = a.shape
        partials = []
        step = rows if spec.gate == IDENTITY and b is not None else _rows_per_chunk(rows, cols, a.device)
        for r0 in range(0, rows, step):
            sl = slice(r0, r0 + step)
            if spec.gate == IDENTITY and b is not None:  # Bilinear: two products straight into the outputs
                if da is not None:
                    torch.mul(dy[sl], b[sl], out=da[sl])
                if db is not None:
                    torch.mul(dy[sl], a[sl], out=db[sl])
                continue
            ac, dyc = _f32(a[sl]), _f32(dy[sl])
            w = dyc if b is None else torch.mul(dyc, b[sl])
            phi, dal = _backward_chunk(ac, w, spec, al, want_alpha, None if da is None else da[sl])
            if db is not None:
                torch.mul(dyc, phi, out=db[sl])
            if dal is not None:
                partials.append(dal)
        dalpha = None
        if want_alpha:
            dtype, shape = ctx.alpha_like
            dalpha = torch.stack(partials).sum().to(dtype).reshape(shape)
        if packed:
            return dx, None, dalpha, None, None
        return da, db, dalpha, None, None
