"""Property-based tests (hypothesis) of the public blocks: random valid sizes and input shapes
(with non-contiguous inputs) give the same output on the torch path and the Triton interpreter,
finite for finite input, with the expected shape and gradients; random invalid constructor
arguments and inputs raise ValueError or TypeError naming the argument."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatezoo.blocks import (
    GatedRMSNorm,
    GLUFeedForward,
    MixerBlock,
    MoEFeedForward,
    NiNBlock,
    ReLAAttention,
    RMSNorm,
    SoftmaxAttention,
)

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _input(g, b, t, d, strided):
    if strided:  # a view with a strided last dimension
        return torch.randn(b, t, 2 * d, generator=g)[..., ::2]
    return torch.randn(b, t, d, generator=g)


def _pair(make, x):
    """The block built twice from one seed, on each backend; outputs and input gradients."""
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        block = make(backend)
        xi = x.detach().clone().requires_grad_()
        y = block(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.square().mean().backward()
        outs.append((y.detach(), xi.grad))
    (y0, g0), (y1, g1) = outs
    assert y0.shape == y1.shape and torch.isfinite(y0).all() and torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y0, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(g1, g0, rtol=2e-3, atol=2e-3)
    return y0


BLOCKS = {
    "glu": lambda d, t, h, be: GLUFeedForward(d, h, kind="silu", backend=be),
    "xglu": lambda d, t, h, be: GLUFeedForward(d, h, kind="silu", expanded=True, backend=be),
    "rms": lambda d, t, h, be: RMSNorm(d, backend=be),
    "gated_rms": lambda d, t, h, be: GatedRMSNorm(d, backend=be),
    "rela": lambda d, t, h, be: ReLAAttention(d, 2 if d % 2 == 0 else 1, backend=be),
    "softmax": lambda d, t, h, be: SoftmaxAttention(d, 2 if d % 2 == 0 else 1),  # one (PyTorch) path
    "mixer": lambda d, t, h, be: MixerBlock(t, d, h, 2 * h, backend=be),
    "ninformer": lambda d, t, h, be: NiNBlock(t, d, h, 2 * h, backend=be),
    "moe": lambda d, t, h, be: MoEFeedForward(d, h, num_experts=4, k=2, backend=be),
}


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(BLOCKS)), b=st.integers(1, 3), t=st.integers(1, 7), d=st.integers(2, 12),
       h=st.integers(1, 10), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_blocks_agree_on_both_backends(name, b, t, d, h, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = _input(g, b, t, d, strided)
    y = _pair(lambda be: BLOCKS[name](d, t, h, be), x)
    assert y.shape == (b, t, d)


BAD_SIZES = st.sampled_from([0, -3, 2.0, "8", True, None])


def _raises_naming(fn, name):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    assert name in str(info.value), str(info.value)


@SETTINGS
@given(bad=BAD_SIZES, which=st.sampled_from(["in_features", "hidden_features", "num_experts", "k"]))
def test_moe_bad_sizes(bad, which):
    if bad is None and which in ("hidden_features", "k"):
        return  # None asks for the default
    args = {"in_features": 8, "hidden_features": 6, "num_experts": 4, "k": 2}
    args[which] = bad
    _raises_naming(lambda: MoEFeedForward(args.pop("in_features"), **args), which)


@SETTINGS
@given(bad=BAD_SIZES, which=st.sampled_from(["num_tokens", "dim", "tokens_hidden", "channels_hidden"]),
       block=st.sampled_from([MixerBlock, NiNBlock]))
def test_mixer_bad_sizes(bad, which, block):
    args = {"num_tokens": 4, "dim": 8, "tokens_hidden": 5, "channels_hidden": 6}
    args[which] = bad
    _raises_naming(lambda: block(**args), which)


@SETTINGS
@given(bad=BAD_SIZES, which=st.sampled_from(["dim", "heads"]), cls=st.sampled_from([ReLAAttention, SoftmaxAttention]))
def test_attention_bad_sizes(bad, which, cls):
    args = {"dim": 8, "heads": 2}
    args[which] = bad
    _raises_naming(lambda: cls(args["dim"], args["heads"]), which)


@SETTINGS
@given(name=st.sampled_from(sorted(BLOCKS)), width=st.integers(1, 12).filter(lambda w: w != 8),
       dtype=st.sampled_from([torch.int64, torch.bool, torch.float32]))
def test_blocks_refuse_wrong_inputs(name, width, dtype):
    block = BLOCKS[name](8, 4, 6, "torch")
    x = torch.ones(2, 4, width if dtype == torch.float32 else 8).to(dtype)
    with pytest.raises((ValueError, TypeError)) as info:
        block(x)
    message = str(info.value)
    assert any(word in message for word in ("x", "input", "features", "dim", "tokens", "dtype")), message
