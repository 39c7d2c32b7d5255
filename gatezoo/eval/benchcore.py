"""What every microbenchmark of :mod:`gatezoo.eval.bench` shares: the CSV row, interleaved timing
with paired ratios, the bytes autograd saves for backward, and the CSV writer."""

from __future__ import annotations

import csv
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm


@dataclass
class Row:
    """One CSV row: one implementation of one variant in one mode."""

    op: str
    variant: str
    impl: str
    mode: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    ratio_vs_eager: float
    saved_bytes: int
    saved_vs_eager: float
    gflops: float = float("nan")  # attention: achieved GFLOP/s (matmul work only)


def device_name(device: torch.device) -> str:
    """A short, human description of the machine the figures come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Wall times of one function in :func:`time_interleaved`, in ms: the median, the 20th and
    80th percentiles, and every round's time in round order."""

    median: float
    p20: float
    p80: float
    times: tuple


def time_interleaved(fns: dict, device, reps: int, warmup: int = 2) -> dict:
    """{name: :class:`Timing`} of each ``fns[name]()``.

    The functions take turns, one call each per round, so a slow spell of a shared machine
    lands on every peer alike instead of on whichever ran at that moment. Each round takes the
    functions in a fresh order (a seeded shuffle), so that none of them keeps following the same
    peer, whose caches, allocations or freed memory it would otherwise inherit.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        out[name] = Timing(statistics.median(ts), q[0], q[3], tuple(ts))
    return out


def paired_ratio(timing: Timing, ref: Timing) -> float:
    """Median over the rounds of ``timing``'s time over ``ref``'s time in the same round.

    The calls of one round run back to back, so the machine's slow drift (on a shared VM, the
    median of one function moves by tens of percent between runs) cancels in each ratio; the
    ratio of the two medians, taken over different moments, keeps it."""
    return statistics.median(a / b for a, b in zip(timing.times, ref.times))


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd keeps for backward after ``fn(*inputs)``: unique storages packed."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


def modes(fn, args, grad) -> dict:
    """The two timed calls of one implementation: forward under no_grad, and forward+backward
    with ``grad`` as the output gradient (input gradients cleared each call)."""

    def fwd():
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd():
        for t in args:
            t.grad = None
        fn(*args).backward(grad)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _add_impl(calls: dict, saved: dict, impl: str, fn, args, grad, name: str) -> None:
    """Measure ``fn``'s saved bytes (its first call, where torch.compile builds) and add its two
    timed calls; a torch.compile peer that cannot build (no C++ toolchain) is skipped."""
    try:
        saved[impl] = saved_bytes(fn, args)
    except Exception as exc:
        if impl != "compile":
            raise
        tqdm.write(f"torch.compile peer skipped for {name}: {type(exc).__name__}: {str(exc)[:200]}")
        return
    calls[impl] = modes(fn, args, grad)


def write_csv(rows: list[Row], path: str) -> None:
    """Write ``rows`` to ``path`` (creating its folder)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
