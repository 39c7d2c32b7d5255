"""Expert offloading for mixture-of-experts inference (the system half of Pre-gated MoE).

Hwang et al. 2024, "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable
Mixture-of-Expert Inference": when layer l's router of layer l + 1 (the pre-gate, see
:func:`gatezoo.blocks.link_pregated`) has chosen layer l + 1's experts while layer l still runs,
those experts can be fetched from a slow, large memory while layer l computes, so a model runs
with only a few experts in fast memory at a time.

Here the experts of every :class:`~gatezoo.blocks.MoEFeedForward` of a model leave the model:
:func:`save_experts` writes them to a safetensors file (the slow tier), and
:func:`offload_experts` frees the layers' expert weights and serves them from a cache of
``cache_experts`` expert slots (the fast tier), filled from the slow tier by one of two policies:

* ``"on_demand"``: a layer fetches each of its experts that is not cached when it runs, and waits;
* ``"prefetch"``: the pre-gate of layer l hands layer l + 1's routing to the cache, which starts
  fetching the missing experts at once on a background thread, while layer l's experts (and
  layer l + 1's attention) compute; layer l + 1 then waits only for what has not arrived.
  Layers without a pre-gate (the first of each stack) fetch on demand.

(The third policy of the benchmark, all experts resident, is the model without offloading.) A
cache slot is reused least-recently-used first, never while its expert is reserved for the
layer running or for the layer prefetched. A layer that needs more experts than the cache holds
computes them in runs of consecutive experts, each run once its experts are in.

The slow tiers (``tier``) on a CPU machine:

* ``"disk"``: the safetensors file itself, read with ``pread`` into the cache slot; after every
  read the page cache of the bytes read is dropped (``posix_fadvise(DONTNEED)``), so that every
  fetch reaches the storage device rather than the kernel's copy in memory;
* ``"throttled"``: a copy of the file in memory, copied into the slot and then held until
  ``bytes / bandwidth`` seconds have passed since the copy began: a link of a set bandwidth.

Outputs equal the all-resident model's bit for bit: the experts' feed-forward makes the same
calls, on the same rows in the same order, and adds the experts' outputs into each token in the
same order (:func:`gatezoo.kernels.routing.torch_path.ffn_blocks_forward`) as the torch backend
of :func:`gatezoo.kernels.expert_ffn` does on the resident weights. That backend walks the
experts in blocks of about a million hidden elements (all of a layer's experts at once for a
short input) and applies the activation to a block at a time; the cache computes a block whole
when it can hold the block's experts at once. When it cannot (``stats.split_blocks``), the block
is computed in parts, and the activation, which ATen vectorises over a part's elements with a
scalar tail, may round some elements differently in the last bit. Offloaded
layers run inference only (no gradients), in eval mode, without a norm between the experts'
projections; the model must live on the CPU (a CUDA version, with pinned CPU memory as the slow
tier, is not built: there was no GPU to test it on).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from gatezoo.blocks.moe import MoEFeedForward
from gatezoo.kernels.activation import get_kind
from gatezoo.kernels.routing.torch_path import _compute_dtype, expert_blocks, ffn_blocks_forward

__all__ = ["POLICIES", "TIERS", "ExpertOffload", "OffloadStats", "expert_bytes", "moe_layers_of", "offload_experts",
           "save_experts"]

POLICIES = ("on_demand", "prefetch")
TIERS = ("disk", "throttled")
_PARTS = ("w1", "w2", "b1", "b2")
_FORMAT = "gatezoo-experts/1"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def moe_layers_of(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """The (name, layer) of every :class:`~gatezoo.blocks.MoEFeedForward` of ``model``, in
    module order (the order their experts are stored in)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def _parts(layer: MoEFeedForward) -> dict[str, torch.Tensor]:
    return {p: getattr(layer, p) for p in _PARTS if getattr(layer, p) is not None}


