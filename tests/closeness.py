"""One comparison helper for every kernel test (relative RMSE; NaN always fails)."""

import torch

# Tolerances (docs/architecture.md, 'Tests and benchmarks'): float32 <= 1e-4 relative, float16 /
# bfloat16 <= 1e-2, as ||out - ref|| / ||ref||.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert not torch.isnan(ref).any(), f"{name}: NaN in reference"
    err = rel_err(ref, out)
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"
