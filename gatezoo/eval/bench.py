"""Kernel microbenchmarks: gatezoo ops against their peers, forward and forward+backward.

    python -m gatezoo.eval.bench --op glu           # every GLU kind, 4096 x 4096 fp32 halves
    python -m gatezoo.eval.bench --op gated_act     # the activations on a 4096 x 4096 tensor
    python -m gatezoo.eval.bench --op glu --kinds silu gelu --size 2048 --reps 20
    python -m gatezoo.eval.bench --op attention     # ReLA vs SDPA softmax, T = 256 ... 4096
    python -m gatezoo.eval.bench --op attention --dtype bfloat16  # + flash-attn, xformers on CUDA
    python -m gatezoo.eval.bench --op token_mixing  # MLP-Mixer token mixing at two model shapes
    python -m gatezoo.eval.bench --op moe           # top-2 MoE vs dense GLU vs a per-expert loop, E = 8, 64
    python -m gatezoo.eval.bench --op kan           # one KAN layer vs the efficient-KAN / FastKAN formulations
    python -m gatezoo.eval.bench --op dropout       # dropout p=0.1 on a 4096 x 4096 tensor vs F.dropout

For each variant (plain, and expanded with a trainable alpha where the kind has a gate) it times
the eager PyTorch composition, ``torch.compile`` of that composition, gatezoo's torch path and,
on CUDA, gatezoo's Triton path. Each row holds the median (and p20/p80) time, the achieved GB/s
counting the bytes an ideal fused kernel must move, the ratio to eager (the median over the
rounds of the time over eager's time in the same round), and the bytes autograd saves for
backward (unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``).
Rows go to ``benchmarks/<op>-<device>.csv`` and a plot to ``benchmarks/<op>-<device>.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gatezoo.kernels import KINDS, dropout, gated_act, glu, rela_attention, token_mixing
from gatezoo.kernels.activation.naive import phi_composed
from gatezoo.kernels.mixing import token_mixing_composed
from gatezoo.kernels.rela.naive import rela_composed

from .bench_kan import bench_kan, kan_summary
from .bench_moe import bench_moe, moe_summary, plot_moe
from .benchcore import (  # noqa: F401  (re-exported: the benchmark's public helpers live here too)
    Row,
    Timing,
    _add_impl,
    _sync,
    device_name,
    modes,
    paired_ratio,
    saved_bytes,
    time_interleaved,
    write_csv,
)
from .plots import pyplot

OPS = ("glu", "gated_act", "attention", "token_mixing", "moe", "kan", "dropout")
DROPOUT_P = 0.1
# token mixing shapes (batch, tokens, channels, hidden): mixer_tiny on 28x28 images with
# patch 4, and Mixer-B/16 on 224x224 images
MIXING_SHAPES = {"mixer_tiny-28": (128, 49, 128, 64), "mixer_b16-224": (32, 196, 768, 384)}


def variants(op: str, kinds):
    """(variant name, kind, uses alpha) for the kinds asked for (one ``p=0.1`` variant for dropout)."""
    if op == "dropout":
        yield f"p={DROPOUT_P}", None, False
        return
    for kind in kinds:
        spec = KINDS[kind]
        yield kind, kind, False
        if spec.takes_alpha:
            yield "x" + kind, kind, True


def make_impls(op: str, kind: str, device: torch.device, use_compile: bool) -> dict:
    """{impl name: callable} for one kind: eager composition, its torch.compile, gatezoo paths
    (for dropout: ``F.dropout``, its torch.compile and :func:`gatezoo.kernels.dropout`)."""
    if op == "dropout":
        def eager(a):
            return F.dropout(a, DROPOUT_P)

        def ours(backend):  # one path: PyTorch's own dropout on CUDA
            return lambda a: dropout(a, DROPOUT_P)
    elif op == "glu":
        spec = KINDS[kind]

        def eager(a, b, alpha=None):
            return phi_composed(a, spec, alpha) * b

        def ours(backend):
            return lambda a, b, alpha=None: glu(a, b, kind, alpha, backend=backend)
    else:
        spec = KINDS[kind]

        def eager(a, alpha=None):
            return phi_composed(a, spec, alpha)

        def ours(backend):
            return lambda a, alpha=None: gated_act(a, kind, alpha, backend=backend)

    impls = {"eager": eager}
    if use_compile:
        # every variant recompiles the same code object; start each from a clean cache so
        # dynamo's recompile limit never silently drops a variant back to eager
        torch._dynamo.reset()
        impls["compile"] = torch.compile(eager, dynamic=False)
    impls["gatezoo-torch"] = ours("torch")
    if device.type == "cuda" and op != "dropout":
        impls["gatezoo-triton"] = ours("triton")
    return impls


def bench_op(op: str, kinds, size: int, dtype: torch.dtype, device: torch.device, reps: int,
             use_compile: bool = True, progress: bool = True) -> list[Row]:
    """Time every variant of ``op`` (``"glu"``, ``"gated_act"`` or ``"dropout"``) on size x size inputs."""
    rows_out: list[Row] = []
    machine = device_name(device)
    numel = size * size
    elem = torch.finfo(dtype).bits // 8
    n_in = 2 if op == "glu" else 1
    # ideal traffic: forward reads the inputs and writes y; backward reads dy and the inputs
    # and writes one gradient per input
    ideal = {"fwd": (n_in + 1) * numel * elem, "fwd+bwd": (n_in + 1 + 1 + 2 * n_in) * numel * elem}
    todo = list(variants(op, kinds))
    bar = tqdm(todo, desc=f"bench {op}", disable=not progress, file=sys.stderr)
    for name, kind, with_alpha in bar:
        bar.set_postfix_str(name)
        gen = torch.Generator(device="cpu").manual_seed(0)
        base = [torch.randn(size, size, generator=gen, dtype=torch.float32).to(device, dtype) for _ in range(n_in)]
        dy = torch.randn(size, size, generator=gen, dtype=torch.float32).to(device, dtype)
        alpha = torch.tensor(0.1, device=device, requires_grad=True) if with_alpha else None
        results, calls, saved = {}, {}, {}
        for impl, fn in make_impls(op, kind, device, use_compile).items():
            leaf = [t.detach().clone().requires_grad_() for t in base]
            _add_impl(calls, saved, impl, fn, leaf + ([alpha] if with_alpha else []), dy, name)
        for mode in ("fwd", "fwd+bwd"):
            timed = time_interleaved({impl: c[mode] for impl, c in calls.items()}, device, reps)
            for impl, tm in timed.items():
                results[(impl, mode)] = (tm, paired_ratio(tm, timed["eager"]), saved[impl])
        del calls
        for (impl, mode), (tm, ratio, saved) in results.items():
            eager_saved = results[("eager", mode)][2]
            rows_out.append(Row(
                op, name, impl, mode, f"{size}x{size}", str(dtype).replace("torch.", ""), machine,
                round(tm.median, 3), round(tm.p20, 3), round(tm.p80, 3), round(ideal[mode] / tm.median / 1e6, 2),
                round(ratio, 3), saved, round(saved / eager_saved, 3) if eager_saved else float("nan"),
            ))
    return rows_out


GEMM_N = 2048  # size of the square matmul that stands for the machine's GEMM rate
GEMM_IMPL = f"matmul-{GEMM_N}"


def gemm_call(device: torch.device, dtype: torch.dtype):
    """A call of one GEMM_N-cubed matmul (2 GEMM_N^3 FLOPs): the machine's GEMM rate (sgemm in
    float32)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    a, b = (torch.randn(GEMM_N, GEMM_N, generator=gen).to(device, dtype) for _ in range(2))
    return lambda: a @ b


