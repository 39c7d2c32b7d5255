"""The benchmark CLI runs end to end on a tiny size, and the saved-bytes goals hold.

Times are not asserted here (they are figures, in benchmarks/); saved bytes are a property of
the autograd graph and are deterministic, so they are checked.
"""

import csv
import math

import torch

from gatezoo.eval import bench


def test_bench_cli_writes_csv_and_png(tmp_path):
    assert bench.main(["--op", "glu", "--kinds", "silu", "relu", "--size", "48", "--reps", "2",
                       "--no-compile", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "glu-cpu.csv")))
    assert {r["variant"] for r in rows} == {"silu", "xsilu", "relu"}
    assert {r["impl"] for r in rows} == {"eager", "gatezoo-torch"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert (tmp_path / "glu-cpu.png").stat().st_size > 1000


def test_bench_summary_reads_the_csv(tmp_path, capsys):
    assert bench.main(["--op", "gated_act", "--kinds", "gelu", "--size", "32", "--reps", "2",
                       "--no-compile", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert bench.main(["--summary", str(tmp_path / "gated_act-cpu.csv")]) == 0
    out = capsys.readouterr().out
    assert "| variant | eager ms | gatezoo-torch ms |" in out
    assert "| xgelu |" in out and "| gelu |" in out


def _saved(op, kind, with_alpha):
    import torch

    n = 64
    impls = bench.make_impls(op, kind, torch.device("cpu"), use_compile=False)
    args = [torch.randn(n, n, requires_grad=True) for _ in range(2 if op == "glu" else 1)]
    if with_alpha:
        args.append(torch.tensor(0.1, requires_grad=True))
    return {name: bench.saved_bytes(fn, args) for name, fn in impls.items()}


def test_glu_saves_only_its_inputs():
    elem = 64 * 64 * 4
    for name, kind, with_alpha in bench.variants("glu", list(bench.KINDS)):
        saved = _saved("glu", kind, with_alpha)
        assert saved["gatezoo-torch"] <= 2 * elem + 8, name  # a, b (+ alpha)
        assert saved["gatezoo-torch"] <= saved["eager"], name
    # the goals, where the eager composition keeps more than the two inputs
    for kind in ("silu", "gelu"):
        s = _saved("glu", kind, False)
        assert s["gatezoo-torch"] <= 2 / 3 * s["eager"], kind
    for kind in ("sigmoid", "arctan", "normcdf"):
        s = _saved("glu", kind, True)
        assert s["gatezoo-torch"] <= 2 / 3 * s["eager"], kind
    for kind in ("silu", "gelu", "atlu"):
        s = _saved("glu", kind, True)
        assert s["gatezoo-torch"] <= 1 / 2 * s["eager"], kind


def test_attention_bench_cli(tmp_path, capsys):
    assert bench.main(["--op", "attention", "--seqs", "32", "64", "--batch", "1", "--heads", "2",
                       "--head-dim", "16", "--reps", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "attention-cpu.csv")))
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (i, m) for i in ("sdpa-softmax", "rela-naive", "gatezoo-torch") for m in ("fwd", "fwd+bwd")
    } | {(bench.GEMM_IMPL, "fwd")}  # the GEMM rate is timed in the forward's rounds
    assert {r["variant"] for r in rows} == {"T32", "T64"}
    assert all(float(r["gflops"]) > 0 for r in rows)
    sdpa = [r for r in rows if r["impl"] == "sdpa-softmax"]
    assert all(float(r["ratio_vs_eager"]) == 1.0 for r in sdpa)  # every round's ratio to itself
    assert all(0 < float(r["ratio_vs_eager"]) < math.inf for r in rows)
    out = capsys.readouterr().out
    for t in (32, 64):
        assert f"ReLA forward at T={t}: " in out and f"of a {bench.GEMM_N}^3 float32 matmul" in out
    # ReLA keeps q, k and v only: 3/4 of the bytes of (q, k, v, out), at every length
    ours = [r for r in rows if r["impl"] == "gatezoo-torch"]
    assert all(float(r["saved_vs_eager"]) == 0.75 for r in ours)
    assert (tmp_path / "attention-cpu.png").stat().st_size > 1000


def test_token_mixing_bench(tmp_path):
    rows = bench.bench_mixing(torch.float32, torch.device("cpu"), reps=2, use_compile=False, progress=False,
                              shapes={"tiny": (3, 7, 10, 6)})
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in ("eager", "gatezoo-torch") for m in ("fwd", "fwd+bwd")}
    assert all(r.median_ms > 0 and r.gflops > 0 for r in rows)
    ours = [r for r in rows if r.impl == "gatezoo-torch"]
    # eager keeps x, W1 x + b1, GELU of it, W2 and W1; the torch path keeps x, the pre-activation and the weights
    assert all(r.saved_vs_eager < 1.0 for r in ours)
    bench.write_csv(rows, str(tmp_path / "token_mixing-cpu.csv"))
    bench.plot(rows, str(tmp_path / "token_mixing-cpu.png"))
    assert (tmp_path / "token_mixing-cpu.png").stat().st_size > 1000
    head, first = bench.format_rows(rows).splitlines()[:2]
    assert "GFLOP/s" in head and "GB/s" not in head and "nan" not in first  # a matmul op: FLOP rate


