"""SoftmaxAttention(impl="flash_attn" | "xformers") and the benchmark's peer columns.

Three groups of tests:

* argument handling, on any machine: a bad ``impl``, a CPU tensor, a missing package, and that
  importing gatezoo imports neither package (checked in a fresh interpreter);
* the glue, on any machine: stand-ins for ``flash_attn`` and ``xformers.ops`` that implement the
  documented contract of the calls gatezoo makes ((B, T, H, D) layout, grouped key/value heads for
  flash-attn, the bottom-right causal mask, the variable-length packing, xformers' bias classes
  and its 16-byte stride rule for bias tensors) in plain PyTorch, so the layouts, masks and
  packing gatezoo hands them are checked against the SDPA path on the CPU;
* the real packages, compared with SDPA, where CUDA is present and the package imports. The CI
  machines have no GPU, so there these skip with the reason.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.blocks import KVCache, SoftmaxAttention
from gatezoo.blocks import attention as attention_module
from gatezoo.eval import bench

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("flash_attn", "xformers")
PACKAGES = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}


# --- argument handling -----------------------------------------------------------------------


def test_default_impl_is_sdpa():
    m = SoftmaxAttention(8, 2)
    assert m.impl == "sdpa" and "impl" not in repr(m)
    assert "impl='xformers'" in repr(SoftmaxAttention(8, 2, impl="xformers"))


@pytest.mark.parametrize("bad, error", [("flash", ValueError), ("SDPA", ValueError), ("", ValueError),
                                        (None, TypeError), (1, TypeError)])
def test_bad_impl_names_the_argument(bad, error):
    with pytest.raises(error, match="impl"):
        SoftmaxAttention(8, 2, impl=bad)
    m = SoftmaxAttention(8, 2)
    with pytest.raises(error, match="impl"):
        m.impl = bad
    assert m.impl == "sdpa"  # a refused value leaves the module as it was


@pytest.mark.parametrize("impl", PEERS)
def test_peer_on_a_cpu_tensor_is_a_clear_error(impl):
    m = SoftmaxAttention(8, 2, impl=impl)
    with pytest.raises(ValueError, match=rf"impl='{impl}'.*CUDA.*x is on cpu.*impl='sdpa'"):
        m(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=rf"impl='{impl}'.*CUDA"):
        m(torch.randn(2, 3, 8), context=torch.randn(2, 4, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    # an empty input is no call to a kernel (docs/architecture.md, "Backend dispatch"): zeros, as for SDPA
    assert m(torch.randn(0, 3, 8)).shape == (0, 3, 8)


@pytest.mark.parametrize("impl", PEERS)
def test_missing_package_names_the_gpu_extra(impl, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGES[impl].split(".")[0], None)  # makes the import fail
    with pytest.raises(ImportError, match=r"gatezoo\[gpu\]"):
        attention_module._import_peer(impl)
    # through a forward whose input the device check lets pass
    monkeypatch.setattr(SoftmaxAttention, "_check_peer_input", lambda self, q, dtypes: None)
    with pytest.raises(ImportError, match=rf"impl='{impl}'.*gpu"):
        SoftmaxAttention(8, 2, impl=impl)(torch.randn(2, 3, 8))


def test_importing_gatezoo_imports_no_peer():
    code = (
        "import sys\n"
        "import gatezoo, gatezoo.blocks, gatezoo.models, gatezoo.eval.bench\n"
        "from gatezoo.blocks import SoftmaxAttention\n"
        "SoftmaxAttention(8, 2, impl='flash_attn'); SoftmaxAttention(8, 2, impl='xformers')\n"
        "print(gatezoo.__file__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'xformers')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert Path(out[0]).resolve() == ROOT / "gatezoo" / "__init__.py"
    assert out[1] == "[]"


def test_bench_leaves_the_peers_out_off_cuda_with_a_note():
    impls, notes = bench.attention_peers(torch.device("cpu"), torch.float16)
    assert impls == {} and len(notes) == 1 and "CUDA" in notes[0]
    assert not {"flash-attn-softmax", "xformers-softmax"} & set(bench.attention_impls(torch.device("cpu"), 32,
                                                                                      torch.float16))


# --- the glue, against stand-ins that follow the packages' documented contracts ----------------


def _reference(q, k, v, keep):
    """softmax(q k^T / sqrt(D)) v on (B, T, H, D) tensors with equal heads; ``keep`` (B or 1, 1,
    Tq, Tk) or None; a query with no kept key gets 0 (flash-attn's documented behaviour)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if keep is not None:
        seen = keep.any(-1, keepdim=True)
        s = s.masked_fill(~keep & seen, float("-inf"))  # rows with no key stay finite, then get 0
        p = s.softmax(-1) * seen
    else:
        p = s.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _causal_keep(tq, tk, bottom_right=True):
    return torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq if bottom_right else 0)[None, None]


