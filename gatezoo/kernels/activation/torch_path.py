"""The torch backend of the gated-activation / GLU family: memory-lean, chunked on CPU.

:class:`GatedActFunction` is one autograd node that saves only its inputs and recomputes the
gate in backward. It walks the rows in chunks small enough to stay in cache, so the several
elementwise passes of each formula read main memory once, and computes in float32 whatever the
input dtype (float64 stays float64). Every temporary lives in a few chunk-sized scratch buffers
reused from chunk to chunk: fresh allocations would be handed back to the OS and page-faulted in
again for every chunk, which costs more than the arithmetic. The readable composition it must
match is :func:`~.naive.phi_composed`.

At +-inf and NaN it gives the values of :func:`~.kinds.limits`, not whatever ATen's kernels give
there (that differs between machines). One sum over each chunk, while it is in cache, tells
whether the chunk holds a non-finite input; only such chunks are patched (:func:`pin_values_`,
:func:`pin_grads_`). Gradients are formed as ``w * phi'(a)`` with ``w`` the incoming gradient,
so that an infinite ``w`` gives +-inf, or NaN against a zero slope, exactly as that product does.
"""

from __future__ import annotations

import math

import torch

from ..backend import composed_grads
from ..scratch import Scratch
from .kinds import ARCTAN, IDENTITY, RELU, SIGMOID, ActKind, limits
from .packing import composed_rows, grad_buffers, input_grads, unpack

_INV_PI = 1.0 / math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)

# Elements per chunk on CPU: about 2 MiB of float32 per live tensor, so the handful of
# temporaries of one chunk stays in L2/L3 while the next is read from memory.
CPU_CHUNK_ELEMENTS = 1 << 19


# Order-2 kinds whose a * g(a) has a fused ATen kernel and backward (SiLU, GELU): much cheaper
# on CPU than composing sigmoid or erf with products.
_FUSED_ORDER2 = {
    "silu": (torch.ops.aten.silu.out, torch.ops.aten.silu_backward.grad_input),
    "gelu": (torch.ops.aten.gelu.out, torch.ops.aten.gelu_backward.grad_input),
}


# Plain activations that ATen already computes in one pass, in the input's own dtype: each chunk
# goes through the fused op (no float32 copy of the chunk), then is checked and patched in cache.
# Sigmoid's backward needs sigmoid(x) again, which the float32 chunk path recomputes.
_ONE_PASS_FORWARD = {
    "silu": torch.ops.aten.silu.out,
    "gelu": torch.ops.aten.gelu.out,
    "relu": lambda a, out: torch.clamp_min(a, 0.0, out=out),
    "sigmoid": lambda a, out: torch.sigmoid(a, out=out),
}
_ONE_PASS_BACKWARD = {
    "silu": torch.ops.aten.silu_backward.grad_input,
    "gelu": torch.ops.aten.gelu_backward.grad_input,
}


def has_nonfinite(t: torch.Tensor) -> bool:
    """True when ``t`` holds an inf or a NaN (or finite values whose float32 sum overflows,
    which only costs a needless patch): one reduction, cheap on a chunk that is in cache."""
    return not math.isfinite(float(t.sum(dtype=torch.float32)))


def pin_values_(a: torch.Tensor, out: torch.Tensor, at_pos, at_neg) -> torch.Tensor:
    """In place: ``out`` is ``at_pos`` where ``a`` is +inf, ``at_neg`` where it is -inf and NaN
    where it is NaN."""
    out.masked_fill_(a == math.inf, at_pos)
    out.masked_fill_(a == -math.inf, at_neg)
    return out.masked_fill_(torch.isnan(a), math.nan)


def pin_grads_(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, slope_pos, slope_neg) -> torch.Tensor:
    """In place: ``out`` is ``w * slope_pos`` where ``a`` is +inf, ``w * slope_neg`` where it is
    -inf (IEEE products: an infinite or NaN ``w`` against a zero slope gives NaN) and NaN where
    ``a`` is NaN."""
    for at, slope in ((math.inf, slope_pos), (-math.inf, slope_neg)):
        m = a == at
        out[m] = (w[m] * slope).to(out.dtype)
    return out.masked_fill_(torch.isnan(a), math.nan)


def _dalpha_at_specials(a: torch.Tensor, w: torch.Tensor, lim) -> torch.Tensor:
    """sum(w * dphi/dalpha) over the non-finite elements of ``a``, float64."""
    pos, neg = a == math.inf, a == -math.inf
    t = (w[pos].double() * lim.dalpha_pos).sum() + (w[neg].double() * lim.dalpha_neg).sum()
    return t + (math.nan if bool(torch.isnan(a).any()) else 0.0)


