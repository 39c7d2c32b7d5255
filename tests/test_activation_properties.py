"""Property-based check: any shape, any layout, any kind and alpha, both backends."""

import pytest
import torch
from closeness import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from gatezoo.kernels import KINDS, glu_packed
from gatezoo.kernels.activation.naive import phi_composed


@st.composite
def packed_inputs(draw):
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    shape[-1] *= 2
    kind = draw(st.sampled_from(sorted(KINDS)))
    alpha = draw(st.none() | st.floats(-0.5, 1.5)) if KINDS[kind].takes_alpha else None
    transpose = draw(st.booleans()) and len(shape) >= 2
    seed = draw(st.integers(0, 2**16))
    return shape, kind, alpha, transpose, seed


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=40, deadline=None)
@given(case=packed_inputs())
def test_glu_packed_any_shape(backend, case):
    shape, kind, alpha, transpose, seed = case
    g = torch.Generator().manual_seed(seed)
    if transpose:  # last dim strided
        x64 = torch.randn(shape[:-2] + [shape[-1], shape[-2]], generator=g, dtype=torch.float64).transpose(-1, -2)
    else:
        x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x64.requires_grad_()
    h = shape[-1] // 2
    ref = phi_composed(x64[..., :h], KINDS[kind], alpha) * x64[..., h:]
    x = x64.detach().float().requires_grad_()
    y = glu_packed(x, kind, alpha, backend=backend)
    assert_close("y", ref, y, 1e-4)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (dx_ref,) = torch.autograd.grad(ref, x64, dy)
    (dx,) = torch.autograd.grad(y, x, dy.float())
    assert_close("dx", dx_ref, dx, 1e-4)