def _fake_flash_attn():
    """``flash_attn_func`` and ``flash_attn_varlen_func`` as documented for flash-attn 2.x:
    (B, T, H, D) (packed (total, H, D) for varlen), K/V heads dividing the query heads (query
    head h reads h // (H / Hk)), causal aligned bottom-right, an all-masked row gives 0."""

    def check(q, k, v):
        assert q.dim() == k.dim() == v.dim() and q.shape[-1] == k.shape[-1] == v.shape[-1]
        assert q.shape[-2] % k.shape[-2] == 0 and k.shape == v.shape
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "flash-attn needs a unit stride on the head dim"

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        check(q, k, v)
        assert q.dim() == 4 and dropout_p == 0.0 and softmax_scale is None
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        return _reference(q, k, v, _causal_keep(q.shape[1], k.shape[1]) if causal else None)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        check(q, k, v)
        assert q.dim() == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q.shape == cu_seqlens_k.shape and int(cu_seqlens_k[-1]) == k.shape[0]
        lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
        assert int(lens_q.max()) == max_seqlen_q and int(lens_k.max()) == max_seqlen_k
        out = []
        for i in range(len(lens_q)):
            qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]
            if lens_k[i] == 0:
                out.append(torch.zeros_like(qi))
                continue
            ki, vi = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]], v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]
            out.append(flash_attn_func(qi[None], ki[None], vi[None], causal=causal)[0])
        return torch.cat(out)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                                 __version__="2.6.3")


def _fake_xformers_ops():
    """``memory_efficient_attention`` as documented: (B, T, H, D) with equal heads (the grouped
    layout is 5-D), ``LowerTriangularMask`` (top-left), ``LowerTriangularFromBottomRightMask``, or a
    bias tensor (B, H, Tq, Tk) of the query's dtype, added to the scores, whose strides but the last
    are multiples of 16 bytes. A row of -inf gives NaN, as a softmax does."""

    class LowerTriangularMask:
        pass

    class LowerTriangularFromBottomRightMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert query.dim() == key.dim() == value.dim() == 4 and p == 0.0 and scale is None
        assert query.shape[2] == key.shape[2] == value.shape[2], "4-D inputs need equal heads"
        tq, tk = query.shape[1], key.shape[1]
        s = torch.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5
        if isinstance(attn_bias, (LowerTriangularMask, LowerTriangularFromBottomRightMask)):
            keep = _causal_keep(tq, tk, bottom_right=isinstance(attn_bias, LowerTriangularFromBottomRightMask))
            s = s.masked_fill(~keep, float("-inf"))
        elif isinstance(attn_bias, torch.Tensor):
            assert attn_bias.dtype == query.dtype
            assert attn_bias.shape == (query.shape[0], query.shape[2], tq, tk)
            align = 128 // torch.finfo(attn_bias.dtype).bits
            assert all(st % align == 0 for st in attn_bias.stride()[:-1]), attn_bias.stride()
            s = s + attn_bias
        else:
            assert attn_bias is None
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), value)

    attn_bias = types.SimpleNamespace(LowerTriangularMask=LowerTriangularMask,
                                      LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask)
    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                 LowerTriangularMask=LowerTriangularMask,
                                 fmha=types.SimpleNamespace(attn_bias=attn_bias))


@pytest.fixture
def fake_peers(monkeypatch):
    """The stand-ins in place of the packages, and the CUDA/dtype check off (the stand-ins run on CPU)."""
    xformers_ops = _fake_xformers_ops()
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=xformers_ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", xformers_ops)
    monkeypatch.setattr(SoftmaxAttention, "_check_peer_input", lambda self, q, dtypes: None)


def _decode(m, x, **kw):
    """Six tokens at once, then three more against the cached keys (3 queries, 9 keys, causal)."""
    cache = KVCache()
    return torch.cat([m(x[:, :6], causal=True, cache=cache), m(x[:, 6:9], causal=True, cache=cache)], 1)


# name -> (kv_heads, call(module, x, ctx, mask)); x (2, 9, 24), ctx (2, 5, 24), mask over ctx
SCENARIOS = {
    "self": (4, lambda m, x, c, mask: m(x)),
    "self causal": (4, lambda m, x, c, mask: m(x, causal=True)),
    "self causal gqa": (2, lambda m, x, c, mask: m(x, causal=True)),
    "cross": (1, lambda m, x, c, mask: m(x, context=c)),
    "cross padding": (2, lambda m, x, c, mask: m(x, context=c, key_padding_mask=mask)),
    "cross causal, more queries than keys": (4, lambda m, x, c, mask: m(x, context=c, causal=True)),
    "cross causal, fewer queries than keys": (4, lambda m, x, c, mask: m(x[:, :3], context=c, causal=True)),
    "cached decoding": (2, lambda m, x, c, mask: _decode(m, x)),
    "self causal padding": (4, lambda m, x, c, mask: m(x[:, :5], causal=True, key_padding_mask=mask)),
}
FLASH_REFUSES = {"self causal padding"}


