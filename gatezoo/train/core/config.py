"""Training configuration: YAML file + ``--key value`` command-line overrides, validated.

A config is a flat mapping of the keys in :data:`KEYS` (``model_args`` is a nested mapping of
model-constructor overrides). Command-line overrides name a key, with dots for nested keys, and a
value parsed by ``yaml.safe_load``::

    --epochs 5 --lr 3e-4 --model_args.depth 2 --model_args '{dim: 64, depth: 2}' --name null

Every command line of :mod:`gatezoo.train` spells its options as these key names, underscores
included (``--batch_size``, ``--weight_decay``); a hyphenated spelling or an unknown key raises
:class:`ConfigError` naming it (and the spelling it probably meant).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .optim import SCHEDULES


class ConfigError(ValueError):
    """A config file or command-line override is invalid; the message names the key."""


@dataclass(frozen=True)
class Key:
    """One config key: its default, its kind and a line of help."""

    default: Any
    kind: str  # "str", "int", "float", "bool", "dict", "list"
    help: str
    optional: bool = False  # None allowed
    minimum: float | None = None
    below: float | None = None  # exclusive upper bound
    choices: tuple | None = None  # allowed values of a "str" key


KEYS: dict[str, Key] = {
    "model": Key(None, "str", "model name: a gatezoo registry name (gatezoo.models.list_models()) or a timm peer, "
                 "optionally NAME:key=value,... (sidebyside takes --models instead)"),
    "model_args": Key({}, "dict", "overrides passed to create_model (e.g. {depth: 2, dim: 64}); in_chans, img_size "
                      "and num_classes default to the data set's"),
    "data": Key("fashion-mnist", "str", "'fashion-mnist', a directory of idx files, an .npz or an image folder"),
    "epochs": Key(3, "int", "number of epochs", minimum=1),
    "batch_size": Key(128, "int", "training batch size", minimum=1),
    "eval_batch_size": Key(512, "int", "evaluation batch size", minimum=1),
    "lr": Key(1e-3, "float", "peak AdamW learning rate", minimum=0.0),
    "weight_decay": Key(0.05, "float", "AdamW weight decay (not applied to biases, norms, 1-D params, tokens, "
                        "position embeddings)", minimum=0.0),
    "warmup_epochs": Key(0.3, "float", "linear warm-up length in epochs (fractions allowed), then the schedule",
                         minimum=0.0),
    "warmup_steps": Key(None, "int", "linear warm-up length in optimizer steps; when set it replaces warmup_epochs",
                        optional=True, minimum=0),
    "schedule": Key("cosine", "str", "learning-rate schedule after the warm-up: cosine (to 0 at the end), "
                    "inverse_sqrt (sqrt(warmup / step)) or constant", choices=SCHEDULES),
    "grad_clip": Key(None, "float", "clip the gradients' global norm to this before each optimizer step (null: off)",
                     optional=True, minimum=0.0),
    "accum_steps": Key(1, "int", "batches per optimizer step (gradient accumulation; the loss is the mean of the "
                       "batches' mean losses)", minimum=1),
    "label_smoothing": Key(0.1, "float", "label smoothing of the training cross-entropy", minimum=0.0, below=1.0),
    "augment": Key(False, "bool", "light augmentation: random shifts up to 2 px and horizontal flips"),
    "bf16": Key(False, "bool", "bfloat16 autocast of the forward pass, CPU or CUDA (loss in float32)"),
    "seed": Key(0, "int", "seed of model initialisation, shuffling and augmentation"),
    "out": Key("runs", "str", "root directory of run directories"),
    "name": Key(None, "str", "run name (default: the model name); the run directory is <out>/<name>-<timestamp>",
                optional=True),
    "device": Key("auto", "str", "'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."),
    "max_steps": Key(None, "int", "stop after this many optimizer steps in all (smoke tests); the schedule still "
                     "spans all epochs", optional=True, minimum=1),
    "checkpoint_every": Key(None, "int", "also save a resumable snapshot every this many optimizer steps between "
                            "evaluations, so a crash loses at most that many (null: at evaluations only)",
                            optional=True, minimum=1),
    "threads": Key(None, "int", "torch.set_num_threads for CPU runs", optional=True, minimum=1),
    "nonfinite": Key("stop", "str", "at a non-finite training loss or gradient norm: stop (error naming the step) "
                     "or skip (that optimizer step is skipped with a warning)", choices=("stop", "skip")),
    "fsdp": Key(False, "bool", "under torchrun: shard parameters, gradients and optimizer state with FSDP2 "
                "instead of DistributedDataParallel"),
    "progress": Key(True, "bool", "tqdm progress bars"),
}


def default_config(keys: Mapping[str, Key] = KEYS) -> dict:
    """A fresh dict of every key's default (of ``keys``, a command's schema; default :data:`KEYS`)."""
    return {k: copy.deepcopy(v.default) for k, v in keys.items()}


def keys_help(keys: Mapping[str, Key] = KEYS) -> str:
    """The config keys as a help text block (name, default, description)."""
    lines = ["config keys (YAML file and --key value overrides):"]
    for k, spec in keys.items():
        default = "required" if spec.default is None and not spec.optional else yaml.safe_dump(
            spec.default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {k:<16} {spec.help} [{default}]")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A command-line value parsed as YAML (``2`` -> int, ``null`` -> None, ``{a: 1}`` -> dict)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# options of earlier versions whose new spelling is more than underscores for hyphens
RENAMED = {"no-progress": "--progress false", "no_progress": "--progress false", "same-init": "--same_init",
           "batch-size": "--batch_size (or --eval_batch_size for evaluate)"}


def parse_overrides(args: Sequence[str], keys: Mapping[str, Key] = KEYS) -> list[tuple[str, Any]]:
    """``["--a.b", "1", "--c=x"]`` -> ``[("a.b", 1), ("c", "x")]``; raises :class:`ConfigError`.

    A boolean key given alone (``--bf16``, followed by another option or nothing) means true.
    """
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override --key value, got {arg!r}")
        key = arg[2:]
        inline = "=" in key
        if inline:
            key, text = key.split("=", 1)
        _canonical(key, keys)  # the spelling first: an old hyphenated flag gets its hint, not a value error
        if inline:
            i += 1
        elif i + 1 >= len(args) or args[i + 1].startswith("--"):
            if key in keys and keys[key].kind == "bool":
                pairs.append((key, True))
                i += 1
                continue
            raise ConfigError(f"option --{key} needs a value (--{key} VALUE)")
        else:
            text = args[i + 1]
            i += 2
        pairs.append((key, parse_value(text)))
    return pairs


def _canonical(key: str, keys: Mapping[str, Key] = KEYS) -> list[str]:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad config key {key!r}")
    if parts[0] in RENAMED:
        raise ConfigError(f"unknown option --{key}: it is now spelled {RENAMED[parts[0]]}")
    if "-" in parts[0]:
        hint = parts[0].replace("-", "_")
        hint = f" (did you mean --{hint}?)" if hint in keys else ""
        raise ConfigError(f"unknown option --{key}: options are spelled like the config keys, with underscores{hint}")
    return parts


def apply_overrides(cfg: dict, overrides: Iterable[tuple[str, Any]], keys: Mapping[str, Key] = KEYS,
                    problems: list[str] | None = None) -> dict:
    """Set each dotted key of ``overrides`` in a copy of ``cfg``; only ``keys`` and dict sub-keys.
    A bad override raises :class:`ConfigError`, or with a ``problems`` list is appended to it and skipped."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides:
        try:
            _override(cfg, key, value, keys)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return cfg


