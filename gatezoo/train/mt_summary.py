"""Sum up translation runs over seeds: per model and task, the test BLEU and chrF as mean ± sd.

``python -m gatezoo.train.mt_summary RUN_DIR [RUN_DIR ...] [--out CSV] [--baseline MODEL]`` reads
finished runs of :mod:`gatezoo.train.translate` (a side-by-side run directory stands for each of
its models; a multi-task run gives one row per task, a single-task run one row named ``test``),
prints a Markdown table of each model's scores per task over the runs (the seeds), and with
``--baseline`` the differences to that model paired by seed. ``--out`` also writes every row to
a CSV and a bar chart beside it (same name, ``.png``). It trains nothing.

``--dev`` scores each run by the dev BLEU of its last evaluation (``metrics.csv``) instead of
its test scores, for runs trained with ``final_test: false``. ``--label RUN_DIR NAME`` appends
`` [NAME]`` to the model names of that run, to tell apart runs of one model that differ in a
training option (a learning rate, gradient clipping) rather than in the model.

    python -m gatezoo.train.mt_summary runs/seed0/mt-sidebyside-* runs/seed1/mt-sidebyside-* \\
        --baseline transformer_mt_tiny:ffn=swiglu --out benchmarks/bible-mt-multitask.csv
    python -m gatezoo.train.mt_summary runs/base/seed0/* runs/noclip/seed0/* --dev \\
        --label runs/noclip/seed0/transformer_mt_tiny_rela-20261207 "grad_clip null" --baseline transformer_mt_tiny_rela
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from .core.config import ConfigError
from .core.loop import write_metrics

COLUMNS = ("model", "seed", "task", "step", "test_bleu", "test_chrf", "dev_bleu", "beam_size", "checkpoint",
           "train_tok_per_s", "run_dir")
DEV_COLUMNS = ("model", "seed", "task", "step", "dev_bleu", "train_tok_per_s", "run_dir")


def model_dirs(run_dir: str | Path) -> list[Path]:
    """The model directories of a run: the run itself, or each model's subdirectory of a side-by-side
    run. Raises ConfigError when ``run_dir`` holds neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    if (run_dir / "config.yaml").is_file() and not (run_dir / "sidebyside.csv").is_file():
        return [run_dir]
    subs = sorted(p for p in run_dir.iterdir() if (p / "config.yaml").is_file())
    if not subs:
        raise ConfigError(f"{str(run_dir)!r} is not a translation run directory (no config.yaml, no model "
                          f"subdirectories)")
    return subs


def _last_metrics(model_dir: Path) -> dict:
    metrics = model_dir / "metrics.csv"
    if not metrics.is_file():
        return {}
    with open(metrics, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def _number(value) -> float:
    return float(value) if value not in (None, "") else math.nan


def read_run(model_dir: Path, dev: bool = False, label: str | None = None) -> list[dict]:
    """The rows of one model's finished run: one per task of its ``test.json`` (``test`` for a
    single-task run), with the last evaluation's dev BLEU of that task; each row's ``bleu`` and
    ``chrf`` are the test scores. With ``dev``, one row per task of the last evaluation in
    ``metrics.csv``, scored by its dev BLEU (no chrF). ``label`` is appended to the model name as
    `` [label]``. Raises ConfigError when the run has no such scores (it did not finish, or ran
    with ``final_test: false`` and ``dev`` is off)."""
    cfg = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    model = cfg["model"] if label is None else f"{cfg['model']} [{label}]"
    last = _last_metrics(model_dir)
    if dev:
        if not last:
            raise ConfigError(f"{str(model_dir)!r} has no evaluation in metrics.csv")
        tasks = [k[len("dev_bleu_"):] for k in last if k.startswith("dev_bleu_")] or ["test"]
        out = []
        for task in tasks:
            bleu = _number(last.get(f"dev_bleu_{task}", last.get("dev_bleu")))
            out.append({"model": model, "seed": cfg.get("seed"), "task": "dev" if task == "test" else task,
                        "step": int(float(last["step"])), "dev_bleu": bleu, "bleu": bleu, "chrf": math.nan,
                        "train_tok_per_s": _number(last.get("tok_per_s")), "run_dir": str(model_dir)})
        return out
    path = model_dir / "test.json"
    if not path.is_file():
        raise ConfigError(f"{str(model_dir)!r} has no test.json: the run did not finish or ran with "
                          f"final_test: false (--dev scores it by its dev BLEU)")
    test = json.loads(path.read_text(encoding="utf-8"))
    per_task = test.get("tasks") or {"test": test}
    out = []
    for task, scores in per_task.items():
        dev_bleu = last.get(f"dev_bleu_{task}", last.get("dev_bleu") if task == "test" else None)
        out.append({"model": model, "seed": cfg.get("seed"), "task": task, "step": test.get("step"),
                    "test_bleu": scores["bleu"], "test_chrf": scores["chrf"], "bleu": scores["bleu"],
                    "chrf": scores["chrf"], "dev_bleu": _number(dev_bleu),
                    "beam_size": test.get("beam_size"), "checkpoint": test.get("checkpoint"),
                    "train_tok_per_s": test.get("train_tok_per_s", math.nan), "run_dir": str(model_dir)})
    return out


def collect(run_dirs: Sequence[str | Path], dev: bool = False, labels: Mapping[str, str] | None = None) -> list[dict]:
    """Every row of every model of ``run_dirs`` (``labels``: run directory -> label for its
    models). Raises ConfigError on a run given twice (the same model and seed) and on a label
    for a directory that is not among ``run_dirs``."""
    labels = {str(Path(k)): v for k, v in (labels or {}).items()}
    unknown = set(labels) - {str(Path(d)) for d in run_dirs}
    if unknown:
        raise ConfigError(f"--label names run directories that are not given: {sorted(unknown)}")
    rows, seen = [], set()
    for run_dir in run_dirs:
        for d in model_dirs(run_dir):
            for row in read_run(d, dev, labels.get(str(Path(run_dir)))):
                key = (row["model"], row["seed"], row["task"])
                if key in seen:
                    raise ConfigError(f"model {row['model']!r}, seed {row['seed']}, task {row['task']!r} appears "
                                      f"twice (again in {str(d)!r}; --label tells runs of one model apart)")
                seen.add(key)
                rows.append(row)
    return rows


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _fmt(values: Sequence[float], sign: str = "") -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:{sign}.2f}" if math.isnan(sd) else f"{mean:{sign}.2f} ± {sd:.2f}"


