"""Sum up runs that end with a ``result.json`` (adversarial training, self-tuning) over seeds.

``python -m gatezoo.train.result_summary RUN_DIR [RUN_DIR ...] --group KEY [KEY ...] --metrics
NAME [NAME ...] [--baseline LABEL] [--out CSV]`` reads each run's ``result.json``, labels it by
the values of the ``--group`` keys (``model``, ``mode``, ``search``...), prints a Markdown table
of every metric as mean ± sd over the runs of each label (their seeds; NaN values are left out
of both and counted beside them) and, with ``--baseline``,
each label's difference to that label paired by seed. ``--out`` writes one CSV row per run and
a bar chart beside it (same name, ``.png``). It trains nothing.

    python -m gatezoo.train.result_summary runs/adv/*/* --group model mode alternation \\
        --metrics robust_acc test_acc flops_per_image --baseline "cnn_small_moe joint separate" \\
        --out benchmarks/fashion-mnist-adversarial.csv
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .core.config import ConfigError
from .core.loop import write_metrics


def read_result(run_dir: str | Path) -> dict:
    """A run's ``result.json`` with ``run_dir`` added; ConfigError when it has none."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no result.json (not a finished adversarial or self-tuning run)")
    return {**json.loads(path.read_text(encoding="utf-8")), "run_dir": str(run_dir)}


def label_of(result: Mapping, group: Sequence[str]) -> str:
    """The values of the ``group`` keys of ``result``, space-separated; ConfigError for a missing key."""
    missing = [k for k in group if k not in result]
    if missing:
        raise ConfigError(f"{result['run_dir']}: result.json has no {missing} (it has {sorted(result)})")
    return " ".join(str(result[k]) for k in group)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _stats(values: Sequence[float]) -> str:
    """``mean ± sd`` of the values that are not NaN, and how many are NaN (a run that never got
    there: a recovery that did not happen, say)."""
    finite = _finite(values)
    nans = f" ({len(values) - len(finite)} of {len(values)} NaN)" if len(finite) < len(values) else ""
    if not finite:
        return "NaN" + nans
    mean = statistics.fmean(finite)
    return (f"{mean:.4g} ± {statistics.stdev(finite):.2g}" if len(finite) > 1 else f"{mean:.4g}") + nans


def summarize(results: Sequence[Mapping], group: Sequence[str], metrics: Sequence[str],
              baseline: str | None = None) -> list[dict]:
    """Per label (in order of appearance): its seeds and, per metric, the values over them and,
    with ``baseline``, the differences to the baseline's runs of the same seed."""
    labels = list(dict.fromkeys(label_of(r, group) for r in results))
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"--baseline {baseline!r} is not one of the labels: {labels}")
    by_label = {lab: [r for r in results if label_of(r, group) == lab] for lab in labels}
    out = []
    for lab in labels:
        runs = by_label[lab]
        item = {"label": lab, "seeds": [r.get("seed") for r in runs], "values": {}, "deltas": {}}
        for m in metrics:
            missing = [r["run_dir"] for r in runs if not isinstance(r.get(m), (int, float))]
            if missing:
                raise ConfigError(f"metric {m!r} is missing (or not a number) in {missing}")
            item["values"][m] = [float(r[m]) for r in runs]
            if baseline is not None and lab != baseline:
                base = {r.get("seed"): float(r[m]) for r in by_label[baseline]}
                item["deltas"][m] = [float(r[m]) - base[r.get("seed")] for r in runs if r.get("seed") in base]
        out.append(item)
    return out


def markdown_table(summary: Sequence[Mapping], metrics: Sequence[str], baseline: str | None = None) -> str:
    """Labels as rows; per metric its mean ± sd (and the paired difference to ``baseline``)."""
    head = ["run", "seeds"]
    for m in metrics:
        head += [m] + ([f"Δ {m}"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        row = [f"`{s['label']}`", ", ".join(str(x) for x in s["seeds"])]
        for m in metrics:
            row.append(_stats(s["values"][m]))
            if baseline:
                d = s["deltas"].get(m)
                row.append(_stats(d) if d else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: Sequence[Mapping], metrics: Sequence[str], path: Path, title: str = "") -> None:
    """One panel per metric: a bar per label (the mean), each run as a dot."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(0.9 * len(summary) + 2.5, 4.2) if len(metrics) == 1 else
                             (4.2 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for i, s in enumerate(summary):
            vals = _finite(s["values"][m])
            if vals:
                ax.bar(i, statistics.fmean(vals), 0.7, yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
                       capsize=3)
                ax.plot([i] * len(vals), vals, "k.", ms=5, zorder=3)
        ax.set_xticks(range(len(summary)), [s["label"] for s in summary], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(m)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m gatezoo.train.result_summary", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs with a result.json")
    p.add_argument("--group", nargs="+", required=True, metavar="KEY", help="result.json keys that label a run")
    p.add_argument("--metrics", nargs="+", required=True, metavar="NAME", help="result.json numbers to sum up")
    p.add_argument("--baseline", metavar="LABEL", help="also print each label's difference to this one, by seed")
    p.add_argument("--out", metavar="CSV", help="write the runs to this CSV and the bar chart to its .png")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bad argument or run directory)."""
    args = build_parser().parse_args(argv)
    try:
        results = [read_result(d) for d in args.run_dirs]
        summary = summarize(results, args.group, args.metrics, args.baseline)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(summary, args.metrics, args.baseline))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"label": label_of(r, args.group), "seed": r.get("seed"), **{m: r[m] for m in args.metrics},
                 "run_dir": r["run_dir"]} for r in results]
        write_metrics(rows, out)
        plot(summary, args.metrics, out.with_suffix(".png"), out.stem)
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