def _gate(a: torch.Tensor, gate: int, out: torch.Tensor) -> torch.Tensor:
    """g(a) into ``out``."""
    if gate == SIGMOID:
        return torch.sigmoid(a, out=out)
    if gate == ARCTAN:
        return torch.atan(a, out=out).mul_(_INV_PI).add_(0.5)
    # Phi(a) = (1 + erf(a / sqrt 2)) / 2: ATen's erf is vectorised, its ndtr is not
    torch.mul(a, _SQRT1_2, out=out)
    return torch.erf(out, out=out).mul_(0.5).add_(0.5)


def _times_gate_slope(x, a, g, gate: int, out: torch.Tensor) -> torch.Tensor:
    """x * g'(a) into ``out``, using g = g(a) where that is cheaper."""
    if gate == SIGMOID:
        return torch.ops.aten.sigmoid_backward.grad_input(x, g, grad_input=out)  # x g (1 - g)
    if gate == ARCTAN:  # g'(a) = 1 / (pi (1 + a^2))
        torch.mul(a, a, out=out).add_(1.0).mul_(math.pi)
        return torch.div(x, out, out=out)
    return torch.mul(a, a, out=out).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).mul_(x)  # x * normal pdf


def _phi_chunk(a, spec: ActKind, alpha: float | None, out: torch.Tensor) -> torch.Tensor:
    """phi(a) for one float32 chunk, into ``out``."""
    if spec.gate == IDENTITY:
        return out.copy_(a)
    if spec.gate == RELU:
        return torch.clamp_min(a, 0.0, out=out)
    if spec.name in _FUSED_ORDER2:
        p = _FUSED_ORDER2[spec.name][0](a, out=out)  # a g(a)
        if alpha is not None:  # a expand(g) = (1 + 2 alpha) a g - alpha a
            p.mul_(1.0 + 2.0 * alpha).sub_(a, alpha=alpha)
        return p
    g = _gate(a, spec.gate, out)
    if alpha is not None:
        g.mul_(1.0 + 2.0 * alpha).sub_(alpha)
    if spec.order == 2:
        g.mul_(a)
    return g


def _backward_chunk(a, w, spec: ActKind, alpha: float | None, want_alpha: bool, need_phi: bool, da_out, tmp):
    """One float32 chunk of the backward, with ``w`` the gradient reaching phi (dy, or dy * b for
    a GLU). Writes w * phi'(a) into ``da_out`` (when given) and returns (phi(a) when
    ``need_phi`` else None, sum(w * dphi/dalpha) as float64 when ``want_alpha`` else None).
    ``tmp(i)`` is the i-th scratch buffer shaped like the chunk. ``a`` is finite here (the caller
    patches the non-finite elements).
    """
    if spec.gate == IDENTITY:
        if da_out is not None:
            da_out.copy_(w)
        return a, None
    if spec.gate == RELU:
        if da_out is not None:
            # w * step(a), a product rather than threshold_backward's selection: an infinite or
            # NaN w at a <= 0 gives NaN here, as it does in the Triton kernel
            torch.mul(w, torch.gt(a, 0.0, out=tmp(2)), out=da_out)
        return (torch.clamp_min(a, 0.0, out=tmp(1)) if need_phi else None), None
    scale = 1.0 if alpha is None else 1.0 + 2.0 * alpha
    dalpha = None
    if spec.name in _FUSED_ORDER2:
        # phi = scale (a g) - alpha a, so phi' = scale (a g)' - alpha and dphi/dalpha = 2 a g - a
        act, act_backward = _FUSED_ORDER2[spec.name]
        p = act(a, out=tmp(1)) if need_phi or want_alpha else None
        if want_alpha:
            t = torch.sub(p, a, alpha=0.5, out=tmp(2))
            dalpha = 2.0 * torch.dot(w.reshape(-1), t.reshape(-1)).double()
        if da_out is not None:
            if alpha is None:
                act_backward(w, a, grad_input=da_out)
            else:
                # phi' first, then one product with w: scale (w (a g)') - alpha w would give
                # inf - inf for an infinite w where phi' itself is finite and non-zero
                ones = torch.ones((), dtype=a.dtype, device=a.device).expand(a.shape)
                d = act_backward(ones, a, grad_input=tmp(2)).mul_(scale).sub_(alpha)
                torch.mul(w, d, out=da_out)
        if p is not None and alpha is not None:
            p.mul_(scale).sub_(a, alpha=alpha)
        return p, dalpha
    # order 1: phi = expand(g),    phi' = scale g',                dphi/dalpha = 2g - 1
    # order 2: phi = a expand(g),  phi' = expand(g) + a scale g',  dphi/dalpha = a (2g - 1)
    g = _gate(a, spec.gate, tmp(1))
    if want_alpha:
        t = torch.mul(g, 2.0, out=tmp(2)).sub_(1.0)
        if spec.order == 2:
            t.mul_(a)
        dalpha = torch.dot(w.reshape(-1), t.reshape(-1)).double()
    if da_out is not None:
        if spec.order == 1:  # w g' scale, built in the output when the dtypes agree
            direct = da_out.dtype == a.dtype
            s = _times_gate_slope(w, a, g, spec.gate, da_out if direct else tmp(2))
        else:  # a g' scale now; expand(g) is added below, and only then is w multiplied in
            s = _times_gate_slope(a, a, g, spec.gate, tmp(2))
        if scale != 1.0:
            s.mul_(scale)
    e = g if alpha is None else g.mul_(scale).sub_(alpha)  # expand(g, alpha), in place
    if spec.order == 1:
        if da_out is not None and s is not da_out:
            da_out.copy_(s)
        return e, dalpha
    if da_out is not None:
        torch.mul(w, s.add_(e), out=da_out)
    return e.mul_(a), dalpha


