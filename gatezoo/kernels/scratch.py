"""Scratch buffers for the chunked PyTorch paths.

On CPU a fresh tensor of a few MiB is usually handed back to the OS when freed and
page-faulted in again at the next allocation, which costs more than the arithmetic done in it.
The chunk loops therefore keep their temporaries here, allocated once per call and reused by
every chunk.
"""

from __future__ import annotations

import torch


class Scratch:
    """Named buffers of one dtype and device; each grows to the largest size asked for. The view
    last handed out for a (key, shape) is kept, so that loops asking for the same shapes again
    (one chunk after another, expert after expert) do not pay for slicing and viewing each time."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.bufs: dict = {}
        self.views: dict = {}

    def get(self, key, *shape: int) -> torch.Tensor:
        """A contiguous view of buffer ``key`` with ``shape`` (contents undefined)."""
        buf = self.bufs.get(key)
        hit = self.views.get((key, shape))
        if hit is not None and hit[0] is buf:
            return hit[1]
        n = 1
        for s in shape:
            n *= s
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(n, dtype=self.dtype, device=self.device)
        view = buf[:n].view(shape)
        self.views[(key, shape)] = (buf, view)
        return view

    def like(self, key, t: torch.Tensor) -> torch.Tensor:
        """Buffer ``key`` shaped like ``t``."""
        return self.get(key, *t.shape)


def row_chunks(rows: int, per_row: int, device: torch.device, chunk_elements: int) -> list[slice]:
    """Row slices of about ``chunk_elements`` elements (``per_row`` each) on the CPU, one slice
    elsewhere (where chunking only adds launches)."""
    if device.type != "cpu":
        return [slice(None)]
    step = max(1, chunk_elements // max(per_row, 1))
    return [slice(r, r + step) for r in range(0, rows, step)]