def summarize(rows: Sequence[Mapping], baseline: str | None = None) -> list[dict]:
    """Per model and task (in order of appearance): the seeds, mean and sd of test BLEU and chrF,
    and with ``baseline`` the mean and sd of the per-seed BLEU difference to it (seeds that both
    have). Raises ConfigError when ``baseline`` is not one of the models."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if baseline is not None and baseline not in models:
        raise ConfigError(f"--baseline {baseline!r} is not one of the models: {models}")
    by = {(r["model"], r["task"], r["seed"]): r for r in rows}
    out = []
    for model in models:
        for task in tasks:
            runs = [r for r in rows if r["model"] == model and r["task"] == task]
            if not runs:
                continue
            item = {"model": model, "task": task, "seeds": [r["seed"] for r in runs],
                    "bleu": [r["bleu"] for r in runs], "chrf": [r["chrf"] for r in runs]}
            if baseline is not None:
                item["delta_bleu"] = [r["bleu"] - by[(baseline, task, r["seed"])]["bleu"]
                                      for r in runs if (baseline, task, r["seed"]) in by]
            out.append(item)
    return out


def markdown_table(summary: Sequence[Mapping], baseline: str | None = None) -> str:
    """Models as rows, per task the BLEU (and its difference to ``baseline``) and chrF (none for
    dev scores)."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    chrf = any(not all(math.isnan(v) for v in s["chrf"]) for s in summary)
    head = ["model", "seeds"]
    for t in tasks:
        head += [f"{t} BLEU"] + ([f"{t} Δ BLEU"] if baseline else []) + ([f"{t} chrF"] if chrf else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in dict.fromkeys(s["model"] for s in summary):
        cells = {s["task"]: s for s in summary if s["model"] == model}
        seeds = next(iter(cells.values()))["seeds"]
        row = [f"`{model}`", ", ".join(str(s) for s in seeds)]
        for t in tasks:
            s = cells.get(t)
            if s is None:
                row += [""] * (1 + bool(baseline) + chrf)
                continue
            row.append(_fmt(s["bleu"]))
            if baseline:
                d = s.get("delta_bleu") or []
                row.append("" if model == baseline or not d else _fmt(d, "+"))
            if chrf:
                row.append(_fmt(s["chrf"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_summary(summary: Sequence[Mapping], path: Path, title: str = "", scored_on: str = "test") -> None:
    """Bars of BLEU and chrF (when there is one) per task and model (mean over seeds), each seed
    as a dot; ``scored_on`` names the split in the axis labels."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    models = list(dict.fromkeys(s["model"] for s in summary))
    panels = [("bleu", f"{scored_on} BLEU")]
    if any(not all(math.isnan(v) for v in s["chrf"]) for s in summary):
        panels.append(("chrf", f"{scored_on} chrF"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 0.6 * len(tasks) * len(models), 4.5),
                             squeeze=False)
    width = 0.8 / len(models)
    for ax, (key, label) in zip(axes[0], panels):
        for j, model in enumerate(models):
            xs, means, sds = [], [], []
            for i, task in enumerate(tasks):
                cell = next((s for s in summary if s["model"] == model and s["task"] == task), None)
                if cell is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                mean, sd = _mean_sd(cell[key])
                xs.append(x)
                means.append(mean)
                sds.append(0.0 if math.isnan(sd) else sd)
                ax.plot([x] * len(cell[key]), cell[key], "k.", ms=4, zorder=3)
            ax.bar(xs, means, width, yerr=sds, capsize=3, label=model)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no bar hidden
    save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m gatezoo.train.mt_summary", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished translation runs (side-by-side or not)")
    p.add_argument("--baseline", metavar="MODEL", help="also print each model's BLEU minus this model's, by seed")
    p.add_argument("--out", metavar="CSV", help="write the rows to this CSV and the bar chart to its .png")
    p.add_argument("--dev", action="store_true",
                   help="score by the last evaluation's dev BLEU (metrics.csv) instead of test.json")
    p.add_argument("--label", nargs=2, action="append", default=[], metavar=("RUN_DIR", "NAME"),
                   help="append ' [NAME]' to the model names of RUN_DIR (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bad argument or run directory)."""
    args = build_parser().parse_args(argv)
    try:
        rows = collect(args.run_dirs, args.dev, dict(args.label))
        summary = summarize(rows, args.baseline)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(summary, args.baseline))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_metrics([{k: r[k] for k in (DEV_COLUMNS if args.dev else COLUMNS)} for r in rows], out)
        plot_summary(summary, out.with_suffix(".png"), title=out.stem, scored_on="dev" if args.dev else "test")
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
