"""ReLAAttention and SoftmaxAttention: shapes, masks, cross-attention and cached decoding."""

import pytest
import torch
from closeness import assert_close

from gatezoo.blocks import KVCache, ReLAAttention, SoftmaxAttention
from gatezoo.kernels import rela_attention

BLOCKS = {"rela": ReLAAttention, "softmax": SoftmaxAttention}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_self_and_cross_attention_shapes_and_gradients(name, kv_heads):
    m = BLOCKS[name](32, 4, kv_heads=kv_heads)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    y = m(x, causal=True) + m(x, context=ctx, key_padding_mask=mask)
    assert y.shape == (2, 7, 32) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", list(BLOCKS))
def test_fully_masked_query_gets_zero_attention(name):
    m = BLOCKS[name](16, 2)
    ctx = torch.randn(2, 4, 16)
    mask = torch.tensor([[True] * 4, [False] * 4])
    y = m(torch.randn(2, 3, 16), context=ctx, key_padding_mask=mask)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # no bias: zero attention -> zero output
    assert y[0].abs().sum() > 0


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_cached_decoding_equals_full_forward(name, kv_heads):
    torch.manual_seed(3)
    m = BLOCKS[name](24, 4, kv_heads=kv_heads).eval()
    x, ctx = torch.randn(2, 9, 24), torch.randn(2, 6, 24)
    ctx_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    full_self = m(x, causal=True)
    full_cross = m(x, context=ctx, key_padding_mask=ctx_mask)
    self_cache, cross_cache = KVCache(), KVCache()
    steps_self, steps_cross = [], []
    for t in range(x.shape[1]):
        steps_self.append(m(x[:, t : t + 1], causal=True, cache=self_cache))
        steps_cross.append(m(x[:, t : t + 1], context=ctx, key_padding_mask=ctx_mask, cache=cross_cache))
    assert len(self_cache) == 9 and len(cross_cache) == 6
    assert_close("self", full_self, torch.cat(steps_self, 1), 1e-5)
    assert_close("cross", full_cross, torch.cat(steps_cross, 1), 1e-5)


def test_rela_block_is_rela_then_norm_then_proj():
    m = ReLAAttention(16, 2, norm=None)
    x = torch.randn(1, 5, 16)
    q = m.q(x).view(1, 5, 2, 8).transpose(1, 2)
    k, v = m.kv(x).view(1, 5, 2, 2, 8).unbind(2)
    o = rela_attention(q, k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert_close("block", m.proj(o.transpose(1, 2).reshape(1, 5, 16)), m(x, causal=True), 1e-6)


@pytest.mark.parametrize("norm", ["gated_rms", "rms", "layer", None])
def test_rela_norm_choices(norm):
    m = ReLAAttention(16, 2, norm=norm)
    assert m(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    if norm == "gated_rms":
        bound = (3 / 16) ** 0.5
        assert torch.equal(m.norm.weight, torch.ones(16))
        assert m.norm.gate_weight.abs().max() <= bound and m.norm.gate_weight.std() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by heads"):
        ReLAAttention(10, 3)
    with pytest.raises(ValueError, match="must divide heads"):
        SoftmaxAttention(16, 4, kv_heads=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        ReLAAttention(16, 2, norm="batch")
    with pytest.raises(ValueError, match=r"\(batch, seq, dim\)"):
        ReLAAttention(16, 2)(torch.randn(3, 16))


def test_block_input_checks_and_cache_kind():
    m = SoftmaxAttention(16, 2)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="context must have shape"):
        m(x, context=torch.randn(3, 4, 16))
    with pytest.raises(TypeError, match="bool tensor"):
        m(x, context=torch.randn(2, 4, 16), key_padding_mask=torch.ones(2, 4))
    cache = KVCache()
    m(x[:, :1], context=torch.randn(2, 4, 16), cache=cache)
    with pytest.raises(ValueError, match="filled by cross-attention"):
        m(x[:, 1:2], cache=cache)


def test_rela_block_on_the_triton_backend_matches_torch():
    torch.manual_seed(5)
    a = ReLAAttention(32, 4, kv_heads=2, backend="torch")
    b = ReLAAttention(32, 4, kv_heads=2, backend="triton")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 19, 32)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 11:] = False
    assert_close("block", a(x, causal=True, key_padding_mask=mask), b(x, causal=True, key_padding_mask=mask), 1e-5)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_attn_dropout_in_training_only(name):
    """attn_dropout drops attention weights in training mode; in eval mode the block computes what
    the same block without it does. Training draws are repeatable under torch.manual_seed."""
    torch.manual_seed(0)
    m = BLOCKS[name](32, 4, kv_heads=2, attn_dropout=0.5)
    plain = BLOCKS[name](32, 4, kv_heads=2)
    plain.load_state_dict(m.state_dict())
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    calls = (lambda b: b(x, causal=True), lambda b: b(x, context=ctx, key_padding_mask=mask))
    m.eval()
    for call in calls:
        assert torch.equal(call(m), call(plain.eval()))
    m.train()
    for call in calls:
        torch.manual_seed(1)
        first = call(m)
        torch.manual_seed(1)
        assert torch.equal(first, call(m))
        assert not torch.allclose(first, call(m))  # a fresh draw
        assert not torch.allclose(first, call(plain.eval()))
        first.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_attn_dropout_reaches_the_attention(monkeypatch):
    """The rate goes to rela_attention's dropout_p (ReLA) and to SDPA's dropout_p (softmax) in
    training, 0 in eval."""
    import gatezoo.blocks.attention as attention_module
    import gatezoo.blocks.rela as rela_module

    seen = []

    def record(fn, key):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get(key, 0.0))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(rela_module, "rela_attention", record(rela_attention, "dropout_p"))
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        record(torch.nn.functional.scaled_dot_product_attention, "dropout_p"))
    x = torch.randn(1, 4, 16)
    for name in BLOCKS:
        m = BLOCKS[name](16, 2, attn_dropout=0.25)
        seen.clear()
        m(x)
        m.eval()(x)
        assert seen == [0.25, 0.0], name


def test_attn_dropout_reaches_flash_attn_and_xformers(monkeypatch):
    """The peer kernels get the rate through their own dropout arguments (flash-attn's
    dropout_p, xformers' p), in training only."""
    import sys
    import types

    seen = []

    def fa_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        seen.append(dropout_p)
        return torch.zeros_like(q)

    def fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        seen.append(dropout_p)
        return torch.zeros_like(q)

    def mea(query, key, value, attn_bias=None, p=0.0, scale=None):
        seen.append(p)
        return torch.zeros_like(query)

    xops = types.SimpleNamespace(memory_efficient_attention=mea, LowerTriangularMask=object)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_func=fa_func, flash_attn_varlen_func=fa_varlen, __version__="2.6.3"))
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=xops))
    monkeypatch.setitem(sys.modules, "xformers.ops", xops)
    monkeypatch.setattr(SoftmaxAttention, "_check_peer_input", lambda self, q, dtypes: None)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[True] * 4, [True, False, True, False]])
    for impl in ("flash_attn", "xformers"):
        m = SoftmaxAttention(16, 2, impl=impl, attn_dropout=0.2)
        seen.clear()
        m(x)
        m(x, context=ctx, key_padding_mask=mask)
        m.eval()
        m(x)
        m(x, context=ctx, key_padding_mask=mask)
        assert seen == [0.2, 0.2, 0.0, 0.0], impl


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("value, exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (True, TypeError)])
def test_bad_attn_dropout(name, value, exc):
    with pytest.raises(exc, match="attn_dropout"):
        BLOCKS[name](16, 2, attn_dropout=value)