def _override(cfg: dict, key: str, value: Any, keys: Mapping[str, Key]) -> None:
    parts = _canonical(key, keys)
    if parts[0] not in keys:
        raise ConfigError(f"unknown config key {parts[0]!r} (in --{key}); known keys: {', '.join(keys)}")
    if len(parts) > 1 and keys[parts[0]].kind != "dict":
        raise ConfigError(f"--{key}: {parts[0]!r} is not a mapping, so it has no sub-key {'.'.join(parts[1:])!r}")
    node = cfg
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--{key}: {p!r} holds {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def check(key: str, value: Any, keys: Mapping[str, Key] = KEYS) -> Any:
    """``value`` checked and coerced for config key ``key`` (:class:`ConfigError` naming the key)."""
    if key not in keys:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(keys)}")
    spec = keys[key]
    if value is None:
        if spec.optional:
            return None
        if spec.default is None:
            raise ConfigError(f"config key {key!r} is required ({spec.help})")
        raise ConfigError(f"config key {key!r} must not be null")
    kind = spec.kind
    if kind == "str":
        if isinstance(value, (bool, dict, list)):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        value = str(value)
        if not value:
            raise ConfigError(f"config key {key!r} must not be empty")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"config key {key!r} must be one of {list(spec.choices)}, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if kind == "list":  # the command checks the items (e.g. the translation command's tasks)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return list(value)
    if kind == "dict":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {key!r} must be a mapping with string keys, got {value!r}")
        return dict(value)
    # numbers; YAML 1.1 reads 1e-3 (no dot) as a string, so numeric strings are accepted
    if isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"config key {key!r} must be >= {spec.minimum}, got {value!r}")
    if spec.below is not None and value >= spec.below:
        raise ConfigError(f"config key {key!r} must be < {spec.below}, got {value!r}")
    if key in ("lr", "grad_clip") and value == 0:
        raise ConfigError(f"config key {key!r} must be > 0, got 0")
    return value


