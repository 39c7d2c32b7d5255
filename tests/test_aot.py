"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 with zero register spills."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def aot_rows():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gatezoo.kernels.aot", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_both_targets(aot_rows):
    errors = [r for r in aot_rows if "error" in r]
    assert not errors, errors
    by_kernel = {}
    for r in aot_rows:
        by_kernel.setdefault(r["kernel"], set()).add(r["target"])
    assert by_kernel and all(t == {"sm_90", "sm_80"} for t in by_kernel.values())
    for prefix in ("glu_fwd", "glu_bwd", "act_fwd", "act_bwd"):
        assert any(k.startswith(prefix) for k in by_kernel), prefix
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(k.endswith(f",{dtype}]") for k in by_kernel), dtype


def test_zero_spills_and_wide_loads(aot_rows):
    assert all(r["spill_bytes"] == 0 for r in aot_rows), [r for r in aot_rows if r["spill_bytes"]]
    # elementwise kernels on aligned rows must use 128-bit global loads
    assert all(r["ldg128"] for r in aot_rows if r["kernel"].startswith(("glu_", "act_"))), aot_rows


def test_matmul_kernels_use_tensor_cores(aot_rows):
    """Attention kernels must run their products on the tensor cores: the Hopper warpgroup MMA
    (HGMMA) on sm_90, HMMA on sm_80."""
    matmul = [r for r in aot_rows if r["matmul"]]
    assert any(r["kernel"].startswith("rela_fwd") for r in matmul)
    assert any(r["kernel"].startswith("rela_bwd_dkdv") for r in matmul)
    assert any(r["kernel"].startswith("rela_bwd_dq") for r in matmul)
    wrong = [(r["kernel"], r["target"], r["tensor_cores"]) for r in matmul
             if r["tensor_cores"] != ("HGMMA" if r["target"] == "sm_90" else "HMMA")]
    assert not wrong, wrong
