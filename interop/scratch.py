"""Reused scratch buffers for the tensors a conversion makes (transposes, QKV regroups, TP merges).

Why: on the development VM a fresh page costs more than the copy that fills it (a transpose into a new 41 MB
tensor runs at 1.2–1.3 GB/s, into a reused one at 3.2–3.4 GB/s: zeroing, page faults and host faults of new
pages), and a streaming conversion makes thousands of such tensors, each freed a moment later. While a
:func:`pool` is active, :func:`empty` hands out a buffer that nothing refers to any more (torch's storage use
count: views, numpy arrays and writer jobs all hold a reference) instead of new memory; the pool holds at most
``max_bytes``, beyond that (or outside a pool, or below ``MIN_BYTES``) it is plain ``torch.empty``. A buffer is
never handed out while any tensor still refers to it, so the values seen are exactly those of fresh tensors.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch

MIN_BYTES = 1 << 20

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _refs(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


# what the count reads for a buffer only the pool holds (the storage object made to ask counts too)
_FREE = _refs(torch.empty(1, dtype=torch.uint8)) if _use_count is not None else None


class ScratchPool:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._bufs: list[torch.Tensor] = []
        self._size = 0
        self._lock = threading.Lock()
        self.reused = 0  # buffers handed out again (for tests)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if n < MIN_BYTES or _use_count is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = [b for b in self._bufs if b.numel() >= n and _refs(b) == _FREE]
            if free:
                buf = min(free, key=torch.Tensor.numel)
                self.reused += 1
            elif self._size + n <= self.max_bytes:
                buf = torch.empty(n, dtype=torch.uint8)
                self._bufs.append(buf)
                self._size += n
            else:
                return torch.empty(shape, dtype=dtype)
            return buf[:n].view(dtype).view(shape)


_ACTIVE: ScratchPool | None = None


@contextlib.contextmanager
def pool(max_bytes: int) -> Iterator[ScratchPool]:
    """Make :func:`empty` reuse buffers (process-wide, every thread) until the block ends."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, ScratchPool(max_bytes)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = outer


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; on the CPU from the active pool's free buffers where
    one is."""
    active = _ACTIVE
    if active is None or torch.device(device).type != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return active.empty(tuple(shape), dtype)


def copy(t: torch.Tensor) -> torch.Tensor:
    """``t.clone(memory_format=torch.contiguous_format)`` into a scratch buffer: a tensor of our own."""
    out = empty(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` whose copy (if one is needed) goes into a scratch buffer."""
    if t.is_contiguous() or t.device.type != "cpu":
        return t.contiguous()
    return copy(t)