def _inputs(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=gen).to(device, dtype)
    ctx = torch.randn(2, 5, 24, generator=gen).to(device, dtype)
    # the second row keeps keys 0, 2 and 3 only: a hole in the middle, not just a padded tail
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]], device=device)
    return x, ctx, mask


def _compare(impl, scenario, device="cpu", dtype=torch.float32, mask_rows=None):
    kv_heads, call = SCENARIOS[scenario]
    torch.manual_seed(0)
    ref = SoftmaxAttention(24, 4, kv_heads=kv_heads).to(device, dtype)
    peer = copy.deepcopy(ref)
    peer.impl = impl
    x, ctx, mask = _inputs(device, dtype)
    if mask_rows is not None:
        mask = mask_rows.to(device)
    outs, grads = [], []
    for m in (ref, peer):
        xi = x.clone().requires_grad_()
        y = call(m, xi, ctx, mask)
        y.float().square().mean().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    tol = 1e-5 if dtype == torch.float32 and device == "cpu" else TOL[dtype]
    assert_close(f"{impl} {scenario} output", outs[0], outs[1], tol)
    for i, (g_ref, g_peer) in enumerate(zip(*grads)):
        assert_close(f"{impl} {scenario} gradient {i}", g_ref, g_peer, max(tol, 2 * TOL[dtype]))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("impl", PEERS)
def test_glue_matches_sdpa(fake_peers, impl, scenario):
    if impl == "flash_attn" and scenario in FLASH_REFUSES:
        kv_heads, call = SCENARIOS[scenario]
        x, ctx, mask = _inputs()
        with pytest.raises(ValueError, match="impl='flash_attn'.*key_padding_mask.*causal"):
            call(SoftmaxAttention(24, 4, kv_heads=kv_heads, impl=impl), x, ctx, mask)
        return
    _compare(impl, scenario)


@pytest.mark.parametrize("impl", PEERS)
def test_glue_row_with_every_key_padded_gets_zero(fake_peers, impl):
    _compare(impl, "cross padding", mask_rows=torch.tensor([[True, True, False, True, True], [False] * 5]))
    _compare(impl, "cross padding", mask_rows=torch.zeros(2, 5, dtype=torch.bool))
    m = SoftmaxAttention(24, 4, impl=impl)
    x, ctx, _ = _inputs()
    y = m(x, context=ctx, key_padding_mask=torch.tensor([[True] * 5, [False] * 5]))
    assert torch.equal(y[1], m.proj(torch.zeros(9, 24)))  # no key: attention output 0
    assert torch.isfinite(y).all()


def test_glue_old_flash_attn_refuses_bottom_right_causal(fake_peers):
    sys.modules["flash_attn"].__version__ = "2.0.9"  # top-left causal before 2.1
    m = SoftmaxAttention(24, 4, impl="flash_attn")
    x, ctx, _ = _inputs()
    with pytest.raises(ValueError, match=r"flash-attn >= 2\.1.*2\.0\.9"):
        m(x, context=ctx, causal=True)
    assert m(x, causal=True).shape == x.shape  # equal lengths: both alignments agree


# --- the real packages, where CUDA and the package are present ----------------------------------


def _skip_unless_available(impl):
    if not torch.cuda.is_available():
        pytest.skip(f"{impl} runs on CUDA only and this machine has no CUDA device (the CI machines have no GPU)")
    try:
        importlib.import_module(PACKAGES[impl])
    except (ImportError, OSError) as err:
        pytest.skip(f"{impl} does not import here ({err}); pip install 'gatezoo[gpu]'")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("impl", PEERS)
def test_real_peer_matches_sdpa_on_cuda(impl, scenario, dtype):
    _skip_unless_available(impl)
    if impl == "flash_attn" and (scenario in FLASH_REFUSES or dtype == torch.float32):
        pytest.skip("flash-attn refuses this call (tested by test_glue_matches_sdpa and test_real_flash_attn_refuses)")
    _compare(impl, scenario, "cuda", dtype)


def test_real_flash_attn_refuses_float32_on_cuda():
    _skip_unless_available("flash_attn")
    m = SoftmaxAttention(24, 4, impl="flash_attn").cuda()
    with pytest.raises(TypeError, match=r"impl='flash_attn'.*float16 or bfloat16.*autocast"):
        m(torch.randn(2, 9, 24, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the way out the message gives
        assert m(torch.randn(2, 9, 24, device="cuda")).dtype == torch.bfloat16


@pytest.mark.parametrize("impl", PEERS)
def test_real_peer_columns_in_the_benchmark(impl):
    _skip_unless_available(impl)
    name = {"flash_attn": "flash-attn-softmax", "xformers": "xformers-softmax"}[impl]
    impls, _ = bench.attention_peers(torch.device("cuda"), torch.float16)
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    assert_close(name, torch.nn.functional.scaled_dot_product_attention(q, k, v), impls[name](q, k, v),
                 TOL[torch.float16])
