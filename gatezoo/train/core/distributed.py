"""Data-parallel training under ``torchrun``: PyTorch's own DistributedDataParallel (or FSDP).

    torchrun --nproc_per_node=2 -m gatezoo.train.classify --config configs/vit_tiny.yaml
    torchrun --nproc_per_node=2 -m gatezoo.train.translate --config configs/transformer_mt_tiny.yaml
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m gatezoo.train.classify --config ...   # and node_rank=1 on the other

Every process builds the same model from the same seed, reads the same data and walks the same
batch order; each takes its own contiguous share of every batch (:func:`shard`), so the global
batch is the config's ``batch_size`` (``max_tokens`` for translation) whatever the number of
processes. The loss of each share is weighted by its share of the batch's items (images, target
tokens) before DistributedDataParallel averages the gradients, so N processes compute the
gradient of the same global mean loss as one process does, and reach the same parameters up to
float rounding. Mixture-of-experts layers count their load and form their balance and z-losses
over the whole global batch (:meth:`gatezoo.blocks.moe.MoELayers.set_process_group`), so they match too.

Only rank 0 evaluates and writes (run directory, metrics, checkpoints); the training sums in the
metrics (loss, accuracy, throughput, expert load) are reduced over the ranks first. The backend is
gloo on CPU and NCCL on CUDA (each process on ``cuda:LOCAL_RANK``). ``--fsdp`` shards parameters,
gradients and optimizer state with FSDP2's ``fully_shard`` (one unit per model); checkpoints are
still whole (gathered) so they load into one process.

What cannot match one process exactly: dropout, noisy top-k and Gumbel routers draw their noise per
process, and a ``capacity_factor`` caps each process's own share of the tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world`` processes (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True for the process that evaluates and writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when more than one process trains."""
        return self.world > 1


SINGLE = DistEnv()
"""The environment of a plain (not distributed) run."""


def launched() -> bool:
    """True when this process was started by ``torchrun`` (its ``WORLD_SIZE`` and ``RANK`` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") from None


def setup(device: torch.device) -> DistEnv:
    """Join the process group that ``torchrun`` describes (gloo for CPU, NCCL for CUDA) and return
    this process's :class:`DistEnv`; :data:`SINGLE` when not launched by torchrun. On CUDA the
    process uses ``cuda:LOCAL_RANK``: pass the returned env to :func:`device_for`."""
    if not launched():
        return SINGLE
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not fit "
                          f"(0 <= RANK < WORLD_SIZE)")
    if world == 1:
        return SINGLE
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return DistEnv(rank, world, local)


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a distributed CUDA run, else ``device``."""
    if env.active and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def teardown(env: DistEnv) -> None:
    """Leave the process group (no-op for a single process). On a normal exit every process
    first waits for the others, so that none closes its connections while another is still
    finishing the last collective (gloo aborts the latter with SIGABRT). Called while an
    exception propagates (from a ``finally``), it leaves at once: the other processes may never
    reach a barrier."""
    if env.active and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every process (no-op for a single process)."""
    if env.active:
        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's ``obj`` on every process (``obj`` itself for a single process)."""
    if not env.active:
        return obj
    box = [obj if env.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if not env.active:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def all_sum(env: DistEnv, values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the processes (float64)."""
    if not env.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def share(rows: int, env: DistEnv) -> slice:
    """This process's contiguous share of ``rows`` batch rows (the first ``rows % world`` ranks get one
    more). A batch with fewer rows than processes is an error naming ``batch_size``."""
    if rows < env.world:
        raise ConfigError(f"a batch of {rows} rows cannot be shared by {env.world} processes; raise batch_size "
                          f"(max_tokens for translation) or use fewer processes")
    base, extra = divmod(rows, env.world)
    start = env.rank * base + min(env.rank, extra)
    return slice(start, start + base + (env.rank < extra))


def shard(batch, env: DistEnv):
    """This process's share of ``batch``: a tensor, a tuple/list of tensors or a dataclass of
    tensors, cut along the first dimension (:func:`share`); unchanged for a single process."""
    if not env.active:
        return batch
    rows = _rows(batch)
    return _cut(batch, share(rows, env))


def _rows(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)):
        return _rows(batch[0])
    if dataclasses.is_dataclass(batch):
        return _rows(getattr(batch, dataclasses.fields(batch)[0].name))
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__} (tensor, tuple, list or dataclass expected)")


def _cut(batch, rows: slice):
    if batch is None:  # an optional field of a batch (a single-task batch has no task ids)
        return None
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(b, rows) for b in batch)
    return dataclasses.replace(batch, **{f.name: _cut(getattr(batch, f.name), rows) for f in dataclasses.fields(batch)})


def wrap(model: nn.Module, env: DistEnv, device: torch.device, fsdp: bool = False) -> nn.Module:
    """``model`` wrapped for data parallelism: DistributedDataParallel, or with ``fsdp`` FSDP2's
    ``fully_shard`` (sharded in place, returned as is). Mixture-of-experts layers are told to
    reduce their routing statistics over the process group. ``model`` itself for one process."""
    if not env.active:
        if fsdp:
            raise ConfigError("fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        return model
    from gatezoo.blocks.moe import moe_layers

    moe_layers(model).set_process_group(dist.group.WORLD)
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # torch < 2.6
            raise ConfigError(f"fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6): {e}") from None
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
