"""Decode attention for the fast engine: one new query token per row over a static KV cache, reading only the
filled slots, with the new token's K/V written into the cache by the same pass.

Why: in a batch-16 decode step attention is a pure read of the cache. SDPA over a fixed-shape cache must read
the attended length it was captured with (the engine rounds the filled length up and keeps one graph per
bucket), and the cache write is a kernel of its own. Here the number of filled slots is read on the device
(``write_index``), so one CUDA graph serves every step and no unfilled slot is read. The kernels (in
:mod:`trainer.decode_attention_kernels`, imported only where Triton is):

* ``partials`` (grid: batch x kv-group, slot chunk): flash-decoding over the slots ``[0, write_index)`` of its
  chunk (chunks past the fill level exit at once) — online softmax, unnormalised output, running max and sum
  per query head of the group (GQA: a group's query heads share each K/V tile);
* ``combine`` (grid: batch x kv-group): merges the chunks with the new token's own score and value (taken from
  the QKV output, not from the cache, so nothing races the write), writes the output and stores the new K/V at
  ``write_index``.

When the batch has at least one (row, kv-group) pair per SM, ``single`` does both in one pass instead: one program
per pair walks all its filled slots (a pipelined loop), then adds the new token and writes. The chunk partials and
the combine kernel cost ~3.5 µs per layer (GPT-2 1.3B, batch 16 on an H100: 17.2 vs 19.5 µs per layer at 256
filled slots); with fewer pairs than SMs the chunked kernels keep every SM streaming.

Beam search: with ``rows`` (an int32 [B, L] table) slot s of query row b is read from cache row ``rows[b, s]``,
the row that wrote it; the engine then reorders beams by gathering this table instead of moving the cache (which
cost two full copies of the filled cache per step). New K/V always go into the query's own row.

ALiBi (BLOOM): with ``slopes`` (fp32, one per query head) a score gets ``slope_h · (slot − write_index)``, computed
inside the kernels per tile (no ``[B, heads, L]`` bias tensor).

Masking matches the engine's SDPA path: a slot is attended when it is below ``write_index`` and not padding;
the new token always attends to itself. CUDA + Triton, 16-bit caches only (fp32 would run the dots in TF32).
"""
from __future__ import annotations

import functools
import os

import torch

# slots per program (the engine aligns its cache length to 64), slots per tile inside a program, warps and
# pipeline stages of the chunk kernel; INTEROP_DECODE_ATTENTION="chunk,block_n,warps,stages" overrides
CHUNK, BLOCK_N, WARPS, STAGES = (int(v) for v in os.environ.get("INTEROP_DECODE_ATTENTION", "64,64,4,2").split(","))
ROWS = 16  # query heads per group, padded (tl.dot needs 16 rows)
# the single-pass kernel's slots per tile, warps and stages (tuned like the above);
# INTEROP_DECODE_ATTENTION_SINGLE="block_n,warps,stages" overrides
SINGLE_BLOCK_N, SINGLE_WARPS, SINGLE_STAGES = (
    int(v) for v in os.environ.get("INTEROP_DECODE_ATTENTION_SINGLE", "64,8,2").split(","))
# None: single pass when (rows x kv-groups) >= the device's SM count; True / False force one kernel family
SINGLE_PASS: bool | None = None


@functools.lru_cache(maxsize=None)
def _kernels():
    """(partials, combine, single): imported on first use, since Triton is optional."""
    from trainer import decode_attention_kernels as k

    return k.partials, k.combine, k.single


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def single_pass(pairs: int, device: torch.device) -> bool:
    """Whether ``pairs`` (rows x kv-groups) programs run the single-pass kernel on ``device``."""
    if SINGLE_PASS is not None:
        return SINGLE_PASS
    return pairs >= _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supported(cache: torch.Tensor, heads_per_group: int, head_dim: int) -> bool:
    """Whether a layer cache ``[2, B, G, L, D]`` can use these kernels."""
    return (available() and cache.is_cuda and cache.dtype in (torch.bfloat16, torch.float16)
            and cache.is_contiguous() and heads_per_group <= ROWS and head_dim in (16, 32, 64, 128, 256)
            and cache.size(3) % CHUNK == 0)


def decode_attention(q: torch.Tensor, kv_new: torch.Tensor, cache: torch.Tensor, pad: torch.Tensor,
                     write_index: torch.Tensor, scale: float, rows: torch.Tensor | None = None,
                     slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [B, heads * D] of one token per row; stores ``kv_new`` at slot ``write_index``.

    ``q`` [B, G, r, D] (last dim contiguous), ``kv_new`` [2, B, G, 1, D] (last dim contiguous), ``cache`` one
    layer's [2, B, G, L, D], ``pad`` [B, >= L] bool (True = padding), ``write_index`` a 1-element int tensor.
    ``rows`` (beam search): optional contiguous int32 [B, L], the cache row that holds slot s of query row b
    (``rows[b, s]``), so that reordering beams moves this table instead of the cache; the new K/V always go
    into the query's own row. ``slopes`` (ALiBi): optional contiguous fp32 [heads], query head ``g * r + i``'s slope.
    """
    partials, combine, single = _kernels()
    _, b, g, length, d = cache.shape
    r = q.size(2)
    nchunk = length // CHUNK
    dev = q.device
    pad_u8 = pad.view(torch.uint8) if pad.dtype == torch.bool else pad
    table = rows is not None
    rows = rows if table else write_index  # never read without the table
    alibi = slopes is not None
    slopes = slopes if alibi else write_index  # never read without ALiBi
    if single_pass(b * g, dev):
        out = torch.empty((b, g * r * d), dtype=q.dtype, device=dev)
        single[(b * g,)](q, kv_new, cache, pad_u8, write_index, rows, slopes, out, g, length, q.stride(0),
                         q.stride(1), q.stride(2), kv_new.stride(0), kv_new.stride(1), kv_new.stride(2),
                         pad_u8.stride(0), scale, R=r, D=d, BLOCK_N=SINGLE_BLOCK_N, ROWS=ROWS, ROW_TABLE=table,
                         ALIBI=alibi, num_warps=SINGLE_WARPS, num_stages=SINGLE_STAGES)
        return out
    o = torch.empty((b * g * nchunk * ROWS, d), dtype=torch.float32, device=dev)
    m = torch.empty((b * g * nchunk * ROWS,), dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    out = torch.empty((b, g * r * d), dtype=q.dtype, device=dev)
    partials[(b * g, nchunk)](q, cache, pad_u8, write_index, rows, slopes, o, m, l_sum, g, length, q.stride(0),
                              q.stride(1), q.stride(2), pad_u8.stride(0), scale, R=r, D=d, CHUNK=CHUNK,
                              BLOCK_N=BLOCK_N, ROWS=ROWS, NCHUNK=nchunk, ROW_TABLE=table, ALIBI=alibi,
                              num_warps=WARPS, num_stages=STAGES)
    combine[(b * g,)](q, kv_new, cache, write_index, o, m, l_sum, out, g, length, q.stride(0), q.stride(1),
                      q.stride(2), kv_new.stride(0), kv_new.stride(1), kv_new.stride(2), scale, R=r, D=d, ROWS=ROWS,
                      NCHUNK=nchunk)
    return out