def _blocks(rows: int, cols: int, device: torch.device):
    """Index of each block: whole rows up to CPU_CHUNK_ELEMENTS, and rows wider than that (a
    1-D input, say) cut into column pieces, so the scratch stays small."""
    if device.type != "cpu":  # on accelerators chunking only adds launches
        return [(slice(None), slice(None))]
    if cols <= CPU_CHUNK_ELEMENTS:
        step = CPU_CHUNK_ELEMENTS // max(cols, 1)
        return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    w = CPU_CHUNK_ELEMENTS
    return [(slice(r, r + 1), slice(c, c + w)) for r in range(rows) for c in range(0, cols, w)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_chunks(a, b, y, spec: ActKind, alpha: float | None, scratch: Scratch | None = None) -> None:
    """y = phi(a) [* b], chunk by chunk in the compute dtype (temporaries in ``scratch``, a
    :class:`~gatezoo.kernels.scratch.Scratch` of the compute dtype, or a fresh one), with the
    values of :func:`~.kinds.limits` at non-finite elements of ``a``."""
    cdt = _compute_dtype(a.dtype)
    tmp = scratch if scratch is not None else Scratch(cdt, a.device)
    lim = None
    for sl in _blocks(*a.shape, a.device):
        ac = a[sl] if a.dtype == cdt else tmp.like(0, a[sl]).copy_(a[sl])
        direct = b is None and y.dtype == cdt  # write phi straight into the output
        p = _phi_chunk(ac, spec, alpha, y[sl] if direct else tmp.like(1, ac))
        if spec.gate != IDENTITY and has_nonfinite(ac):
            lim = lim or limits(spec, alpha)
            pin_values_(ac, p, lim.phi_pos, lim.phi_neg)
        if b is not None:
            torch.mul(p, b[sl], out=y[sl])
        elif not direct:
            y[sl].copy_(p)


def _backward_chunks(a, b, dy, da, db, spec: ActKind, alpha: float | None, want_alpha: bool,
                     scratch: Scratch | None = None):
    """Writes dL/da into ``da`` and dL/db into ``db`` (either may be None), chunk by chunk;
    returns dL/dalpha as a float64 0-dim tensor when ``want_alpha``. Temporaries live in
    ``scratch`` (of the compute dtype) or a fresh one. A chunk with a non-finite element of ``a``
    is computed with 0 (and w = 0) in its place, then patched with the values of :func:`~.kinds.limits`."""
    cdt = _compute_dtype(a.dtype)
    scratch = scratch if scratch is not None else Scratch(cdt, a.device)
    partials = []
    lim = None
    for sl in _blocks(*a.shape, a.device):
        ac = a[sl] if a.dtype == cdt else scratch.like(4, a[sl]).copy_(a[sl])
        dyc = dy[sl] if dy.dtype == cdt else scratch.like(5, dy[sl]).copy_(dy[sl])
        w = dyc if b is None else torch.mul(dyc, b[sl], out=scratch.like(0, ac))
        special = spec.gate != IDENTITY and has_nonfinite(ac)
        a_in, w_in = ac, w
        if special:  # rare: fresh tensors are fine
            finite = torch.isfinite(ac)
            a_in, w_in = torch.where(finite, ac, 0.0), torch.where(finite, w, 0.0)
        phi, dal = _backward_chunk(a_in, w_in, spec, alpha, want_alpha, db is not None,
                                   None if da is None else da[sl], lambda i, like=ac: scratch.like(i, like))
        if special:
            lim = lim or limits(spec, alpha)
            if da is not None:
                pin_grads_(ac, w, da[sl], lim.slope_pos, lim.slope_neg)
            if phi is not None:
                pin_values_(ac, phi, lim.phi_pos, lim.phi_neg)
            if dal is not None:
                dal = dal + _dalpha_at_specials(ac, w, lim)
        if db is not None:
            torch.mul(dyc, phi, out=db[sl])
        if dal is not None:
            partials.append(dal)
    return torch.stack(partials).sum() if want_alpha else None


def _one_pass_forward(a, spec: ActKind) -> torch.Tensor:
    """phi(a) through the fused ATen op, chunk by chunk in a's dtype, patched at non-finite a."""
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    op, lim = _ONE_PASS_FORWARD[spec.name], None
    for sl in _blocks(*a.shape, a.device):
        op(a[sl], out=y[sl])
        if has_nonfinite(a[sl]):
            lim = lim or limits(spec, None)
            pin_values_(a[sl], y[sl], lim.phi_pos, lim.phi_neg)
    return y


def _one_pass_backward(dy, a, spec: ActKind) -> torch.Tensor:
    """dy * phi'(a) through the fused ATen backward, chunk by chunk, patched at non-finite a."""
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    op, lim = _ONE_PASS_BACKWARD[spec.name], None
    for sl in _blocks(*a.shape, a.device):
        op(dy[sl], a[sl], grad_input=da[sl])
        if has_nonfinite(a[sl]):
            lim = lim or limits(spec, None)
            pin_grads_(a[sl], dy[sl], da[sl], lim.slope_pos, lim.slope_neg)
    return da


class GatedActFunction(torch.autograd.Function):
    """phi(a) [* b] on 2-D row views, saving only the inputs.

    Arguments: ``a`` (R, N) or, when ``packed``, the packed input (R, 2N) whose halves are a and
    b; ``b`` (R, N) or None; ``alpha`` a 0-dim tensor or None; ``spec`` the table row.
    """

    @staticmethod
    def forward(ctx, a, b, alpha, spec: ActKind, packed: bool):
        x = a
        a, b = unpack(x, b, packed)
        al = None if alpha is None else float(alpha)
        if b is None and al is None and spec.name in _ONE_PASS_FORWARD:
            y = _one_pass_forward(a, spec)
        else:
            y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
            if spec.gate == IDENTITY and b is not None:  # Bilinear: one product, nothing to keep in cache
                torch.mul(a, b, out=y)
            else:
                _forward_chunks(a, b, y, spec, al)
        # alpha is kept as a number: backward needs its value, not the (tiny) tensor; the tensor
        # itself is only read again by a double backward
        ctx.spec, ctx.packed, ctx.alpha, ctx.alpha_tensor = spec, packed, al, alpha
        ctx.alpha_like = None if alpha is None else (alpha.dtype, alpha.shape)
        ctx.save_for_backward(x, None if packed else b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        spec, packed, al = ctx.spec, ctx.packed, ctx.alpha
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, composed_rows, (x, b, ctx.alpha_tensor, spec, packed), dy)
        want_alpha = al is not None and ctx.needs_input_grad[2]
        a, b = unpack(x, b, packed)
        dx, da, db = grad_buffers(x, b, packed, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dalpha = None
        if b is None and al is None and spec.name in _ONE_PASS_BACKWARD:
            da = _one_pass_backward(dy, a, spec) if da is not None else None
        elif spec.gate == IDENTITY and b is not None:  # Bilinear: two products straight into the outputs
            if da is not None:
                torch.mul(dy, b, out=da)
            if db is not None:
                torch.mul(dy, a, out=db)
        else:
            dalpha = _backward_chunks(a, b, dy, da, db, spec, al, want_alpha)
        if dalpha is not None:
            dtype, shape = ctx.alpha_like
            dalpha = dalpha.to(dtype).reshape(shape)
        return input_grads(packed, dx, da, db, dalpha)
