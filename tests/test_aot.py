"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 with zero register spills."""

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def aot_rows():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # its own session, so that a timeout kills the compile workers too (killing the parent alone
    # leaves a process pool's workers waiting for work forever)
    proc = subprocess.Popen([sys.executable, "-m", "gatezoo.kernels.aot", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("python -m gatezoo.kernels.aot took more than 900 s")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return json.loads(out)


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
    for prefix in ("kan_fwd", "kan_dx", "kan_dw"):  # the KAN layer's basis-on-the-fly matmuls
        assert any(r["kernel"].startswith(prefix) for r in matmul), prefix
    wrong = [(r["kernel"], r["target"], r["tensor_cores"]) for r in matmul
             if r["tensor_cores"] != ("HGMMA" if r["target"] == "sm_90" else "HMMA")]
    assert not wrong, wrong


def test_kernel_modules_register_without_the_report():
    """The Triton modules register their variants in kernel_specs, which imports no kernel
    module; the report only reads that registry."""
    pytest.importorskip("triton")
    import gatezoo.kernels.norm.triton  # noqa: F401
    from gatezoo.kernels.kernel_specs import registered_specs

    names = [spec.name for spec in registered_specs()]
    assert any(n.startswith("rms_norm_fwd") for n in names)
    assert len(names) == len(set(names))


def _kernel_imports() -> dict[str, set[str]]:
    """module -> the gatezoo.kernels modules it imports explicitly (function-level imports too;
    the implicit import of parent packages is not counted)."""
    root = Path(__file__).resolve().parents[1]
    files = {}
    for path in (root / "gatezoo" / "kernels").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for mod, (path, is_pkg) in files.items():
        package = mod if is_pkg else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in files else target)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def test_no_import_cycles_in_kernels():
    graph = _kernel_imports()
    assert "gatezoo.kernels.kernel_specs" in graph["gatezoo.kernels.norm.triton"]
    state = {}

    def visit(mod, path):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [mod, dep])
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