def test_time_interleaved_shuffles_the_order():
    """Every round calls each function once, in an order that changes from round to round, so
    each function follows each peer in some rounds."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = bench.time_interleaved(fns, torch.device("cpu"), reps=30, warmup=0)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 30 and all(sorted(r) == list("abc") for r in rounds)
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert follows == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert set(timed) == set("abc") and all(len(v.times) == 30 for v in timed.values())


def test_paired_ratio_cancels_the_drift():
    """The ratio is taken round by round. A machine that turns ten times slower in the third
    round, between the calls of ``a`` and ``b``, moves the median of ``a`` to the slow level and
    that of ``b`` only halfway (a ratio of medians of 1.8 for two equal functions); it changes
    one per-round ratio, so the median of those stays 1."""
    a = bench.Timing(0, 0, 0, (1.0, 1.0, 10.0, 10.0, 10.0, 10.0))
    b = bench.Timing(0, 0, 0, (1.0, 1.0, 1.0, 10.0, 10.0, 10.0))
    assert bench.paired_ratio(a, b) == 1.0
    c = bench.Timing(0, 0, 0, (1.0, 3.0, 5.0))
    assert bench.paired_ratio(c, bench.Timing(0, 0, 0, (2.0, 2.0, 2.0))) == 1.5


def test_moe_bench(tmp_path):
    from gatezoo.blocks import ROUTERS
    from gatezoo.eval.bench_moe import bench_moe, moe_summary, plot_moe

    rows = bench_moe(torch.float32, torch.device("cpu"), reps=2, tokens=40, dim=16, experts=(4, 6), progress=False)
    layer = {(r.variant, r.impl, r.mode) for r in rows if r.variant != "router"}
    assert layer == {(f"E{e}", i, m) for e in (4, 6) for i in ("dense-glu", "gatezoo-torch", "loop")
                     for m in ("fwd", "fwd+bwd")}
    assert {r.impl for r in rows if r.variant == "router"} == set(ROUTERS)
    assert all(r.median_ms > 0 and r.saved_bytes > 0 for r in rows)
    assert all(r.ratio_vs_eager == 1.0 for r in rows if r.impl == "dense-glu")
    table = moe_summary(rows)
    assert "| 4 |" in table and "| 6 |" in table and "| grkan |" in table
    plot_moe(rows, str(tmp_path / "moe.png"))
    assert (tmp_path / "moe.png").stat().st_size > 1000


def test_moe_loop_reference_equals_the_layer():
    # the benchmark's per-expert loop computes what MoEFeedForward computes, on the same weights
    from gatezoo.blocks import MoEFeedForward
    from gatezoo.eval.bench_moe import loop_moe

    torch.manual_seed(0)
    moe = MoEFeedForward(12, 16, num_experts=5, k=2).double()
    x = torch.randn(23, 12, dtype=torch.float64)
    # (the routing weights are float32 by design, hence the tolerance)
    torch.testing.assert_close(loop_moe(moe)(x), moe(x), rtol=1e-5, atol=1e-6)


def test_dropout_bench(tmp_path, capsys):
    assert bench.main(["--op", "dropout", "--size", "160", "--reps", "2", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "dropout-cpu.csv")))
    assert {r["impl"] for r in rows} == {"eager", "gatezoo-torch"} and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    # gatezoo keeps a one-byte mask per element for backward; PyTorch's CPU dropout a float one
    saved = {r["impl"]: int(r["saved_bytes"]) for r in rows if r["mode"] == "fwd+bwd"}
    assert saved["gatezoo-torch"] == 160 * 160 and saved["eager"] >= saved["gatezoo-torch"]
    assert (tmp_path / "dropout-cpu.png").stat().st_size > 0


def test_kan_bench(tmp_path):
    """Both bases against their public formulations: same outputs, fewer saved bytes."""
    from gatezoo.eval.bench import plot
    from gatezoo.eval.bench_kan import bench_kan, kan_summary

    rows = bench_kan(torch.float32, torch.device("cpu"), reps=2, compile_peer=False, tokens=40, n_in=12, n_out=5,
                     progress=False)
    assert {(r.variant, r.impl, r.mode) for r in rows} == {
        (b, i, m) for b, peer in (("bspline", "efficient-kan"), ("rbf", "fastkan"))
        for i in (peer, "gatezoo-torch") for m in ("fwd", "fwd+bwd")}
    assert all(r.median_ms > 0 and r.saved_bytes > 0 for r in rows)
    ours = {r.variant: r for r in rows if r.impl == "gatezoo-torch" and r.mode == "fwd+bwd"}
    assert ours["bspline"].saved_vs_eager < 0.5 and ours["rbf"].saved_vs_eager < 1.0
    table = kan_summary(rows)
    assert "| bspline | efficient-kan |" in table and "| rbf | gatezoo-torch |" in table
    plot(rows, str(tmp_path / "kan.png"))
    assert (tmp_path / "kan.png").stat().st_size > 1000