def attention_peers(device: torch.device, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """The softmax kernels of flash-attn and xformers (the ``gpu`` extra) that run here, as
    ``{impl: fn(q, k, v)}`` on (B, H, T, D) tensors like SDPA's, and one note per peer left out
    (not on CUDA, a dtype it does not take, not installed). Both packages take (B, T, H, D), so
    they get transposed views, no copies."""
    if device.type != "cuda":
        return {}, ["flash-attn and xformers columns left out: they run on CUDA only"]
    impls, notes = {}, []
    flip = lambda *ts: (t.transpose(1, 2) for t in ts)
    if dtype not in (torch.float16, torch.bfloat16):
        notes.append(f"flash-attn column left out: it takes float16 or bfloat16, not {str(dtype)[6:]} (--dtype)")
    else:
        try:
            import flash_attn
        except (ImportError, OSError) as err:
            notes.append(f"flash-attn column left out: it does not import ({err}); pip install 'gatezoo[gpu]'")
        else:
            impls["flash-attn-softmax"] = lambda q, k, v: flash_attn.flash_attn_func(*flip(q, k, v)).transpose(1, 2)
    try:
        import xformers.ops as xops
    except (ImportError, OSError) as err:
        notes.append(f"xformers column left out: it does not import ({err}); pip install 'gatezoo[gpu]'")
    else:
        impls["xformers-softmax"] = lambda q, k, v: xops.memory_efficient_attention(*flip(q, k, v)).transpose(1, 2)
    return impls, notes


def attention_impls(device: torch.device, t: int, dtype: torch.dtype | None = None) -> dict:
    """{impl: fn(q, k, v)} for the attention benchmark at sequence length t; with ``dtype``, also
    the flash-attn and xformers softmax kernels where they run (:func:`attention_peers`)."""
    impls = {"sdpa-softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    if dtype is not None:
        impls.update(attention_peers(device, dtype)[0])
    if t <= 2048:  # the naive composition holds several T x T tensors: 2 GiB each at T=4096
        impls["rela-naive"] = lambda q, k, v: rela_composed(q, k, v)
    impls["gatezoo-torch"] = lambda q, k, v: rela_attention(q, k, v, backend="torch")
    if device.type == "cuda":
        impls["gatezoo-triton"] = lambda q, k, v: rela_attention(q, k, v, backend="triton")
    return impls


def bench_attention(seqs, batch: int, heads: int, head_dim: int, dtype, device, reps: int,
                    progress: bool = True) -> list[Row]:
    """ReLA against softmax SDPA (and, on CUDA where they import, the softmax kernels of
    flash-attn and xformers) and the naive composition, for each sequence length in ``seqs``.
    Ratios are to SDPA (column ``ratio_vs_eager``); GFLOP/s count the matmuls (4 B H T^2 D
    forward, 14 B H T^2 D forward+backward). The forward rounds also time one ``GEMM_N``-cubed
    matmul (impl ``GEMM_IMPL``), so the forward's share of the machine's GEMM rate compares
    figures taken at the same moment of a shared machine."""
    out: list[Row] = []
    machine = device_name(device)
    for t in tqdm(seqs, desc="bench attention", disable=not progress, file=sys.stderr):
        gen = torch.Generator(device="cpu").manual_seed(0)
        base = [torch.randn(batch, heads, t, head_dim, generator=gen).to(device, dtype) for _ in range(3)]
        do = torch.randn(batch, heads, t, head_dim, generator=gen).to(device, dtype)
        n_reps = max(3, min(reps, int(reps * (1024 / t) ** 2)))
        flops = {"fwd": 4 * batch * heads * t * t * head_dim, "fwd+bwd": 14 * batch * heads * t * t * head_dim}
        calls, saved = {}, {}
        for impl, fn in attention_impls(device, t, dtype).items():
            leaf = [x.detach().clone().requires_grad_() for x in base]

            saved[impl] = saved_bytes(fn, leaf)
            calls[impl] = modes(fn, leaf, do)
        qkvo = 4 * base[0].numel() * base[0].element_size()
        for mode in ("fwd", "fwd+bwd"):
            fns = {impl: c[mode] for impl, c in calls.items()}
            if mode == "fwd":  # the GEMM rate the forward is judged against, timed in the same rounds
                fns[GEMM_IMPL] = gemm_call(device, dtype)
            timed = time_interleaved(fns, device, n_reps, warmup=1)
            for impl, tm in timed.items():
                gemm, med = impl == GEMM_IMPL, tm.median
                out.append(Row(
                    "attention", f"T{t}", impl, mode, f"B{batch}-H{heads}-T{t}-D{head_dim}",
                    str(dtype).replace("torch.", ""), machine, round(med, 3), round(tm.p20, 3), round(tm.p80, 3),
                    float("nan"), round(paired_ratio(tm, timed["sdpa-softmax"]), 4), 0 if gemm else saved[impl],
                    float("nan") if gemm else round(saved[impl] / qkvo, 3),
                    float(f"{(2 * GEMM_N**3 if gemm else flops[mode]) / med / 1e6:.4g}"),
                ))
        del calls
    return out


def forward_vs_gemm(rows: list[Row], ours: str) -> list[str]:
    """For each T: the forward's GFLOP/s as a share of the matmul rate timed in the same rounds.

    The share comes from the two rows' ratios to SDPA, each a median of per-round ratios, so the
    machine's drift between rounds cancels: share = (forward FLOPs / matmul FLOPs) x
    (matmul time / SDPA time) / (forward time / SDPA time)."""
    fwd = {(r.variant, r.impl): r for r in rows if r.mode == "fwd"}
    lines = []
    for (variant, impl), r in fwd.items():
        gemm = fwd.get((variant, GEMM_IMPL))
        if impl == ours and gemm is not None:
            flops = r.gflops * r.median_ms / (gemm.gflops * gemm.median_ms)  # forward FLOPs / matmul FLOPs
            share = 100 * flops * gemm.ratio_vs_eager / r.ratio_vs_eager
            lines.append(f"ReLA forward at T={variant[1:]}: {r.gflops:.1f} GFLOP/s, {share:.0f}% of the rate of a "
                         f"{GEMM_N}^3 {r.dtype} matmul timed in the same rounds ({gemm.gflops:.1f} GFLOP/s; "
                         f"median of per-round ratios)")
    return lines


def mixing_impls(device: torch.device, use_compile: bool) -> dict:
    """{impl: fn(x, w1, b1, w2, b2, residual)} for the token-mixing benchmark."""
    impls = {"eager": lambda *a: token_mixing_composed(*a)}
    if use_compile:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(token_mixing_composed, dynamic=False)
    impls["gatezoo-torch"] = lambda x, w1, b1, w2, b2, r: token_mixing(x, w1, b1, w2, b2, residual=r,
                                                                          backend="torch")
    if device.type == "cuda":
        impls["gatezoo-triton"] = lambda x, w1, b1, w2, b2, r: token_mixing(x, w1, b1, w2, b2, residual=r,
                                                                               backend="triton")
    return impls


def bench_mixing(dtype, device, reps: int, use_compile: bool = True, progress: bool = True,
                 shapes: dict | None = None) -> list[Row]:
    """``u + W2 GELU(W1 LN(u)) + b2`` along the tokens (the LayerNorm left out) at ``shapes``
    ({name: (batch, tokens, channels, hidden)}, default :data:`MIXING_SHAPES`), against the
    eager composition and its ``torch.compile``. GFLOP/s count the two matmuls (4 B N Hd C
    forward, 12 B N Hd C forward+backward)."""
    out: list[Row] = []
    machine = device_name(device)
    for name, (b, n, c, hd) in tqdm((shapes or MIXING_SHAPES).items(), desc="bench token_mixing", disable=not progress,
                                    file=sys.stderr):
        gen = torch.Generator(device="cpu").manual_seed(0)
        rnd = lambda *shape, s=1.0, g=gen: (torch.randn(*shape, generator=g) * s).to(device, dtype)
        base = [rnd(b, n, c), rnd(hd, n, s=n**-0.5), rnd(hd), rnd(n, hd, s=hd**-0.5), rnd(n), rnd(b, n, c)]
        dy = rnd(b, n, c)
        flops = {"fwd": 4 * b * n * hd * c, "fwd+bwd": 12 * b * n * hd * c}
        calls, saved = {}, {}
        for impl, fn in mixing_impls(device, use_compile).items():
            _add_impl(calls, saved, impl, fn, [t.detach().clone().requires_grad_() for t in base], dy, name)
        for mode in ("fwd", "fwd+bwd"):
            timed = time_interleaved({impl: cl[mode] for impl, cl in calls.items()}, device, reps)
            for impl, tm in timed.items():
                med = tm.median
                out.append(Row(
                    "token_mixing", name, impl, mode, f"B{b}-N{n}-C{c}-H{hd}", str(dtype).replace("torch.", ""),
                    machine, round(med, 3), round(tm.p20, 3), round(tm.p80, 3), float("nan"),
                    round(paired_ratio(tm, timed["eager"]), 3),
                    saved[impl], round(saved[impl] / saved["eager"], 3), float(f"{flops[mode] / med / 1e6:.4g}"),
                ))
        del calls
    return out


def plot_attention(rows: list[Row], path: str) -> None:
    """Forward+backward time and saved bytes against sequence length, one line per impl."""
    plt = pyplot()

    rows = [r for r in rows if r.mode == "fwd+bwd"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r.impl for r in rows):
        pts = [(int(r.variant[1:]), r) for r in rows if r.impl == impl]
        axes[0].plot([t for t, _ in pts], [r.median_ms for _, r in pts], marker="o", label=impl)
        axes[1].plot([t for t, _ in pts], [r.saved_bytes / 2**20 for _, r in pts], marker="o", label=impl)
    for ax, label in zip(axes, ("forward+backward median (ms)", "saved for backward (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    b, h, _, d = rows[0].shape.split("-")
    fig.suptitle(f"attention {b} {h} {d}, T swept, {rows[0].dtype} on {rows[0].device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[Row], path: str) -> None:
    """Two panels: forward+backward median time and saved bytes, one bar group per variant."""
    plt = pyplot()

    rows = [r for r in rows if r.mode == "fwd+bwd"]
    names = list(dict.fromkeys(r.variant for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.9), 8), sharex=True)
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        by = {r.variant: r for r in rows if r.impl == impl}
        xs = [i + j * width for i in range(len(names))]
        axes[0].bar(xs, [by[n].median_ms if n in by else 0 for n in names], width, label=impl)
        axes[1].bar(xs, [by[n].saved_bytes / 2**20 if n in by else 0 for n in names], width, label=impl)
    axes[0].set_ylabel("forward+backward median (ms)")
    axes[1].set_ylabel("saved for backward (MiB)")
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
    r0 = rows[0]
    axes[0].set_title(f"{r0.op}: {r0.shape} {r0.dtype} on {r0.device}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ours_name(device: torch.device) -> str:
    """The gatezoo implementation the goals are stated for on this device."""
    return "gatezoo-triton" if device.type == "cuda" else "gatezoo-torch"


def format_rows(rows: list[Row], attention: bool = False) -> str:
    """A plain-text table of every row, for the terminal."""
    if attention:
        head = ("T", "impl", "mode", "median ms", "p20-p80", "GFLOP/s", "x SDPA", "saved MiB", "saved x qkvo")
        rate = [f"{r.gflops:.1f}" for r in rows]
    elif all(math.isnan(r.gbps) for r in rows):  # matmul ops (token_mixing): a FLOP rate, no byte rate
        head = ("variant", "impl", "mode", "median ms", "p20-p80", "GFLOP/s", "x eager", "saved MiB", "saved x eager")
        rate = [f"{r.gflops:.1f}" for r in rows]
    else:
        head = ("variant", "impl", "mode", "median ms", "p20-p80", "GB/s", "x eager", "saved MiB", "saved x eager")
        rate = [f"{r.gbps:.1f}" for r in rows]
    body = [(r.variant, r.impl, r.mode, f"{r.median_ms:.2f}", f"{r.p20_ms:.1f}-{r.p80_ms:.1f}", g,
             f"{r.ratio_vs_eager:.2f}", f"{r.saved_bytes / 2**20:.0f}", f"{r.saved_vs_eager:.2f}")
            for r, g in zip(rows, rate)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def read_csv(path: str) -> list[Row]:
    """Rows of a CSV written by :func:`write_csv`."""
    types = {name: f.type for name, f in Row.__dataclass_fields__.items()}
    conv = {"float": float, "int": int, "str": str}
    with open(path, newline="") as f:
        return [Row(**{k: conv[types[k]](v) for k, v in r.items()}) for r in csv.DictReader(f)]


def markdown_summary(rows: list[Row]) -> str:
    """Forward+backward table, one line per variant: each impl's median and the ratios that the
    goals are stated in (time and saved bytes against eager, time against torch.compile)."""
    rows = [r for r in rows if r.mode == "fwd+bwd"]
    by = {(r.variant, r.impl): r for r in rows}
    impls = list(dict.fromkeys(r.impl for r in rows))
    ours = "gatezoo-triton" if "gatezoo-triton" in impls else "gatezoo-torch"
    if rows and rows[0].op == "attention":
        head = ["T"] + [f"{i} ms" for i in impls] + [f"{ours} / SDPA", f"{ours} GFLOP/s", "saved / (q,k,v,out)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in dict.fromkeys(r.variant for r in rows):
            o = by[(v, ours)]
            cells = [v[1:]] + [f"{by[(v, i)].median_ms:.1f}" if (v, i) in by else "-" for i in impls]
            lines.append("| " + " | ".join(cells + [f"{o.ratio_vs_eager:.2f}", f"{o.gflops:.0f}",
                                                     f"{o.saved_vs_eager:.2f}"]) + " |")
        return "\n".join(lines)
    head = ["variant"] + [f"{i} ms" for i in impls] + [f"{ours} / eager", f"{ours} / compile", "saved / eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in dict.fromkeys(r.variant for r in rows):
        cells = [v] + [f"{by[(v, i)].median_ms:.1f}" if (v, i) in by else "-" for i in impls]
        o = by[(v, ours)]
        comp = by.get((v, "compile"))
        cells += [f"{o.ratio_vs_eager:.2f}", f"{o.median_ms / comp.median_ms:.2f}" if comp else "-",
                  f"{o.saved_vs_eager:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatezoo.eval.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=OPS, action="append", help="op to benchmark (repeatable; default: all)")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), help="kinds to run (default: all)")
    parser.add_argument("--size", type=int, default=4096, help="rows = columns of each input (default 4096)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--out", default="benchmarks", help="folder for the CSV and PNG")
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                        help="attention: sequence lengths of the sweep")
    parser.add_argument("--batch", type=int, default=4, help="attention: batch size")
    parser.add_argument("--heads", type=int, default=8, help="attention: heads")
    parser.add_argument("--head-dim", type=int, default=64, help="attention: head size")
    parser.add_argument("--summary", metavar="CSV", help="print the markdown summary of an earlier run and exit")
    args = parser.parse_args(argv)
    if args.summary:
        rows = read_csv(args.summary)
        shape = rows[0].shape if rows[0].op != "attention" else "-".join(
            p for p in rows[0].shape.split("-") if not p.startswith("T"))
        print(f"{rows[0].op}, {shape} {rows[0].dtype}, forward+backward, on {rows[0].device}\n")
        print(markdown_summary(rows))
        return 0
    if args.size < 1 or args.reps < 1:
        parser.error("--size and --reps must be positive")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    kinds = args.kinds or list(KINDS)
    for op in args.op or OPS:
        if op == "attention":
            rows = bench_attention(args.seqs, args.batch, args.heads, args.head_dim, dtype, device, args.reps)
            stem = os.path.join(args.out, f"attention-{device.type}")
            write_csv(rows, stem + ".csv")
            plot_attention(rows, stem + ".png")
            print(f"\nattention on {rows[0].device}, {rows[0].dtype} (ratio column: time / SDPA softmax's time "
                  "in the same round, median over the rounds)")
            print(format_rows(rows, attention=True))
            for line in forward_vs_gemm(rows, ours_name(device)):
                print(line)
            for note in attention_peers(device, dtype)[1]:
                print(f"note: {note}")
            print(f"wrote {stem}.csv and {stem}.png")
            continue
        if op in ("moe", "kan"):
            if op == "moe":
                rows, plotter, summary = bench_moe(dtype, device, args.reps), plot_moe, moe_summary
                ref = "the dense GLU's"
            else:
                rows, plotter, summary = bench_kan(dtype, device, args.reps, not args.no_compile), plot, kan_summary
                ref = "the public formulation's"
            stem = os.path.join(args.out, f"{op}-{device.type}")
            write_csv(rows, stem + ".csv")
            plotter(rows, stem + ".png")
            print(f"\n{op} on {rows[0].device}, {rows[0].shape} {rows[0].dtype} (ratios: time / {ref} in the same "
                  "round, median over the rounds)")
            print(format_rows(rows))
            print(summary(rows))
            print(f"wrote {stem}.csv and {stem}.png")
            continue
        if op == "token_mixing":
            rows = bench_mixing(dtype, device, args.reps, not args.no_compile)
            shape = "B-N-C-H in the CSV,"
        else:
            rows = bench_op(op, kinds, args.size, dtype, device, args.reps, not args.no_compile)
            shape = rows[0].shape
        stem = os.path.join(args.out, f"{op}-{device.type}")
        write_csv(rows, stem + ".csv")
        plot(rows, stem + ".png")
        print(f"\n{op} on {rows[0].device}, {shape} {rows[0].dtype}")
        print(format_rows(rows))
        print(f"wrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
