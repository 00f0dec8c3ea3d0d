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

Head sizes: any ``head_dim`` <= 256 (BLOOM-1b1 has 96); the kernels walk the head dimension as the next power of
two (at least 16) with the extra columns masked, and compile the power-of-two sizes without any column mask.

Masking matches the engine's SDPA path: a slot is attended when it is below ``write_index`` and not padding;
the new token always attends to itself. CUDA + Triton, 16-bit caches only (fp32 would run the dots in TF32).
Under Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are first imported) the same kernels
run on CPU tensors, fp16 or fp32 (the interpreter's fp32 dots are exact): the CPU tests check them that way.
"""
from __future__ import annotations

import functools
import os

import torch

# slots per program (the engine aligns its cache length to 64), slots per tile inside a program, warps and
# pipeline stages of the chunk kernel; INTEROP_DECODE_ATTENTION="chunk,block_n,warps,stages" overrides
CHUNK, BLOCK_N, WARPS, STAGES = (int(v) for v in os.environ.get("INTEROP_DECODE_ATTENTION", "64,64,4,2").split(","))
ROWS = 16  # query heads per group, padded (tl.dot needs 16 rows)
MAX_HEAD_DIM = 256  # the head dimension lives in registers: [ROWS, padded head_dim] fp32 accumulators
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
    """Whether ``pairs`` (rows x kv-groups) programs run the single-pass kernel on ``device`` (the interpreter on
    the CPU: the single pass, fewer programs to interpret)."""
    if SINGLE_PASS is not None:
        return SINGLE_PASS
    if device.type != "cuda":
        return True
    return pairs >= _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Triton is installed and there is somewhere to run its kernels (CUDA, or the interpreter)."""
    return (torch.cuda.is_available() or interpreting()) and _triton_installed()


def supported(cache: torch.Tensor, heads_per_group: int, head_dim: int) -> bool:
    """Whether a layer cache ``[2, B, G, L, D]`` can use these kernels: 16-bit on CUDA; fp16 or fp32 on the CPU
    under the interpreter (which holds bf16 as raw uint16 bits and multiplies those in ``tl.dot``); contiguous, at
    most ROWS query heads per kv-group, any head size up to MAX_HEAD_DIM."""
    if cache.is_cuda:
        device_ok = cache.dtype in (torch.bfloat16, torch.float16)
    else:
        device_ok = interpreting() and cache.dtype in (torch.float16, torch.float32)
    return (available() and device_ok and cache.is_contiguous() and heads_per_group <= ROWS
            and 0 < head_dim <= MAX_HEAD_DIM and cache.size(3) % CHUNK == 0)


def padded_head_dim(head_dim: int) -> int:
    """The head dimension as the kernels walk it: the next power of two (``tl.arange``), at least 16 (``tl.dot``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


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
    dp = padded_head_dim(d)
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
                         pad_u8.stride(0), scale, R=r, D=d, DP=dp, BLOCK_N=SINGLE_BLOCK_N, ROWS=ROWS,
                         ROW_TABLE=table, ALIBI=alibi, num_warps=SINGLE_WARPS, num_stages=SINGLE_STAGES)
        return out
    o = torch.empty((b * g * nchunk * ROWS, dp), dtype=torch.float32, device=dev)
    m = torch.empty((b * g * nchunk * ROWS,), dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    out = torch.empty((b, g * r * d), dtype=q.dtype, device=dev)
    partials[(b * g, nchunk)](q, cache, pad_u8, write_index, rows, slopes, o, m, l_sum, g, length, q.stride(0),
                              q.stride(1), q.stride(2), pad_u8.stride(0), scale, R=r, D=d, DP=dp, CHUNK=CHUNK,
                              BLOCK_N=BLOCK_N, ROWS=ROWS, NCHUNK=nchunk, ROW_TABLE=table, ALIBI=alibi,
                              num_warps=WARPS, num_stages=STAGES)
    combine[(b * g,)](q, kv_new, cache, write_index, o, m, l_sum, out, g, length, q.stride(0), q.stride(1),
                      q.stride(2), kv_new.stride(0), kv_new.stride(1), kv_new.stride(2), scale, R=r, D=d, DP=dp,
                      ROWS=ROWS, NCHUNK=nchunk)
    return out
