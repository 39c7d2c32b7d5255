"""Ahead-of-time compile report for every Triton kernel in gatezoo.

    python -m gatezoo.kernels.aot            # table for sm_90 and sm_80
    python -m gatezoo.kernels.aot --json     # the same rows as JSON

Triton's compiler and the ``ptxas`` it ships need no GPU, so this proves on any Linux machine
that each kernel builds for Hopper (sm_90a) and Ampere (sm_80), and reports per kernel and
target: registers, spill bytes (from ``ptxas -v``), static shared memory, whether 128-bit
global loads were emitted, and which tensor-core instruction appears in the SASS (HGMMA, the
Hopper warpgroup MMA, or HMMA). Matrix kernels must show HGMMA on sm_90 and HMMA on sm_80.
Kernel modules add their variants with :func:`gatezoo.kernels.kernel_specs.register`.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler); the command clears
it for its worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .kernel_specs import KernelSpec, register, registered_specs  # noqa: F401 (re-exported)

TARGETS = (90, 80)


def all_specs() -> list[KernelSpec]:
    """Every registered variant. Importing the kernel modules registers them; call this after
    TRITON_INTERPRET is cleared, since triton reads it when it is first imported."""
    import gatezoo.kernels.activation.triton  # noqa: F401
    import gatezoo.kernels.kan.triton  # noqa: F401
    import gatezoo.kernels.mixing.triton  # noqa: F401
    import gatezoo.kernels.norm.triton  # noqa: F401
    import gatezoo.kernels.rela.triton  # noqa: F401
    import gatezoo.kernels.routing.triton  # noqa: F401

    # The registry lives in kernel_specs, not here: under ``python -m`` this file runs as
    # ``__main__``, a second copy of the module, and a registry kept in it would stay empty.
    return registered_specs()


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: KernelSpec, cc: int) -> dict:
    """Compile one variant for compute capability ``cc``; return one report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = spec.fn.arg_names
    signature = {name: spec.signature.get(name, "constexpr") for name in arg_names}
    missing = [n for n in arg_names if n not in spec.signature and n not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: no type or constexpr value for {missing}")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(arg_names)
        if name in spec.signature
        and (spec.signature[name].startswith("*") or name not in spec.unaligned)
    }
    src = ASTSource(fn=spec.fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = kernel.asm["ptx"]
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        info = subprocess.run(
            [_bin("ptxas"), "-v", f"--gpu-name={arch}", ptx_path, "-o", cubin_path],
            capture_output=True, text=True, check=True,
        ).stderr
        sass = subprocess.run(
            [_bin("cuobjdump"), "--dump-sass", cubin_path], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    tc_kind = "HGMMA" if re.search(r"\bHGMMA\b", sass) else "HMMA" if re.search(r"\bHMMA\b", sass) else ""
    return {
        "kernel": spec.name,
        "target": f"sm_{cc}",
        "registers": regs,
        "spill_bytes": spills,
        "shared_bytes": int(kernel.metadata.shared),
        "ldg128": bool(re.search(r"LDG\.E\.(?:EL\.)?128", sass)),
        # the tensor-core instruction found: HGMMA (Hopper wgmma) or HMMA (Ampere-style mma)
        "tensor_cores": tc_kind,
        "matmul": spec.matmul,
    }


def _worker(job):
    index, cc = job
    spec = all_specs()[index]
    try:
        return compile_spec(spec, cc)
    except Exception as exc:  # reported as a failed row, not a crash of the whole table
        return {"kernel": spec.name, "target": f"sm_{cc}", "error": f"{type(exc).__name__}: {exc}"}


def report(targets=TARGETS, pattern: str | None = None, jobs: int | None = None) -> list[dict]:
    """Compile every registered variant (optionally only names matching ``pattern``)."""
    os.environ.pop("TRITON_INTERPRET", None)
    specs = all_specs()
    todo = [(i, cc) for i, s in enumerate(specs) if not pattern or re.search(pattern, s.name) for cc in targets]
    jobs = jobs or min(len(todo), os.cpu_count() or 1)
    if jobs <= 1:
        return [_worker(job) for job in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_worker, todo))


def _problems(row: dict) -> list[str]:
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill_bytes"]:
        out.append(f"{row['spill_bytes']} bytes spilled")
    if row["matmul"] and row["tensor_cores"] != ("HGMMA" if row["target"] == "sm_90" else "HMMA"):
        out.append("no HGMMA" if row["target"] == "sm_90" else "no tensor-core instructions")
    return out


def format_table(rows: list[dict]) -> str:
    """The report rows as an aligned text table with a status column."""
    head = ("kernel", "target", "regs", "spills", "smem", "ldg.128", "tensor cores", "status")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["kernel"], r["target"], "-", "-", "-", "-", "-", "FAIL " + r["error"][:60]))
            continue
        tc = r["tensor_cores"] or ("NO" if r["matmul"] else "n/a")
        status = "; ".join(_problems(r)) or "ok"
        lines.append((r["kernel"], r["target"], str(r["registers"]), str(r["spill_bytes"]),
                      str(r["shared_bytes"]), "yes" if r["ldg128"] else "no", tc, status))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatezoo.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--target", type=int, action="append", choices=TARGETS,
                        help="compute capability to build for (default: 90 and 80)")
    parser.add_argument("--kernel", help="regular expression selecting kernel names")
    parser.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    rows = report(tuple(args.target or TARGETS), args.kernel, args.jobs)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    bad = [r for r in rows if _problems(r)]
    if not args.json:
        print(f"\n{len(rows) - len(bad)}/{len(rows)} compiles ok (zero spills"
              f"{', tensor cores in matmul kernels' if any(r.get('matmul') for r in rows) else ''})")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
