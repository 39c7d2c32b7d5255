"""The mixture-of-experts benchmark behind ``python -m gatezoo.eval.bench --op moe``.

At each expert count E it times, forward and forward+backward, on N tokens of width d:

* ``dense-glu``: the dense SwiGLU feed-forward (:class:`gatezoo.blocks.GLUFeedForward`, hidden
  width ``glu_hidden_features(d)``), the baseline every ratio refers to;
* ``gatezoo-torch`` (and ``gatezoo-triton`` on CUDA): :class:`gatezoo.blocks.MoEFeedForward`
  with a top-k router and SwiGLU experts of width ``glu_hidden_features(d) / k``, so that a token's
  active parameters equal the dense feed-forward's; its auxiliary loss is part of the backward;
* ``loop``: the common per-expert mask-and-index loop (the Mixtral-style reference, written
  plainly) on the very same weights: for every expert, ``torch.where`` over the (N, k) choices,
  gather, the expert's matmuls, scale, ``index_add_`` back.

Parameter gradients are set to None before every call, as ``zero_grad()`` does in a training
step, so that no implementation is charged for adding into the previous call's gradients (with
64 experts those are 8 times the dense feed-forward's weights).

and, at the first E, each router of :data:`gatezoo.blocks.ROUTERS` alone (its forward, and its
forward+backward through the combine weights), as its overhead against the dense feed-forward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gatezoo.blocks import ROUTERS, GLUFeedForward, MoEFeedForward, glu_hidden_features, make_router

from .benchcore import Row, _add_impl, device_name, paired_ratio, saved_bytes, time_interleaved
from .plots import pyplot

MOE_TOKENS, MOE_DIM, MOE_K, MOE_EXPERTS = 8192, 256, 2, (8, 64)


def loop_moe(moe: MoEFeedForward):
    """The per-expert mask-and-index loop over ``moe``'s own router and weights (SwiGLU experts)."""
    h = moe.hidden_features

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = moe.router.gate(x)
        top, chosen = torch.topk(logits, moe.k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(moe.num_experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            a_b = x[token] @ moe.w1[e]
            y = (F.silu(a_b[:, :h]) * a_b[:, h:]) @ moe.w2[e]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    return run


def _fresh_grads(fn, module: torch.nn.Module):
    """``fn`` with ``module``'s parameter gradients set to None before each call, as a training
    step's ``zero_grad()`` does: no implementation pays for adding into the last call's gradients."""
    params = list(module.parameters())

    def run(x):
        for p in params:
            p.grad = None
        return fn(x)

    return run


def _ours(moe: MoEFeedForward):
    def run(x):
        y = moe(x)
        if torch.is_grad_enabled():  # the balance loss rides along with the backward, as in training
            y = y + 0 * moe.aux_loss
        return y

    return run


def bench_moe(dtype, device, reps: int, tokens: int = MOE_TOKENS, dim: int = MOE_DIM, k: int = MOE_K,
              experts=MOE_EXPERTS, progress: bool = True) -> list[Row]:
    """Rows of the MoE benchmark (see the module docstring); ``ratio_vs_eager`` holds the ratio
    to the dense GLU's time in the same round and ``saved_vs_eager`` the saved bytes over the
    dense GLU's."""
    machine = device_name(device)
    dt = str(dtype).replace("torch.", "")
    glu_hidden = glu_hidden_features(dim)
    hidden = (-(-glu_hidden // k) + 7) // 8 * 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(tokens, dim, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, dim, generator=gen).to(device, dtype)
    out: list[Row] = []
    bar = tqdm(list(experts), desc="bench moe", disable=not progress, file=sys.stderr)
    for e in bar:
        torch.manual_seed(0)
        dense = GLUFeedForward(dim, glu_hidden).to(device, dtype)
        moe = MoEFeedForward(dim, hidden, num_experts=e, k=k, router="topk", backend="torch").to(device, dtype)
        impls = {"dense-glu": _fresh_grads(dense, dense), "gatezoo-torch": _fresh_grads(_ours(moe), moe),
                 "loop": _fresh_grads(loop_moe(moe), moe)}
        if device.type == "cuda":
            moe_t = MoEFeedForward(dim, hidden, num_experts=e, k=k, router="topk", backend="triton").to(device, dtype)
            moe_t.load_state_dict(moe.state_dict())
            impls["gatezoo-triton"] = _fresh_grads(_ours(moe_t), moe_t)
        calls, saved = {}, {}
        for name, fn in impls.items():
            _add_impl(calls, saved, name, fn, [x0.detach().clone().requires_grad_()], dy, f"moe E={e}")
        flops = {"fwd": 2 * tokens * dim * 3 * glu_hidden, "fwd+bwd": 6 * tokens * dim * 3 * glu_hidden}
        for mode in ("fwd", "fwd+bwd"):
            timed = time_interleaved({n: c[mode] for n, c in calls.items()}, device, reps)
            for name, tm in timed.items():
                out.append(Row("moe", f"E{e}", name, mode, f"N{tokens}-d{dim}-k{k}-h{hidden}", dt, machine,
                               round(tm.median, 3), round(tm.p20, 3), round(tm.p80, 3), float("nan"),
                               round(paired_ratio(tm, timed["dense-glu"]), 3), saved[name],
                               round(saved[name] / saved["dense-glu"], 3),
                               float(f"{flops[mode] / tm.median / 1e6:.4g}")))
        if e == experts[0]:
            out += _bench_routers(dense, x0, dy, e, k, dim, dtype, device, reps, machine, dt, tokens)
    return out


def _bench_routers(dense, x0, dy, e, k, dim, dtype, device, reps, machine, dt, tokens) -> list[Row]:
    """Every router alone on the benchmark's tokens, against the dense feed-forward."""
    x = x0.detach().clone().requires_grad_()
    calls, saved = {}, {}
    _add_impl(calls, saved, "dense-glu", dense, [x], dy, "dense")
    for name in ROUTERS:
        args = {"num_tasks": 2} if name == "task_aware" else {}
        router = make_router(name, dim, e, k if name in ("topk", "task_aware") else None, **args).to(device, dtype)
        task_ids = torch.zeros(tokens, dtype=torch.long, device=device) if name == "task_aware" else None
        # a scalar of the combine weights, so that the backward reaches the router's parameters
        gw = torch.randn(tokens, router.k, device=device)

        def fn(inp, router=router, task_ids=task_ids, gw=gw):
            r = router(inp, task_ids)
            s = (r.weights * gw).sum()
            for v in r.aux.values():
                s = s + v
            return s

        saved[name] = saved_bytes(fn, [x])
        calls[name] = {"fwd": lambda fn=fn: fn(x.detach()),
                       "fwd+bwd": lambda fn=fn: fn(x).backward()}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        timed = time_interleaved({n: c[mode] for n, c in calls.items()}, device, reps)
        for name, tm in timed.items():
            if name == "dense-glu":
                continue
            rows.append(Row("moe", "router", name, mode, f"N{tokens}-d{dim}-E{e}", dt, machine, round(tm.median, 3),
                            round(tm.p20, 3), round(tm.p80, 3), float("nan"),
                            round(paired_ratio(tm, timed["dense-glu"]), 3), saved[name],
                            round(saved[name] / saved["dense-glu"], 3), float("nan")))
    return rows


def moe_summary(rows: list[Row]) -> str:
    """Markdown tables: the MoE layer against the dense GLU and the loop (forward+backward), and
    the routers' overhead."""
    fb = [r for r in rows if r.mode == "fwd+bwd"]
    by = {(r.variant, r.impl): r for r in fb}
    ours = "gatezoo-triton" if any(r.impl == "gatezoo-triton" for r in fb) else "gatezoo-torch"
    lines = ["| E | dense GLU ms | MoE ms | loop ms | MoE / dense | loop / dense | MoE / loop "
             "| saved MiB dense / MoE / loop |", "|---|---|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r.variant for r in fb if r.variant != "router"):
        d, o, lp = by[(v, "dense-glu")], by[(v, ours)], by[(v, "loop")]
        mib = "/".join(f"{r.saved_bytes / 2**20:.0f}" for r in (d, o, lp))
        lines.append(f"| {v[1:]} | {d.median_ms:.1f} | {o.median_ms:.1f} | {lp.median_ms:.1f} | "
                     f"{o.ratio_vs_eager:.2f} | {lp.ratio_vs_eager:.2f} | {o.ratio_vs_eager / lp.ratio_vs_eager:.2f} | "
                     f"{mib} |")
    routers = [r for r in fb if r.variant == "router"]
    if routers:
        lines += ["", "| router | forward+backward ms | / dense GLU |", "|---|---|---|"]
        lines += [f"| {r.impl} | {r.median_ms:.2f} | {r.ratio_vs_eager:.3f} |" for r in routers]
    return "\n".join(lines)


def plot_moe(rows: list[Row], path: str) -> None:
    """Forward+backward time of each implementation over E, as a ratio to the dense GLU."""
    plt = pyplot()

    fb = [r for r in rows if r.mode == "fwd+bwd" and r.variant != "router"]
    variants = list(dict.fromkeys(r.variant for r in fb))
    impls = list(dict.fromkeys(r.impl for r in fb))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        by = {r.variant: r for r in fb if r.impl == impl}
        ax.bar([i + j * width for i in range(len(variants))], [by[v].ratio_vs_eager for v in variants], width,
               label=impl)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], [f"E = {v[1:]}" for v in variants])
    ax.set_ylabel("forward+backward time / dense GLU")
    ax.set_title(f"MoE {fb[0].shape} {fb[0].dtype} on {fb[0].device}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m gatezoo.eval.bench_moe --offload [options]``: the expert-offloading benchmark
    (:mod:`gatezoo.eval.bench_offload`; ``--offload --help`` lists its options). The MoE layer
    benchmark itself runs as ``python -m gatezoo.eval.bench --op moe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--offload" not in argv:
        print("error: this command runs the expert-offloading benchmark: pass --offload (see --offload --help); the "
              "MoE layer benchmark is python -m gatezoo.eval.bench --op moe", file=sys.stderr)
        return 2
    argv.remove("--offload")
    from .bench_offload import main as offload_main

    return offload_main(argv)


if __name__ == "__main__":
    sys.exit(main())