def validate(cfg: Mapping, keys: Mapping[str, Key] = KEYS) -> dict:
    """Check every key of ``cfg`` (all of ``keys``, default :data:`KEYS`, no others) and coerce its type."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(cfg).__name__}")
    problems = []
    unknown = [k for k in cfg if k not in keys]
    if unknown:
        problems.append(f"unknown config key(s) {unknown}; known keys: {', '.join(keys)}")
    full = default_config(keys)
    full.update(cfg)
    out = {}
    for k in keys:
        try:
            out[k] = check(k, full[k], keys)
        except ConfigError as e:
            problems.append(str(e))
    raise_all(problems)
    return out


def raise_all(problems: Sequence[str]) -> None:
    """One :class:`ConfigError` listing every problem (nothing when there is none)."""
    if not problems:
        return
    if len(problems) == 1:
        e = ConfigError(problems[0])
    else:
        e = ConfigError(f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems))
    e.problems = list(problems)
    raise e


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file into a dict (an empty file gives ``{}``)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] | Iterable[tuple[str, Any]] = (),
    base: Mapping | None = None, keys: Mapping[str, Key] = KEYS,
) -> dict:
    """Defaults, then ``base`` (a command's own defaults), then the YAML file at ``path`` (if any),
    then overrides; validated.

    ``overrides`` is either raw command-line words (``["--lr", "0.01"]``) or ``(key, value)`` pairs;
    ``keys`` is the command's schema (default :data:`KEYS`, the image commands').
    """
    overrides = list(overrides)
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides, keys)
    if path is not None and os.path.isdir(path):
        raise ConfigError(f"--config {str(path)!r} is a directory, not a YAML file")
    cfg = read_yaml(path) if path is not None else {}
    problems = []
    unknown = [k for k in cfg if k not in keys]
    if unknown:  # named with the file, and listed with every other problem
        problems.append(f"config file {str(path)!r}: unknown key(s) {unknown}; known keys: {', '.join(keys)}")
        cfg = {k: v for k, v in cfg.items() if k not in unknown}
    checked = None
    try:
        checked = validate(apply_overrides({**(base or {}), **cfg}, overrides, keys, problems), keys)
    except ConfigError as e:
        problems.extend(getattr(e, "problems", [str(e)]))
    raise_all(problems)
    return checked


def config_source(config: str | os.PathLike | None, resume: str | os.PathLike | None):
    """The YAML file a training command reads: ``config``, or ``<resume>/config.yaml`` when it
    resumes a run (the two exclude each other; :class:`ConfigError` otherwise)."""
    if resume is None:
        return config
    if config is not None:
        raise ConfigError("give --config or --resume, not both (a resumed run uses RUN_DIR/config.yaml)")
    path = os.path.join(resume, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {str(resume)!r}: no config.yaml there (not a run directory)")
    return path


def warmup_steps(cfg: Mapping, steps_per_epoch: int) -> int:
    """The warm-up length in optimizer steps: ``warmup_steps`` when set, else ``warmup_epochs``
    epochs of ``steps_per_epoch`` (rounded)."""
    if cfg.get("warmup_steps") is not None:
        return int(cfg["warmup_steps"])
    return round(cfg["warmup_epochs"] * steps_per_epoch)


def dump_config(cfg: Mapping, keys: Mapping[str, Key] = KEYS) -> str:
    """The config as YAML text, keys in schema order."""
    return yaml.safe_dump({k: cfg[k] for k in keys if k in cfg}, sort_keys=False, default_flow_style=False)


def given_keys(overrides: Iterable[tuple[str, Any]]) -> set[str]:
    """The top-level config keys that parsed command-line ``overrides`` set (``model_args`` for
    ``--model_args.dim``): the options a user asked for by name."""
    return {key.split(".")[0] for key, _ in overrides}


def check_resume_config(run_dir: str | os.PathLike, stored: Mapping, cfg: Mapping, fixed: Iterable[str],
                        normalise: Mapping[str, Any] | None = None) -> None:
    """Refuse a resumed run whose config ``cfg`` changes a key that the run directory fixes.

    ``stored`` is the run's own config (``RUN_DIR/config.yaml``, validated) and ``fixed`` the keys
    that cannot change: those the run's files decide (model and weights, data split, tokenizer,
    run location), those the saved optimizer state would silently override (learning rate, weight
    decay, betas) and those that decide the sequence of batches. ``normalise`` maps a key to a
    function that puts a value in the form ``stored`` holds it (a data path made absolute).
    Raises :class:`ConfigError` naming every such key with both values, before anything is written."""
    normalise = normalise or {}
    problems = []
    for key in fixed:
        if key not in cfg or key not in stored:
            continue
        norm = normalise.get(key, lambda v: v)
        old, new = norm(stored[key]), norm(cfg[key])
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):  # name the sub-keys that differ
            changes = [(f"{key}.{k}", old.get(k, "unset"), new.get(k, "unset")) for k in sorted({*old, *new}, key=str)
                       if old.get(k, "unset") != new.get(k, "unset")]
        else:
            changes = [(key, old, new)]
        problems.extend(f"--resume {str(run_dir)!r}: {name} is fixed by the run ({a!r}), got {b!r}; start a new run "
                        f"to change it" for name, a, b in changes)
    raise_all(problems)


def check_warmup_option(cfg: Mapping, given: Iterable[str]) -> list[str]:
    """The problem (in a list; empty if none) of a ``--warmup_epochs`` given while ``warmup_steps``
    is set, which replaces it: the option would do nothing."""
    if "warmup_epochs" in set(given) and cfg.get("warmup_steps") is not None:
        return [f"--warmup_epochs does nothing while warmup_steps is set ({cfg['warmup_steps']}); add "
                f"--warmup_steps null to use it"]
    return []


def command_parser(prog: str, description: str, keys: Mapping[str, Key]):
    """The parser of a command whose config is ``--config YAML`` plus every key of ``keys`` as
    ``--key value`` (parsed by :func:`parse_command`): the keys listed in its help."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog=keys_help(keys) + "\n\nexit status: 0 on success, 2 on a bad config or missing data.",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", metavar="YAML", help="config file (omitted keys take their defaults)")
    return parser


def parse_command(parser, argv: Sequence[str] | None, keys: Mapping[str, Key]) -> dict:
    """The validated config of a :func:`command_parser` command line: the ``--config`` file's
    keys, then the ``--key value`` overrides (ConfigError naming every problem)."""
    args, rest = parser.parse_known_args(argv)
    return load_config(config_source(args.config, None), parse_overrides(rest, keys), keys=keys)
