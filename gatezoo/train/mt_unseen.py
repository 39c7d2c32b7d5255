"""Score multi-task translation runs on a task they never trained, routed as each task they did.

The seed paper "Sparsely Activated Mixture-of-Experts are Robust Multi-Task Learners" claims that
a task-aware MoE generalises to an unseen task by using the routing of a related seen task. In a
gatezoo multi-task model the task id reaches the network only through its ``task_aware``
routers, so "the routing of task T" is the model run with T's id. This command builds the unseen
task from a seen task's split (``--task``) and a pair transform (``--transform``, one of
:data:`~gatezoo.train.data.text.PAIR_TRANSFORMS`, e.g. ``plain_source``: lower-cased source
without punctuation), then decodes it with every model of every run given:

- a model with a task-aware router once per seen task of its run (``routed_as`` = that task);
- any other model (dense, token-level MoE) once (``routed_as`` = ``-``: it has no choice).

It prints a Markdown table (models as rows, BLEU and chrF per routing, mean ± sd over the runs'
seeds) and with ``--out`` writes every score to a CSV and a bar chart beside it (``.png``). It
trains nothing and writes nothing into the runs.

    python -m gatezoo.train.mt_unseen runs/mt3/seed0/* runs/mt3/seed1/* --task en-es \\
        --transform plain_source --out benchmarks/bible-mt-multitask-unseen.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from gatezoo.eval.translate import evaluate_translation

from .core.config import ConfigError
from .core.loop import write_metrics
from .data.images import DataFormatError, DataNotFoundError
from .data.text import PAIR_TRANSFORMS, Split
from .mt_summary import markdown_table, model_dirs, plot_summary
from .translate_eval import CHECKPOINTS, load_run

COLUMNS = ("model", "seed", "unseen", "routed_as", "bleu", "chrf", "sentences", "beam_size", "checkpoint", "run_dir")
NO_ROUTING = "-"
"""``routed_as`` of a model that does not route by task."""


def unseen_name(task: str, transform: str) -> str:
    """The name of the unseen task built from ``task`` by ``transform`` (``en-es+plain_source``)."""
    return f"{task}+{transform}"


def score_model(model_dir: str | Path, task: str, transform: str, split: str = "test", checkpoint: str = "last",
                beam_size: int = 1, limit: int | None = None) -> list[dict]:
    """The rows of one model directory of a finished multi-task run on the unseen task: ``task``'s
    ``split`` pairs (its first ``limit``) with ``transform`` applied, decoded once per seen task
    (a task-aware model) or once (any other model). Raises ConfigError for a single-task run, an
    unknown task or transform, or an empty split."""
    model_dir = Path(model_dir)
    if transform not in PAIR_TRANSFORMS:
        raise ConfigError(f"--transform must be one of {sorted(PAIR_TRANSFORMS)}, got {transform!r}")
    model, tokenizer, meta = load_run(model_dir, checkpoint)
    tasks = meta.get("task", {}).get("tasks")
    if not tasks:
        raise ConfigError(f"{str(model_dir)!r} is a single-task run: an unseen task needs a multi-task run")
    if task not in tasks:
        raise ConfigError(f"--task {task!r} is not a task of {str(model_dir)!r}; its tasks are {', '.join(tasks)}")
    pairs = getattr(Split.load(model_dir / "data" / task), split)[:limit]
    if not pairs:
        raise ConfigError(f"the {split} split of task {task!r} in {str(model_dir)!r} is empty")
    pairs = PAIR_TRANSFORMS[transform](pairs)
    cfg = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    routings = list(enumerate(tasks)) if getattr(model, "num_tasks", None) is not None else [(None, NO_ROUTING)]
    rows = []
    for task_id, routed_as in routings:
        with torch.inference_mode():
            ev = evaluate_translation(model, tokenizer, pairs, beam_size=beam_size, task_ids=task_id,
                                      progress=False)
        rows.append({"model": cfg["model"], "seed": cfg.get("seed"), "unseen": unseen_name(task, transform),
                     "routed_as": routed_as, "bleu": ev["bleu"], "chrf": ev["chrf"], "sentences": len(pairs),
                     "beam_size": beam_size, "checkpoint": checkpoint, "run_dir": str(model_dir)})
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per model and routing (in order of appearance): the seeds and the BLEU and chrF over them,
    in the shape :mod:`gatezoo.train.mt_summary` tabulates and draws (the routing as its task:
    ``routed as <task>``, or ``no task routing``)."""
    keys = list(dict.fromkeys((r["model"], r["routed_as"]) for r in rows))
    out = []
    for model, routed_as in keys:
        runs = [r for r in rows if r["model"] == model and r["routed_as"] == routed_as]
        name = "no task routing" if routed_as == NO_ROUTING else f"routed as {routed_as}"
        out.append({"model": model, "task": name, "seeds": [r["seed"] for r in runs],
                    "bleu": [r["bleu"] for r in runs], "chrf": [r["chrf"] for r in runs]})
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m gatezoo.train.mt_unseen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished multi-task runs (side-by-side or not)")
    p.add_argument("--task", required=True, help="the seen task whose split the unseen task is built from")
    p.add_argument("--transform", required=True, help=f"the pair transform, one of {sorted(PAIR_TRANSFORMS)}")
    p.add_argument("--split", choices=("test", "dev"), default="test", help="the split of --task [test]")
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs of the split")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="last", help="which weights [last]")
    p.add_argument("--beam_size", type=int, default=1, help="1 = greedy [1]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, >= 1")
    p.add_argument("--out", metavar="CSV", help="write the rows to this CSV and the bar chart to its .png")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bad argument or run directory)."""
    args = build_parser().parse_args(argv)
    problems = [f"--{name} must be an integer >= 1, got {value}" for name, value in
                (("limit", args.limit), ("beam_size", args.beam_size), ("threads", args.threads))
                if value is not None and value < 1]
    if args.transform not in PAIR_TRANSFORMS:
        problems.append(f"--transform must be one of {sorted(PAIR_TRANSFORMS)}, got {args.transform!r}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    try:
        dirs = [d for run_dir in args.run_dirs for d in model_dirs(run_dir)]
        for i, d in enumerate(dirs):
            print(f"[{i + 1}/{len(dirs)}] {d}", file=sys.stderr, flush=True)
            rows += score_model(d, args.task, args.transform, args.split, args.checkpoint, args.beam_size, args.limit)
    except (ConfigError, ValueError, FileNotFoundError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    print(f"unseen task {unseen_name(args.task, args.transform)} ({rows[0]['sentences']} {args.split} pairs, "
          f"beam {args.beam_size}, {args.checkpoint} weights)")
    print(markdown_table(summary))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_metrics([{k: r[k] for k in COLUMNS} for r in rows], out)
        plot_summary(summary, out.with_suffix(".png"), title=f"{out.stem}: {unseen_name(args.task, args.transform)}",
                     scored_on=f"unseen {args.split}")
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
