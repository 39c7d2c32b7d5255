"""Models by name for the training entry points: the gatezoo registry, the timm peers of the image
models, the translation peers (:mod:`gatezoo.train.peers.translation`), and model specs that carry their own
overrides.

A model spec is a name, optionally followed by ``:key=value,key=value`` constructor overrides
(values read as YAML), e.g. ``vit_tiny:ffn=xatglu1,depth=2``: side-by-side runs compare
variants of one preset without registering each.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from gatezoo.models import create_model, list_models

from ..peers import vision as peers
from .config import parse_value


def model_names() -> list[str]:
    """Every name :func:`build_model` accepts: the gatezoo registry, the timm peers, then the
    translation peers."""
    from ..peers import translation as mt_peers

    return list(list_models()) + peers.list_peers() + mt_peers.list_mt_peers()


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"vit_tiny:ffn=xatglu1,depth=2"`` -> ``("vit_tiny", {"ffn": "xatglu1", "depth": 2})``; a bare
    name has no overrides. Values cannot hold commas (pass lists through ``model_args``). Raises
    ``ValueError`` on a malformed spec."""
    if not isinstance(spec, str):
        raise TypeError(f"model must be a string, got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"model {spec!r}: expected NAME or NAME:key=value,key=value, got the item {item!r}")
        overrides[key.strip()] = parse_value(text.strip())
    if not name:
        raise ValueError(f"model {spec!r}: no model name before ':'")
    return name, overrides


def build_model(spec: str, **overrides) -> nn.Module:
    """Build a gatezoo registry model, timm peer or translation peer from a name or model spec,
    with constructor ``overrides`` (the spec's own overrides win over these; where both give a
    mapping, e.g. ``router_args``, the spec's keys are merged into it one level deep).

    Raises ``ValueError`` for an unknown name (listing the known ones) or a bad override.
    """
    name, own = parse_model_spec(spec)
    kwargs = {**overrides}
    for key, value in own.items():
        base = overrides.get(key)
        kwargs[key] = {**base, **value} if isinstance(base, Mapping) and isinstance(value, Mapping) else value
    if name in peers.list_peers():
        return peers.create_peer(name, **kwargs)
    if name in list_models():
        return create_model(name, **kwargs)
    from ..peers import translation as mt_peers

    if name in mt_peers.list_mt_peers():
        if "vocab_size" not in kwargs:
            raise ValueError(f"the translation peer {name!r} needs vocab_size=")
        return mt_peers.create_mt_peer(name, **kwargs)
    raise ValueError(f"model must be one of {model_names()} (optionally NAME:key=value,...), got {spec!r}")


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_problems(spec: str, overrides: dict, first: Exception) -> list[str]:
    """Every problem of ``overrides`` for model ``spec`` that building it reveals, ``first`` (the
    error of the first build) included: a model checks its arguments one at a time, so each
    argument an error names is put back to its default and the model built again (on the meta
    device, no memory), until it builds or an error names no argument given."""
    import torch

    problems, args = [str(first)], dict(overrides)
    for _ in range(len(args)):
        named = [k for k in args if problems[-1].startswith(k) or f" {k} " in problems[-1] or f"({k})" in problems[-1]]
        if not named:
            break
        for k in named:
            del args[k]
        try:
            with torch.device("meta"):
                build_model(spec, **args)
            break
        except (ValueError, TypeError) as e:
            if str(e) in problems:
                break
            problems.append(str(e))
    return problems
