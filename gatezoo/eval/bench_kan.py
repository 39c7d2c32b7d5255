"""The KAN layer benchmark behind ``python -m gatezoo.eval.bench --op kan``.

One KAN layer at the shape of the GRKAN gate's first layer in the MoE benchmark (8,192 tokens,
256 → 8, G = 5 cells on (-2, 2)), forward and forward+backward, in two bases, each against the
public CPU formulation of that basis, written out here (the same function, so the outputs agree):

* B-splines (cubic, SiLU base): the efficient-KAN formulation (github.com/Blealtan/efficient-kan):
  the Cox-de Boor recursion vectorised over (tokens, in, knots), then one matmul of the flattened
  basis with the spline weights, plus the base branch; autograd keeps every level. It is
  gatezoo's own oracle, :func:`gatezoo.kernels.kan.kan_linear_composed`.
* Gaussian RBF (SiLU base): the FastKAN formulation (Li 2024, github.com/ZiyaoLi/fast-kan):
  ``exp(-((x - c_j) / h)^2)`` over (tokens, in, G + 1), then one matmul, plus the base branch.

against ``gatezoo-torch`` (:func:`gatezoo.kernels.kan_linear` on the torch path), ``compile``
(``torch.compile`` of the formulation, unless ``--no-compile``) and, on CUDA, ``gatezoo-triton``.
The ratio column is time over the formulation's time in the same round.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from gatezoo.kernels import kan_linear
from gatezoo.kernels.kan import kan_linear_composed, num_basis

from .benchcore import Row, _add_impl, device_name, paired_ratio, time_interleaved

KAN_TOKENS, KAN_IN, KAN_OUT, KAN_GRID = 8192, 256, 8, 5
PEERS = {"bspline": "efficient-kan", "rbf": "fastkan"}


def bench_kan(dtype, device, reps: int, compile_peer: bool = True, tokens: int = KAN_TOKENS, n_in: int = KAN_IN,
              n_out: int = KAN_OUT, progress: bool = True) -> list[Row]:
    """Rows of the KAN benchmark (module docstring); ``ratio_vs_eager`` and ``saved_vs_eager``
    refer to the public formulation of the same basis."""
    machine = device_name(device)
    dt = str(dtype).replace("torch.", "")
    out: list[Row] = []
    for basis in tqdm(list(PEERS), desc="bench kan", disable=not progress, file=sys.stderr):
        gen = torch.Generator(device="cpu").manual_seed(0)
        nb = num_basis(KAN_GRID, 3, basis)
        x0 = torch.randn(tokens, n_in, generator=gen).to(device, dtype)
        dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
        c = (torch.randn(n_out, n_in, nb, generator=gen) * 0.1 / n_in ** 0.5).to(device, dtype).requires_grad_()
        w = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(device, dtype).requires_grad_()
        opts = dict(basis=basis, grid_size=KAN_GRID, spline_order=3, grid_range=(-2.0, 2.0))
        peer = PEERS[basis]
        impls = _impls(peer, c, w, opts, compile_peer, device)
        calls, saved = {}, {}
        for name, fn in impls.items():
            _add_impl(calls, saved, name, fn, [x0.detach().clone().requires_grad_()], dy, f"kan {basis}")
        for mode in ("fwd", "fwd+bwd"):
            timed = time_interleaved({n: cl[mode] for n, cl in calls.items()}, device, reps)
            for name, tm in timed.items():
                out.append(Row("kan", basis, name, mode, f"N{tokens}-in{n_in}-out{n_out}-G{KAN_GRID}", dt, machine,
                               round(tm.median, 3), round(tm.p20, 3), round(tm.p80, 3), float("nan"),
                               round(paired_ratio(tm, timed[peer]), 3), saved[name],
                               round(saved[name] / saved[peer], 3)))
    return out


def _impls(peer: str, c, w, opts: dict, compile_peer: bool, device) -> dict:
    """{name: function of x} for one basis: the public formulation and gatezoo's paths."""

    def formulation(x):
        return kan_linear_composed(x, c, w, None, base_act="silu", **opts)

    impls = {peer: formulation,
             "gatezoo-torch": lambda x: kan_linear(x, c, w, backend="torch", base_activation="silu", **opts)}
    if compile_peer:
        impls["compile"] = torch.compile(formulation)
    if device.type == "cuda":
        impls["gatezoo-triton"] = lambda x: kan_linear(x, c, w, backend="triton", base_activation="silu", **opts)
    return impls


def kan_summary(rows: list[Row]) -> str:
    """Markdown: forward+backward time and saved bytes of each implementation, per basis."""
    lines = ["| basis | implementation | forward+backward ms | / public formulation | saved MiB "
             "| saved / formulation |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.mode == "fwd+bwd":
            lines.append(f"| {r.variant} | {r.impl} | {r.median_ms:.1f} | {r.ratio_vs_eager:.2f} | "
                         f"{r.saved_bytes / 2**20:.1f} | {r.saved_vs_eager:.3f} |")
    return "\n".join(lines)
