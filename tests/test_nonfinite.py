"""Non-finite inputs: every path follows one rule (docs/architecture.md, 'Non-finite inputs').
NaN propagates to every output it feeds (a NaN query row gives a NaN output row, a NaN key
element NaN in every row that sees that key, a NaN logit NaN routing weights for its token).
The activation family and token mixing's GELU give the limits of their formulas at +-inf
(docs/activation.md, 'Special values'): the tests here compare them, forward and backward, with
a float64 table computed from Python's ``math`` module and written-out limits, never with
PyTorch's own kernels, whose special values differ between instruction sets."""

import math

import pytest
import torch

from gatezoo.kernels import (
    KINDS,
    gated_act,
    gated_rms_norm,
    glu,
    glu_packed,
    rela_attention,
    rms_norm,
    route,
    token_mixing,
)
from gatezoo.kernels.activation.naive import phi_defined
from gatezoo.kernels.mixing.naive import token_mixing_defined

# the Triton interpreter (numpy) warns about the NaN it is asked to make
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPECIALS = [float("nan"), float("inf"), -float("inf")]


def _same_special(a: torch.Tensor, b: torch.Tensor) -> None:
    """NaN where and only where the other is NaN, the same infinities, finite values close."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-5)


def _both(fn):
    return fn("torch"), fn("triton")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_glu_special_values_agree(kind):
    vals = torch.tensor(SPECIALS + [0.0, 1.5, -2.0])
    a = vals.repeat_interleave(len(vals)).view(1, -1)
    b = vals.repeat(len(vals)).view(1, -1)
    y_torch, y_triton = _both(lambda be: glu(a, b, kind, backend=be))
    _same_special(y_torch, y_triton)
    # NaN anywhere in a pair gives NaN
    assert torch.isnan(y_torch[torch.isnan(a) | torch.isnan(b)]).all()


@pytest.mark.parametrize("special", SPECIALS)
def test_norms_special_values_agree(special):
    x = torch.randn(3, 9)
    x[1, 4] = special
    w, g = torch.randn(9), torch.randn(9)
    _same_special(*_both(lambda be: rms_norm(x, w, backend=be)))
    _same_special(*_both(lambda be: gated_rms_norm(x, w, g, backend=be)))
    for y in (*_both(lambda be: rms_norm(x, w, backend=be)), *_both(lambda be: gated_rms_norm(x, w, g, backend=be))):
        assert torch.isfinite(y[[0, 2]]).all()  # other rows untouched
        if special != special:  # a NaN poisons its own row only
            assert torch.isnan(y[1]).all()
        else:  # rms(x) = inf: x / rms is inf / inf = NaN at the inf, finite / inf = 0 elsewhere
            assert torch.isnan(y[1, 4]) and torch.equal(y[1, torch.arange(9) != 4], torch.zeros(8))


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["q_row", "k_elem", "v_elem"])
def test_rela_special_values_agree(special, where):
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    if where == "q_row":
        q[0, 0, 1] = special
    elif where == "k_elem":
        k[0, 1, 2, 3] = special
    else:
        v[0, 0, 3, 5] = special
    y_torch, y_triton = _both(lambda be: rela_attention(q, k, v, backend=be))
    _same_special(y_torch, y_triton)
    if special != special and where == "q_row":
        assert torch.isnan(y_triton[0, 0, 1]).all() and torch.isfinite(y_triton[0, 1]).all()


def test_rela_nan_reaches_the_value_gradient_on_both_paths():
    q, k, v = (torch.randn(1, 1, 4, 8, requires_grad=True) for _ in range(3))
    grads = []
    for be in ("torch", "triton"):
        qq = q.detach().clone()
        qq[0, 0, 2, 1] = float("nan")
        qq.requires_grad_()
        vv = v.detach().clone().requires_grad_()
        rela_attention(qq, k, vv, backend=be).sum().backward()
        grads.append(vv.grad)
    _same_special(*grads)
    assert torch.isnan(grads[1]).any()


@pytest.mark.parametrize("special", SPECIALS)
def test_route_special_values_agree(special):
    logits = torch.randn(6, 5)
    logits[2, 1] = special
    r_torch, r_triton = _both(lambda be: route(logits, 2, backend=be))
    _same_special(r_torch.weights, r_triton.weights)
    assert ((r_triton.indices >= 0) & (r_triton.indices < 5)).all()  # valid expert ids whatever the input
    if special != special:
        assert torch.isnan(r_triton.weights[2]).all() and torch.isfinite(r_triton.weights[[0, 1, 3, 4, 5]]).all()
        assert torch.equal(r_torch.indices[2], r_triton.indices[2])  # NaN ranks first, as in torch.sort


@pytest.mark.parametrize("special", SPECIALS)
def test_token_mixing_special_values_agree(special):
    x = torch.randn(2, 5, 6)
    x[1, 3, 2] = special
    w1, b1, w2, b2 = torch.randn(7, 5), torch.randn(7), torch.randn(5, 7), torch.randn(5)
    _same_special(*_both(lambda be: token_mixing(x, w1, b1, w2, b2, backend=be)))


# --- the documented values (docs/activation.md, "Special values"), from the math --------------

INF, NAN = math.inf, math.nan
GATE = {"sigmoid": "sigmoid", "silu": "sigmoid", "arctan": "arctan", "atlu": "arctan", "normcdf": "normcdf",
        "gelu": "normcdf"}
ALPHAS = [None, 0.0, 0.3, -0.5, -1.0, -1.5]  # plain; alpha = 0 given; > 0; scale 0; the -1 edge; < -1
CASES = [(k, al) for k in sorted(KINDS) for al in (ALPHAS if KINDS[k].takes_alpha else [None])]
PATHS = ["torch", "triton", "naive"]  # naive: the composition torch.compile traces (phi_defined)

# (phi(+inf), phi(-inf), phi'(+inf), phi'(-inf)) of each kind with alpha = 0, written out
PLAIN_AT_INF = {
    "sigmoid": (1.0, 0.0, 0.0, 0.0),
    "arctan": (1.0, 0.0, 0.0, 0.0),
    "normcdf": (1.0, 0.0, 0.0, 0.0),
    "identity": (INF, -INF, 1.0, 1.0),
    "relu": (INF, 0.0, 1.0, 0.0),
    "silu": (INF, -0.0, 1.0, 0.0),
    "gelu": (INF, -0.0, 1.0, 0.0),
    "atlu": (INF, -1.0 / math.pi, 1.0, 0.0),
}


def _gate(name: str, x: float) -> float:
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    if name == "arctan":
        return math.atan(x) / math.pi + 0.5
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _gate_slope(name: str, x: float) -> float:
    if name == "sigmoid":
        g = _gate(name, x)
        return g * (1.0 - g)
    if name == "arctan":
        return 1.0 / (math.pi * (1.0 + x * x))
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def at_inf(kind: str, alpha) -> tuple:
    """(phi, phi', dphi/dalpha) at +inf and at -inf: six floats, the limits of the formula."""
    spec = KINDS[kind]
    al = 0.0 if alpha is None else alpha
    if not spec.takes_alpha or al == 0.0:
        phi_p, phi_n, d_p, d_n = PLAIN_AT_INF[kind]
    elif spec.order == 1:  # expand(g) -> 1 + alpha and -alpha, flat at both ends
        phi_p, phi_n, d_p, d_n = 1.0 + al, -al, 0.0, 0.0
    else:  # a expand(g) ~ (1 + alpha) a at +inf and -alpha a at -inf
        c_pos = 1.0 / math.pi if GATE[kind] == "arctan" else 0.0  # lim a (1 - g(a)), a -> +inf
        phi_p = INF if al > -1 else -INF if al < -1 else c_pos
        phi_n = INF if al > 0 else -INF
        d_p, d_n = 1.0 + al, -al
    if not spec.takes_alpha:
        t_p = t_n = 0.0
    elif spec.order == 1:  # dphi/dalpha = 2g - 1
        t_p, t_n = 1.0, -1.0
    else:  # a (2g - 1)
        t_p, t_n = INF, INF
    return phi_p, phi_n, d_p, d_n, t_p, t_n


def phi_ref(kind: str, alpha, x: float) -> float:
    """phi(x) in float64 from the math: the formula at finite x, the limit at +-inf, NaN at NaN."""
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return at_inf(kind, alpha)[0 if x > 0 else 1]
    spec, al = KINDS[kind], 0.0 if alpha is None else alpha
    if kind == "identity":
        return x
    if kind == "relu":
        return max(x, 0.0)
    e = (1.0 + 2.0 * al) * _gate(GATE[kind], x) - al
    return e if spec.order == 1 else x * e


def dphi_ref(kind: str, alpha, x: float) -> float:
    """phi'(x): the derivative at finite x, its limit at +-inf, NaN at NaN (but 1 for identity,
    whose slope does not depend on x at all)."""
    if kind == "identity":
        return 1.0
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return at_inf(kind, alpha)[2 if x > 0 else 3]
    spec, al = KINDS[kind], 0.0 if alpha is None else alpha
    if kind == "relu":
        return 1.0 if x > 0 else 0.0
    slope = (1.0 + 2.0 * al) * _gate_slope(GATE[kind], x)
    if spec.order == 1:
        return slope
    return (1.0 + 2.0 * al) * _gate(GATE[kind], x) - al + x * slope


def dalpha_ref(kind: str, x: float) -> float:
    """dphi/dalpha(x): 2g - 1 (order 1) or x (2g - 1) (order 2), the limit at +-inf, NaN at NaN."""
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return at_inf(kind, 0.3)[4 if x > 0 else 5]
    t = 2.0 * _gate(GATE[kind], x) - 1.0
    return t if KINDS[kind].order == 1 else x * t


def assert_table(name: str, got: torch.Tensor, expected, signed_zeros=None) -> None:
    """``got`` equals the float64 table ``expected``: NaN and +-inf exactly where it has them,
    finite values within float32 rounding, and the sign of every zero in ``signed_zeros`` (a
    bool mask of the elements whose zero the docs give a sign)."""
    exp = torch.tensor(expected, dtype=torch.float64).reshape(got.shape)
    got = got.detach().double()
    where = lambda m: m.nonzero().flatten().tolist()  # noqa: E731
    assert torch.equal(got.isnan(), exp.isnan()), f"{name}: NaN at {where(got.isnan())}, expected {where(exp.isnan())}"
    for sign in (1, -1):
        g, e = got == sign * INF, exp == sign * INF
        assert torch.equal(g, e), f"{name}: {sign:+d}inf at {where(g)}, expected {where(e)}"
    fin = exp.isfinite()
    torch.testing.assert_close(got[fin], exp[fin], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if signed_zeros is not None:
        m = signed_zeros.reshape(exp.shape) & (exp == 0)
        assert torch.equal(got[m].signbit(), exp[m].signbit()), f"{name}: signs of zeros {got[m]} vs {exp[m]}"


def _alpha(alpha):
    return None if alpha is None else torch.tensor(alpha, requires_grad=True)


def _glu_path(path, a, b, kind, al, packed=False):
    if path == "naive":
        return phi_defined(a, KINDS[kind], al) * b
    if packed:
        return glu_packed(torch.cat([a, b], -1), kind, al, backend=path)
    return glu(a, b, kind, al, backend=path)


SPECIAL_GRID = [NAN, INF, -INF, 0.0, 1.5, -2.0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[k if al is None else f"{k}-{al}" for k, al in CASES])
def test_glu_matches_the_documented_values(case, path):
    """phi(a) * b and its gradients for every pair (a, b) of specials and ordinary numbers:
    0 * inf and inf - inf give NaN as IEEE does, NaN anywhere gives NaN."""
    kind, alpha = case
    n = len(SPECIAL_GRID)
    a_vals = [x for x in SPECIAL_GRID for _ in range(n)]
    b_vals = SPECIAL_GRID * n
    dy = 0.75
    phi = [phi_ref(kind, alpha, x) for x in a_vals]
    y_exp = [p * y for p, y in zip(phi, b_vals)]
    da_exp = [dy * y * dphi_ref(kind, alpha, x) for x, y in zip(a_vals, b_vals)]
    db_exp = [dy * p for p in phi]
    signed = torch.tensor([math.isinf(x) for x in a_vals])  # the limits' zeros have a documented sign
    for packed in ([False, True] if path != "naive" else [False]):
        a = torch.tensor([a_vals], requires_grad=True)
        b = torch.tensor([b_vals], requires_grad=True)
        y = _glu_path(path, a, b, kind, _alpha(alpha), packed)
        da, db = torch.autograd.grad(y, [a, b], torch.full_like(y, dy))
        tag = f"{kind} alpha={alpha} {path}{' packed' if packed else ''}"
        assert_table(f"{tag}: y", y, y_exp, signed)
        assert_table(f"{tag}: da", da, da_exp)
        assert_table(f"{tag}: db", db, db_exp)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[k if al is None else f"{k}-{al}" for k, al in CASES])
def test_gated_act_matches_the_documented_values(case, path):
    """phi(x) and dy * phi'(x) with infinite and NaN upstream gradients too: the gradient is the
    IEEE product of dy with the slope (its limit at +-inf), so an infinite dy against a zero
    slope (ReLU at x <= 0, a flat gate at +-inf) gives NaN."""
    kind, alpha = case
    dys = [0.75, INF, -INF, NAN]
    x_vals = [x for x in SPECIAL_GRID for _ in dys]
    dy_vals = dys * len(SPECIAL_GRID)
    x = torch.tensor([x_vals], requires_grad=True)
    al = _alpha(alpha)
    y = phi_defined(x, KINDS[kind], al) if path == "naive" else gated_act(x, kind, al, backend=path)
    (dx,) = torch.autograd.grad(y, [x], torch.tensor([dy_vals]))
    tag = f"{kind} alpha={alpha} {path}"
    signed = torch.tensor([math.isinf(v) for v in x_vals])
    assert_table(f"{tag}: y", y, [phi_ref(kind, alpha, v) for v in x_vals], signed)
    assert_table(f"{tag}: dx", dx, [g * dphi_ref(kind, alpha, v) for v, g in zip(x_vals, dy_vals)])


EXPANDED = [(k, al) for k, al in CASES if al is not None]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", EXPANDED, ids=[f"{k}-{al}" for k, al in EXPANDED])
def test_alpha_gradient_at_special_values(case, path):
    """dL/dalpha = sum(dy * b * dphi/dalpha): +-1 (order 1) or +inf (order 2) at +-inf, NaN from
    NaN, and an infinite b times dphi/dalpha at finite a (NaN where that is 0, at a = 0)."""
    kind, alpha = case
    dy = 0.75
    for a_vals, b_vals in [([INF], [1.5]), ([-INF], [1.5]), ([NAN], [1.5]), ([INF, -INF], [-2.0, 0.5]),
                           ([0.0, 1.5, -2.0], [1.5, -2.0, 0.5]), ([1.5], [INF]), ([0.0], [INF])]:
        a, b, al = torch.tensor([a_vals]), torch.tensor([b_vals]), _alpha(alpha)
        y = _glu_path(path, a, b, kind, al)
        (dal,) = torch.autograd.grad(y, [al], torch.full_like(y, dy))
        expected = sum(dy * v * dalpha_ref(kind, x) for x, v in zip(a_vals, b_vals))
        assert_table(f"{kind} alpha={alpha} {path} a={a_vals} b={b_vals}: dalpha", dal, [expected])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha", [NAN, INF, -INF])
def test_non_finite_alpha_gives_nan(alpha, path):
    """A non-finite alpha makes every output NaN, the limits at +-inf included."""
    x = torch.tensor([SPECIAL_GRID])
    for kind, spec in KINDS.items():
        if spec.takes_alpha:
            al = torch.tensor(alpha)
            y = phi_defined(x, spec, al) if path == "naive" else gated_act(x, kind, al, backend=path)
            assert torch.isnan(y).all(), (kind, alpha, path, y)


# --- token mixing: GELU's limits through two matmuls -------------------------------------------


def _gelu_ref(v: float) -> float:
    return phi_ref("gelu", None, v)


def _gelu_slope_ref(v: float) -> float:
    return dphi_ref("gelu", None, v)


def _token_mixing_ref(x, w1, b1, w2, b2, dy: float):
    """Forward and gradients of token mixing for one batch element, in float64 Python
    arithmetic (IEEE: sums and products of infinities as the hardware forms them) with the
    documented GELU; x (N, C), w1 (Hd, N), b1 (Hd,), w2 (N, Hd), b2 (N,) as nested lists."""
    n, c, hd = len(x), len(x[0]), len(w1)
    a = [[sum(w1[h][k] * x[k][j] for k in range(n)) + b1[h] for j in range(c)] for h in range(hd)]
    hid = [[_gelu_ref(v) for v in row] for row in a]
    y = [[sum(w2[i][h] * hid[h][j] for h in range(hd)) + b2[i] for j in range(c)] for i in range(n)]
    dh = [[sum(w2[i][h] * dy for i in range(n)) for _ in range(c)] for h in range(hd)]
    da = [[dh[h][j] * _gelu_slope_ref(a[h][j]) for j in range(c)] for h in range(hd)]
    dx = [[sum(w1[h][k] * da[h][j] for h in range(hd)) for j in range(c)] for k in range(n)]
    dw1 = [[sum(da[h][j] * x[k][j] for j in range(c)) for k in range(n)] for h in range(hd)]
    db1 = [sum(da[h]) for h in range(hd)]
    dw2 = [[sum(dy * hid[h][j] for j in range(c)) for h in range(hd)] for _ in range(n)]
    db2 = [dy * c for _ in range(n)]
    return y, dx, dw1, db1, dw2, db2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_token_mixing_matches_the_documented_gelu(special, path):
    """An infinite token feature drives a whole column of the pre-activation to +-inf; GELU
    gives +inf and -0 there (slopes 1 and 0), so the outputs are the sums the math gives
    (+-inf, or NaN where +inf meets -inf), not NaN from the GELU itself."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 2, generator=g)
    x[0, 1, 0] = special
    w1, b1 = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    w2, b2 = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    w1[:, 1].abs_()[1:].neg_()  # +inf reaches hidden unit 0 only, -inf the other four (and vice versa)
    dy = 0.5
    ref = _token_mixing_ref(x[0].tolist(), w1.tolist(), b1.tolist(), w2.tolist(), b2.tolist(), dy)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    if path == "naive":
        y = token_mixing_defined(*leaves)
    else:
        y = token_mixing(*leaves, backend=path)
    grads = torch.autograd.grad(y, leaves, torch.full_like(y, dy))
    tag = f"token mixing {path} x={special}"
    assert_table(f"{tag}: y", y[0], ref[0])
    for name, got, exp in zip(["dx", "dw1", "db1", "dw2", "db2"], grads, ref[1:]):
        assert_table(f"{tag}: {name}", got[0] if name == "dx" else got, exp)
    if special == INF:  # one +inf hidden unit, four at GELU(-inf) = -0: every output is +-inf, not NaN
        assert torch.isinf(y[0, :, 0]).all()