def expert_bytes(layer: MoEFeedForward) -> int:
    """Bytes of one expert of ``layer`` (its w1, w2 and biases)."""
    return sum(t[0].numel() * t.element_size() for t in _parts(layer).values())


def save_experts(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the experts of every MoE layer of ``model`` to the safetensors file ``path``: one
    tensor per expert and part, named ``"<layer>.<expert>.<part>"`` (layer and expert numbers
    zero-padded), the layers' module names in the metadata. Returns the bytes of the experts."""
    from safetensors.torch import save_file

    layers = moe_layers_of(model)
    if not layers:
        raise ValueError("model has no MoEFeedForward layer: there are no experts to save")
    tensors = {}
    for i, (_, layer) in enumerate(layers):
        for part, t in _parts(layer).items():
            for e in range(layer.num_experts):
                tensors[f"{i:03d}.{e:04d}.{part}"] = t[e].detach().to("cpu").contiguous()
    meta = {"format": _FORMAT, "layers": json.dumps([name for name, _ in layers])}
    save_file(tensors, os.fspath(path), metadata=meta)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _read_header(path: str) -> tuple[int, dict, dict]:
    """``(start of the data, {name: (dtype, shape, begin, end)}, metadata)`` of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"path {path!r} is not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", {}) or {}
    entries = {name: (info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for name, info in header.items()}
    return 8 + size, entries, meta


class _DiskTier:
    """Experts read from the file with ``pread``, the page cache of every read dropped after it."""

    name = "disk"

    def __init__(self, path: str, start: int, entries: dict, drop_cache: bool):
        self.fd = os.open(path, os.O_RDONLY)
        self.start, self.entries, self.drop_cache = start, entries, drop_cache
        if drop_cache:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, names: list[str], dsts: list[torch.Tensor]) -> int:
        spans = sorted((self.entries[n][2], self.entries[n][3], d) for n, d in zip(names, dsts))
        total = 0
        i = 0
        while i < len(spans):  # one preadv per run of adjacent tensors
            begin, end, bufs = spans[i][0], spans[i][1], [spans[i][2]]
            i += 1
            while i < len(spans) and spans[i][0] == end:
                end = spans[i][1]
                bufs.append(spans[i][2])
                i += 1
            views = [memoryview(b.reshape(-1).view(torch.uint8).numpy()) for b in bufs]
            got = os.preadv(self.fd, views, self.start + begin)
            if got != end - begin:
                raise OSError(f"short read from the experts file: {got} of {end - begin} bytes at {begin}")
            if self.drop_cache:
                os.posix_fadvise(self.fd, self.start + begin, end - begin, os.POSIX_FADV_DONTNEED)
            total += got
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ThrottledTier:
    """A copy of the file in memory, copied out at ``bandwidth`` bytes per second at most."""

    name = "throttled"

    def __init__(self, path: str, bandwidth: float):
        from safetensors.torch import load_file

        self.tensors = load_file(path)
        self.bandwidth = bandwidth

    def read(self, names: list[str], dsts: list[torch.Tensor]) -> int:
        t0 = time.perf_counter()
        total = 0
        for n, d in zip(names, dsts):
            d.copy_(self.tensors[n])
            total += d.numel() * d.element_size()
        left = t0 + total / self.bandwidth - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return total

    def close(self) -> None:
        self.tensors = {}


@dataclass
class OffloadStats:
    """What the cache did since the last :meth:`ExpertOffload.reset_stats`.

    uses: experts needed by a layer run; hits: of those, already in the cache; prefetched: of
    those, fetched ahead by the pre-gate (whether or not they had arrived); fetched_at_use:
    fetched when the layer ran (on demand); fetched_bytes: bytes read from the slow tier
    (prefetches included, also those evicted before use); wait_s: time layers spent waiting for
    experts; resident_bytes: the cache's size (allocated at the start, the peak of resident
    expert bytes); split_blocks: blocks of experts (see the module docstring) computed in parts,
    because the cache could not hold their experts at once.
    """

    uses: int = 0
    hits: int = 0
    prefetched: int = 0
    fetched_at_use: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    wait_s: float = 0.0
    split_blocks: int = 0
    resident_bytes: int = 0
    per_layer_fetches: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_layer_fetches"}


class ExpertOffload:
    """The expert cache of a model whose experts were offloaded (use :func:`offload_experts`).

    Attributes: ``policy``, ``tier``, ``cache_experts`` (slots), ``stats`` (:class:`OffloadStats`).
    Call :meth:`close` when done: it stops the fetch thread, and with ``restore=True`` puts the
    experts back into the model from the file.
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike, *, cache_experts: int, policy: str = "prefetch",
                 tier: str = "disk", bandwidth: float | None = None, drop_cache: bool = True):
        path = os.fspath(path)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if tier == "throttled":
            if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < math.inf:
                raise ValueError(f"bandwidth must be a finite number of bytes per second > 0 with tier='throttled', "
                                 f"got {bandwidth!r}")
        elif bandwidth is not None:
            raise ValueError(f"bandwidth applies only to tier='throttled', got bandwidth={bandwidth!r} with "
                             f"tier={tier!r}")
        if isinstance(cache_experts, bool) or not isinstance(cache_experts, int) or cache_experts < 1:
            raise ValueError(f"cache_experts must be an int >= 1 (expert slots in fast memory), got {cache_experts!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path {path!r}: no such experts file (write one with save_experts(model, path))")
        self.layers = [layer for _, layer in moe_layers_of(model)]
        start, entries, meta = _read_header(path)
        self._check(model, path, entries, meta)
        first = self.layers[0]
        self.num_experts = first.num_experts
        self.expert_bytes = expert_bytes(first)
        """Bytes of one expert."""
        self.policy, self.tier, self.cache_experts = policy, tier, cache_experts
        self.path = path
        self._names = [[[f"{i:03d}.{e:04d}.{p}" for p in _parts(layer)] for e in range(layer.num_experts)]
                       for i, layer in enumerate(self.layers)]
        self._source = (_DiskTier(path, start, entries, drop_cache) if tier == "disk"
                        else _ThrottledTier(path, float(bandwidth)))
        # the fast tier: one pool tensor per part, a slot per cached expert
        self._pool = {p: torch.empty((cache_experts, *t.shape[1:]), dtype=t.dtype) for p, t in _parts(first).items()}
        self._slot_views = {p: pool.unbind(0) for p, pool in self._pool.items()}
        self._lru: OrderedDict = OrderedDict()  # (layer, expert) -> slot, least recently used first
        self._free = list(range(cache_experts - 1, -1, -1))
        self._loading: dict = {}  # (layer, expert) -> Future of its fetch
        self._reserved: dict = {}  # layer -> keys reserved for its next run
        self._prefetched: set = set()  # keys fetched ahead by a pre-gate, not used yet
        self._demand: set = set()  # keys being fetched for the layer that runs now
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="gatezoo-expert-fetch") if policy == "prefetch"
                        else None)
        self.reset_stats()
        for i, layer in enumerate(self.layers):
            for p in _parts(layer):  # the experts leave the model: empty parameters of the dtype
                getattr(layer, p).data = torch.empty(0, dtype=self._pool[p].dtype)
            object.__setattr__(layer, "_offload", self)
            layer._offload_index = i

    def _check(self, model, path, entries, meta) -> None:
        if not self.layers:
            raise ValueError("model has no MoEFeedForward layer: there are no experts to offload")
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path {path!r} is not an experts file of save_experts (no {_FORMAT!r} format tag)")
        names = json.loads(meta.get("layers", "[]"))
        mine = [name for name, _ in moe_layers_of(model)]
        if names != mine:
            raise ValueError(f"path {path!r} holds the experts of layers {names}, but the model's MoE layers are "
                             f"{mine}")
        first = {p: tuple(t.shape) for p, t in _parts(self.layers[0]).items()}
        dtype = self.layers[0].w1.dtype
        for i, layer in enumerate(self.layers):
            if layer.training:
                raise ValueError(f"offloaded experts run inference only: call model.eval() first (layer {mine[i]!r} "
                                 "is in training mode)")
            if not isinstance(layer.norm, nn.Identity):
                raise ValueError(f"layer {mine[i]!r} has a norm between its experts' projections, which offloading "
                                 "does not run")
            if layer.w1.device.type != "cpu":
                raise ValueError(f"offloading needs the model on the CPU (layer {mine[i]!r} is on {layer.w1.device}); "
                                 "the CUDA version is not built")
            shapes = {p: tuple(t.shape) for p, t in _parts(layer).items()}
            if shapes != first or layer.w1.dtype != dtype:
                raise ValueError(f"every MoE layer must have the same expert shapes and dtype to share the cache; "
                                 f"layer {mine[i]!r} has {shapes} ({layer.w1.dtype}), layer {mine[0]!r} {first} "
                                 f"({dtype})")
            if getattr(layer, "_offload", None) is not None:
                raise ValueError(f"layer {mine[i]!r} is offloaded already (close that ExpertOffload first)")
            for e in range(layer.num_experts):
                for p, t in _parts(layer).items():
                    entry = entries.get(f"{i:03d}.{e:04d}.{p}")
                    if entry is None or entry[1] != tuple(t.shape[1:]) or _DTYPES.get(entry[0]) != t.dtype:
                        raise ValueError(f"path {path!r} has no {p} of expert {e} of layer {mine[i]!r} with shape "
                                         f"{tuple(t.shape[1:])} and dtype {t.dtype}; was it saved from this model?")

    # --- the cache ---------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents stay)."""
        self.stats = OffloadStats(resident_bytes=self.cache_experts * self.expert_bytes,
                                  per_layer_fetches=[0] * len(self.layers))

    def clear(self) -> None:
        """Empty the cache (waiting for fetches under way), as at the start."""
        for fut in list(self._loading.values()):
            fut.result()
        self._loading.clear()
        self._lru.clear()
        self._reserved.clear()
        self._prefetched.clear()
        self._demand.clear()
        self._free = list(range(self.cache_experts - 1, -1, -1))

    def _fetch(self, key, slot: int) -> int:
        i, e = key  # the names of an expert's parts are in the pool's order of parts
        return self._source.read(self._names[i][e], [views[slot] for views in self._slot_views.values()])

    def _victim(self, protect) -> int | None:
        """A slot to fill: a free one, else the least recently used expert's that is not
        reserved, loading, or in ``protect``; None when every slot is taken."""
        if self._free:
            return self._free.pop()
        pinned = set().union(*self._reserved.values()) if self._reserved else set()
        for key, slot in self._lru.items():
            if key not in pinned and key not in self._loading and key not in protect:
                del self._lru[key]
                return slot
        return None

    def _place(self, key, slot: int) -> None:
        """Record ``key`` as fetched into ``slot`` (its fetch about to start)."""
        self._lru[key] = slot
        self.stats.fetches += 1
        self.stats.per_layer_fetches[key[0]] += 1

    def _start(self, key, slot: int) -> None:
        """Fetch ``key`` into ``slot`` on the fetch thread."""
        self._place(key, slot)
        self._loading[key] = self._thread.submit(self._fetch, key, slot)

    def prefetch(self, layer: MoEFeedForward, routing) -> None:
        """Called by the pre-gate of the layer before ``layer`` with ``layer``'s routing: start
        fetching its missing experts (only with ``policy="prefetch"``)."""
        if self._thread is None:
            return
        i = layer._offload_index
        idx = routing.indices if routing.keep is None else routing.indices[routing.keep]
        keys = [(i, int(e)) for e in torch.unique(idx).tolist()]
        reserved = self._reserved.setdefault(i, set())
        for key in keys:
            if key in self._lru:
                reserved.add(key)
                self._lru.move_to_end(key)
                continue
            slot = self._victim(protect=reserved)
            if slot is None:  # no room: the rest is fetched when the layer runs
                break
            reserved.add(key)
            self._start(key, slot)
            self._prefetched.add(key)

    def claim(self, layer: MoEFeedForward, plan) -> None:
        """Called when ``layer`` has its dispatch plan, before its pre-gate: reserve its cached
        experts; with ``policy="prefetch"`` also start fetching its missing ones (a layer that
        no pre-gate served: the first of a stack), ahead of the next layer's prefetch."""
        i = layer._offload_index
        needed = [(i, e) for e, c in enumerate(plan.counts.tolist()) if c]
        reserved = self._reserved[i] = {key for key in needed if key in self._lru}
        for key in reserved:
            self._lru.move_to_end(key)
        if self._thread is None:
            return
        for key in needed:
            if key in self._lru:
                continue
            slot = self._victim(protect=reserved)
            if slot is None:
                break
            reserved.add(key)
            self._start(key, slot)
            self._demand.add(key)

    def _settle(self, key) -> None:
        """Wait for the fetch of ``key`` if one is under way, and count its bytes."""
        fut = self._loading.pop(key, None)
        if fut is not None:
            t0 = time.perf_counter()
            self.stats.fetched_bytes += fut.result()
            self.stats.wait_s += time.perf_counter() - t0

    def _ready(self, key, protect) -> int | None:
        """The slot of ``key`` once its weights are in (fetching it now when missing); None when
        no slot can be freed for it."""
        st = self.stats
        st.uses += 1
        slot = self._lru.get(key)
        if slot is not None:
            if key in self._prefetched:
                self._prefetched.discard(key)
                st.prefetched += 1
            elif key in self._demand:
                self._demand.discard(key)
                st.fetched_at_use += 1
            else:
                st.hits += 1
            self._settle(key)
            self._lru.move_to_end(key)
            return slot
        slot = self._victim(protect)
        if slot is None:
            st.uses -= 1
            return None
        self._place(key, slot)
        t0 = time.perf_counter()
        st.fetched_bytes += self._fetch(key, slot)
        st.wait_s += time.perf_counter() - t0
        st.fetched_at_use += 1
        return slot

    def _make_room(self, i: int) -> None:
        """When no slot is free for layer ``i``'s next expert: drop every reservation but the
        run's own chunk (the other layers' prefetches and layer ``i``'s later experts, which are
        fetched again if evicted) and wait for every fetch under way."""
        for j in [j for j in self._reserved if j != i]:
            for key in self._reserved.pop(j):
                self._prefetched.discard(key)
        self._reserved.get(i, set()).clear()
        for key in list(self._loading):
            self._settle(key)
            self._demand.discard(key)

    def run(self, layer: MoEFeedForward, xf: torch.Tensor, weights: torch.Tensor, plan) -> torch.Tensor:
        """The experts' feed-forward of ``layer`` from the cache (see the module docstring)."""
        if torch.is_grad_enabled() and (xf.requires_grad or weights.requires_grad):
            raise RuntimeError("offloaded experts run inference only: call the model under torch.no_grad() or "
                               "torch.inference_mode()")
        i = layer._offload_index
        n = xf.shape[0]
        acc = _compute_dtype(xf.dtype)
        out = torch.zeros((n, layer.out_features), dtype=acc)
        bounds = plan.offsets.tolist()
        if bounds[-1] == 0:
            self._reserved.pop(i, None)
            return out.to(xf.dtype) + (weights.sum() * 0).to(xf.dtype)
        ws = weights.to(acc).reshape(-1).index_select(0, plan.order)
        spec = get_kind(layer.kind)
        alpha = None if layer.alpha is None else float(layer.alpha)
        width = self._pool["w1"].shape[2]
        reserved = self._reserved.setdefault(i, set())
        w = {p: [None] * (len(bounds) - 1) for p in self._pool}
        # the resident path's blocks of experts (expert_ffn's torch backend), each computed whole
        # when the cache holds its experts at once: the same activation calls on the same rows
        for lo, _, experts, rows in expert_blocks(bounds, width):
            todo, parts = list(zip(experts, rows)), 0
            while todo:
                part = []
                for e, _ in todo:
                    key = (i, e)
                    slot = self._ready(key, protect=reserved)
                    if slot is None and not part:
                        self._make_room(i)
                        slot = self._ready(key, protect=reserved)
                        if slot is None:
                            raise RuntimeError(f"the expert cache of {self.cache_experts} slots cannot take one "
                                               f"more expert for layer {i}")
                    if slot is None:
                        break
                    for p in self._pool:
                        w[p][e] = self._slot_views[p][slot]
                    reserved.add(key)
                    part.append(e)
                m = sum(r for _, r in todo[:len(part)])
                block = [(lo, lo + m, part, [r for _, r in todo[:len(part)]])]
                ffn_blocks_forward(xf, w["w1"], w["w2"], w.get("b1"), w.get("b2"), ws, plan.token, block, spec,
                                   layer.is_glu, alpha, out)
                for e in part:  # done with them: evictable for the rest of this run
                    reserved.discard((i, e))
                    for p in self._pool:
                        w[p][e] = None
                lo += m
                todo = todo[len(part):]
                parts += 1
            self.stats.split_blocks += parts > 1
        self._reserved.pop(i, None)
        for key in [key for key in self._loading if key[0] == i]:  # fetched ahead, then not used
            self._settle(key)
            self._prefetched.discard(key)
            self._demand.discard(key)
        return out.to(xf.dtype)

    def close(self, restore: bool = False) -> None:
        """Stop the fetch thread and let go of the cache; with ``restore=True`` first put every
        expert back into its layer from the file, so the model runs as before offloading."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        self._loading.clear()
        if restore:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                for i, layer in enumerate(self.layers):
                    for p in _PARTS:
                        if getattr(layer, p) is None:
                            continue
                        getattr(layer, p).data = torch.stack([f.get_tensor(f"{i:03d}.{e:04d}.{p}")
                                                              for e in range(layer.num_experts)])
        for layer in self.layers:
            object.__setattr__(layer, "_offload", None)
        self._source.close()
        self._pool = {}
        self._slot_views = {}
        self._lru.clear()


def offload_experts(model: nn.Module, path: str | os.PathLike, *, cache_experts: int, policy: str = "prefetch",
                    tier: str = "disk", bandwidth: float | None = None, drop_cache: bool = True) -> ExpertOffload:
    """Serve the experts of every MoE layer of ``model`` (in eval mode, on the CPU) from the
    experts file ``path`` (written by :func:`save_experts` from this model) through a cache of
    ``cache_experts`` expert slots; the layers' own expert weights are freed.

    Args:
        policy: ``"prefetch"`` (fetch ahead on the pre-gate's routing: link the layers with
            :func:`~gatezoo.blocks.link_pregated`, or build the model with ``pregated=True``) or
            ``"on_demand"`` (fetch when a layer runs).
        tier: ``"disk"`` (pread from the file, its page cache dropped after every read when
            ``drop_cache``) or ``"throttled"`` (a copy in memory served at ``bandwidth``
            bytes per second).
    Returns the :class:`ExpertOffload`; ``close(restore=True)`` undoes it.
    """
    return ExpertOffload(model, path, cache_experts=cache_experts, policy=policy, tier=tier, bandwidth=bandwidth,
                         drop_cache=drop_cache)
