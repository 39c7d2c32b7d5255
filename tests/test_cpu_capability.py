"""The special-value tests pass whatever vector instructions PyTorch's CPU kernels use.

PyTorch picks its vectorised CPU kernels by ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``,
``avx512``), and ATen hands a contiguous float32 GELU to oneDNN, whose just-in-time kernels
ignore that variable and follow ``ONEDNN_MAX_CPU_ISA`` instead (GELU(+inf) is NaN from its AVX-512
kernel and +inf from its AVX2 one). Each test here re-runs the special-value tests in a
subprocess with both held to one level, the generic code or AVX2, so that one machine shows the
results do not depend on the instruction set; the ordinary run covers the host's own level. A
level the host cannot execute is skipped (asking for it would crash the subprocess).
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_nonfinite.py", "tests/test_activation_kernels.py::test_extreme_inputs"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
# ATEN_CPU_CAPABILITY -> (ONEDNN_MAX_CPU_ISA, what torch.backends.cpu.get_cpu_capability() then says)
LEVELS = {"default": ("SSE41", "DEFAULT"), "avx2": ("AVX2", "AVX2")}
RUNNER = ("import sys, pytest, torch; print('capability', torch.backends.cpu.get_cpu_capability(), flush=True); "
          "sys.exit(pytest.main(sys.argv[1:]))")


def _native_capability() -> str:
    """The level ATen picks on this host by itself."""
    if "ATEN_CPU_CAPABILITY" not in os.environ:
        return torch.backends.cpu.get_cpu_capability()
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_special_values_hold_at_every_instruction_set(level):
    onednn_isa, expect = LEVELS[level]
    if level == "avx2" and not (X86 and _native_capability() in ("AVX2", "AVX512")):
        pytest.skip("this CPU cannot run PyTorch's AVX2 kernels")
    env = dict(os.environ, TRITON_INTERPRET="1", ATEN_CPU_CAPABILITY=level)
    if X86:
        env["ONEDNN_MAX_CPU_ISA"] = onednn_isa
    proc = subprocess.run([sys.executable, "-c", RUNNER, "-q", "-p", "no:cacheprovider", *FILES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert f"capability {expect}" in proc.stdout, log[-3000:]
    assert proc.returncode == 0 and " passed" in proc.stdout and "failed" not in proc.stdout, log[-3000:]
