"""The expert-offloading benchmark behind ``python -m gatezoo.eval.bench_moe --offload``.

A mixture-of-experts translation model (``transformer_mt_tiny_moe`` with pre-gating, or a
trained run of it: ``--run``) translates sentences one at a time with greedy search, as a
latency-bound deployment does, under each expert policy of :mod:`gatezoo.models.offload`:

* ``resident``: the model as it is, every expert in memory (the reference);
* ``on_demand``: the experts in the slow tier, a cache of ``cache`` experts, each missing expert
  fetched when its layer runs;
* ``prefetch``: the same cache, the experts of layer l + 1 fetched on a background thread as soon
  as the pre-gate at layer l has chosen them.

Each round translates the same sentences under every configuration (in a rotated order), each
offloaded one starting from an empty cache; a configuration's time is its round's total over
the generated tokens (ms per token, encoder included), and its ratios are the medians over
rounds of the paired per-round ratios (to ``resident``, and to ``on_demand`` at the same cache
size). Before timing, every configuration translates the sentences once more with every encoder
output and every step's logits recorded, and ``identical`` says whether all of them equal the
resident model's bit for bit. The figures of the cache (hit rate, prefetched share, fetched
bytes, time spent waiting for experts) are those of the last round.

With ``--tier disk`` the slow tier is the safetensors file on this machine's storage, its page
cache dropped after every read (so each fetch reads the device); ``--tier throttled`` copies from
memory at ``--bandwidth`` bytes per second. The torch threads are set to ``--threads`` (1 by
default), which leaves the other core to the fetch thread.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gatezoo.models import create_model
from gatezoo.models.offload import TIERS, expert_bytes, moe_layers_of, offload_experts, save_experts

from .benchcore import device_name
from .decode import greedy_search, pad_ids
from .plots import pyplot

OFFLOAD_MODEL = "transformer_mt_tiny_moe"
COLUMNS = ("model", "weights", "policy", "cache_experts", "cache_fraction", "tier", "ms_per_token", "p20_ms",
           "p80_ms", "ratio_vs_resident", "ratio_vs_on_demand", "resident_expert_mib", "fetched_mib_per_token",
           "hit_rate", "prefetched_share", "fetched_at_use_share", "wait_ms_per_token", "identical", "tokens",
           "sentences", "rounds", "machine", "command")


def _fraction_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gatezoo.eval.bench_moe --offload",
                                description="Expert offloading of a pre-gated MoE translation model: latency per "
                                            "token, resident and fetched expert bytes, per policy and cache size.")
    p.add_argument("--run", default=None,
                   help="a translation run directory of a model trained with pregated=true (its test sentences are "
                        "translated); default: a randomly initialised model on random source sentences")
    p.add_argument("--checkpoint", default="last", choices=("best", "last", "averaged"),
                   help="which weights of --run (default: last)")
    p.add_argument("--model_args", default="{}",
                   help="JSON overrides of the random model's config (without --run), e.g. '{\"dim\": 64}'")
    p.add_argument("--sentences", type=int, default=30, help="sentences translated per round (default 30)")
    p.add_argument("--cache", type=_fraction_list, default=[0.125, 0.25, 0.5],
                   help="cache sizes as fractions of all the model's experts (default 0.125,0.25,0.5)")
    p.add_argument("--tier", default="disk", choices=TIERS, help="the slow tier (default disk)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes per second of --tier throttled")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the fetch thread takes another)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/moe-offload",
                   help="output prefix: PREFIX.csv and PREFIX.png (default benchmarks/moe-offload)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def check_args(args) -> list[str]:
    errors = []
    for name in ("sentences", "rounds", "threads"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.tier == "throttled" and (args.bandwidth is None or not 0 < args.bandwidth < float("inf")):
        errors.append(f"--tier throttled needs --bandwidth > 0 (bytes per second), got {args.bandwidth}")
    if args.tier != "throttled" and args.bandwidth is not None:
        errors.append("--bandwidth applies only to --tier throttled")
    if args.run is not None and args.model_args.strip() not in ("", "{}"):
        errors.append("--model_args applies only without --run (the run's model is used as trained)")
    try:
        if not isinstance(json.loads(args.model_args or "{}"), dict):
            errors.append(f"--model_args must be a JSON object, got {args.model_args!r}")
    except json.JSONDecodeError as e:
        errors.append(f"--model_args must be a JSON object, got {args.model_args!r} ({e})")
    return errors


def load_model_and_sentences(args):
    """``(model in eval mode, list of (1, S) source id tensors, description of the weights)``."""
    if args.run is None:
        overrides = {"pregated": True, "dropout": 0.0, **json.loads(args.model_args or "{}")}
        torch.manual_seed(args.seed)
        model = create_model(OFFLOAD_MODEL, **overrides).eval()
        gen = random.Random(args.seed)
        vocab = model.config.vocab_size
        sents = [torch.tensor([[gen.randrange(4, vocab) for _ in range(gen.randint(12, 40))]])
                 for _ in range(args.sentences)]
        return model, sents, "random-init"
    model = _load_run_model(Path(args.run), args.checkpoint)
    if not getattr(model.config, "pregated", False):
        raise ValueError(f"--run {args.run!r}: the model was not trained with pregated=true, so no pre-gate chooses "
                         "the next layer's experts (train one with --model_args.pregated true)")
    test = Path(args.run) / "data" / "test.src"
    if not test.is_file():
        raise FileNotFoundError(f"--run {args.run!r}: no data/test.src (the test sentences a translation run keeps)")
    lines = [ln for ln in test.read_text(encoding="utf-8").splitlines() if ln.strip()][: args.sentences]
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("--run needs sentencepiece (the 'mt' extra: pip install 'gatezoo[mt]')") from e
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(args.run) / "spm.model"))
    ids = sp.encode(lines, out_type=int)  # no <s> / </s>: the encoder reads the ids alone
    return model.eval(), [pad_ids([x]) for x in ids], f"{Path(args.run).name}:{args.checkpoint}"


def _load_run_model(run: Path, checkpoint: str):
    """The registry model of a translation run's checkpoint ``<run>/<checkpoint>.safetensors``,
    rebuilt from the model name and arguments in its metadata (read here with safetensors, as the
    evaluation layer does not import the training layer's checkpoint module)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from gatezoo.models import list_models

    path = run / f"{checkpoint}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--run {str(run)!r}: {path.name} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("gatezoo_metadata") != "json" or "model" not in meta:
        raise ValueError(f"{path}: not a gatezoo checkpoint (no JSON metadata naming its model)")
    name, model_args = json.loads(meta["model"]), json.loads(meta.get("model_args", "{}"))
    if name not in list_models():
        raise ValueError(f"{path}: model {name!r} is not a gatezoo registry model")
    model = create_model(name, **model_args)
    load_model(model, str(path), strict=True)
    return model


def _record(model, sents) -> tuple[list, list[torch.Tensor]]:
    """``model``'s greedy translations of ``sents``, and every encoder output and step's logits."""
    seen = []
    enc, step = model.encode, model.decode_step

    def encode(*a, **k):
        out = enc(*a, **k)
        seen.append(out.states.clone())
        return out

    def decode_step(*a, **k):
        logits, cache = step(*a, **k)
        seen.append(logits.clone())
        return logits, cache

    model.encode, model.decode_step = encode, decode_step
    try:
        outs = [greedy_search(model, s) for s in sents]
    finally:
        del model.encode, model.decode_step
    return outs, seen


def bench_offload(args, command: str) -> list[dict]:
    """Rows of the offloading benchmark (see the module docstring)."""
    torch.set_num_threads(args.threads)
    model, sents, weights = load_model_and_sentences(args)
    layers = moe_layers_of(model)
    total = sum(layer.num_experts for _, layer in layers)
    per_expert = expert_bytes(layers[0][1])
    tmp = tempfile.TemporaryDirectory(prefix="gatezoo-experts-")
    path = os.path.join(tmp.name, "experts.safetensors")
    save_experts(model, path)
    configs = {"resident": (model, None)}
    for frac in args.cache:
        slots = max(1, round(frac * total))
        for policy in ("on_demand", "prefetch"):
            m = copy.deepcopy(model)
            off = offload_experts(m, path, cache_experts=slots, policy=policy, tier=args.tier,
                                  bandwidth=args.bandwidth)
            configs[f"{policy}@{slots}"] = (m, off)
    try:
        with torch.no_grad():
            ref_out, ref_seen = _record(model, sents)
            tokens = sum(len(o[0]) + 1 for o in ref_out)  # + EOS: one decoder step per output token and EOS
            identical = {"resident": True}
            for name, (m, off) in configs.items():
                if off is None:
                    continue
                off.clear()
                out, seen = _record(m, sents)
                identical[name] = out == ref_out and len(seen) == len(ref_seen) and all(
                    torch.equal(a, b) for a, b in zip(seen, ref_seen))
            times = {name: [] for name in configs}
            stats = {}
            names = list(configs)
            bar = tqdm(range(args.rounds), desc="bench offload", disable=not args.progress, file=sys.stderr)
            for r in bar:
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    m, off = configs[name]
                    if off is not None:
                        off.clear()
                        off.reset_stats()
                    t0 = time.perf_counter()
                    for s in sents:
                        greedy_search(m, s)
                    times[name].append((time.perf_counter() - t0) * 1e3 / tokens)
                    if off is not None:
                        stats[name] = off.stats.as_dict()
    finally:
        for _, off in configs.values():
            if off is not None:
                off.close()
        tmp.cleanup()
    machine = device_name(torch.device("cpu"))
    rows = []
    for name, ts in times.items():
        policy, _, slots = name.partition("@")
        slots = int(slots) if slots else total
        st = stats.get(name)
        ratio = statistics.median(t / ref for t, ref in zip(ts, times["resident"]))
        od = times.get(f"on_demand@{slots}")
        vs_od = statistics.median(t / o for t, o in zip(ts, od)) if od is not None and policy != "resident" else None
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        rows.append({
            "model": OFFLOAD_MODEL, "weights": weights, "policy": policy, "cache_experts": slots,
            "cache_fraction": round(slots / total, 4), "tier": "memory" if st is None else args.tier,
            "ms_per_token": round(statistics.median(ts), 4), "p20_ms": round(q[0], 4), "p80_ms": round(q[3], 4),
            "ratio_vs_resident": round(ratio, 4), "ratio_vs_on_demand": "" if vs_od is None else round(vs_od, 4),
            "resident_expert_mib": round(slots * per_expert / 2**20, 3),
            "fetched_mib_per_token": 0.0 if st is None else round(st["fetched_bytes"] / 2**20 / tokens, 4),
            "hit_rate": "" if st is None else round(st["hits"] / max(st["uses"], 1), 4),
            "prefetched_share": "" if st is None else round(st["prefetched"] / max(st["uses"], 1), 4),
            "fetched_at_use_share": "" if st is None else round(st["fetched_at_use"] / max(st["uses"], 1), 4),
            "wait_ms_per_token": 0.0 if st is None else round(st["wait_s"] * 1e3 / tokens, 4),
            "identical": identical[name], "tokens": tokens, "sentences": len(sents), "rounds": args.rounds,
            "machine": machine, "command": command,
        })
    return rows


def offload_summary(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| policy | cache (experts, share) | ms/token | / resident | / on-demand | fetched MiB/token | hit | "
             "prefetched | wait ms/token | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['cache_experts']} ({r['cache_fraction']:.3g}) | {r['ms_per_token']:.2f} | "
                     f"{r['ratio_vs_resident']:.2f} | {r['ratio_vs_on_demand']} | {r['fetched_mib_per_token']} | "
                     f"{r['hit_rate']} | {r['prefetched_share']} | {r['wait_ms_per_token']} | {r['identical']} |")
    return "\n".join(lines)


def plot_offload(rows: list[dict], path: str) -> None:
    """ms per token of each policy over the cache size, the resident model as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    resident = next(r for r in rows if r["policy"] == "resident")
    for policy, marker in (("on_demand", "o"), ("prefetch", "s")):
        pts = sorted((r["cache_fraction"], r["ms_per_token"]) for r in rows if r["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=policy.replace("_", "-"))
    ax.axhline(resident["ms_per_token"], color="grey", ls="--", label="all resident")
    ax.axhline(1.3 * resident["ms_per_token"], color="grey", ls=":", lw=0.8, label="1.3 x resident")
    ax.set_xlabel("experts in the cache (share of all)")
    ax.set_ylabel("ms per token (greedy, batch 1)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{resident['model']} ({resident['weights']}), tier {rows[-1]['tier']}\n{resident['machine']}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = check_args(args)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m gatezoo.eval.bench_moe --offload " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        rows = bench_offload(args, command.strip())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot_offload(rows, f"{out}.png")
    print(offload_summary(rows))
    print(f"wrote {out}.csv and {out}.png")
    return 0
