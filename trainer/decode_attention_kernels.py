"""The Triton kernels of :mod:`trainer.decode_attention` (imported only where Triton is; see that module for why).

Three kernels over one layer's cache ``[2 (K, V), B, G, L, D]`` (flat: K row ``(b * G + g) * L + slot`` of D
elements, V the same row ``B * G * L`` rows later), sharing three pieces: the program's query block, one tile of
slots (load K/V through the optional beam row table, online softmax) and the final merge with the new token.

ALiBi (``ALIBI``, BLOOM): a score gets ``slope_h · (slot − end)`` (``end``: the new token's slot) from a per-head
fp32 slope vector, computed per tile; no bias tensor. The new token's own distance is 0: ``_finish`` adds nothing.

Any head size ``D`` <= 256: ``tl.arange`` needs a power of two, so the head dimension is walked as ``DP`` (``D``
rounded up to a power of two, at least 16 for ``tl.dot``) with the columns ``>= D`` masked on every load and store
(BLOOM-1b1: D = 96, DP = 128). The padded columns of the query, K and V are 0, so they add nothing to a score and
stay 0 in the output. With ``D == DP`` (a ``constexpr`` test) no column mask is emitted: the power-of-two kernels
compile to exactly what they were.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _columns(row_mask, dims, D: tl.constexpr, DP: tl.constexpr):
    """The 2-D mask ``row_mask[:, None]``, restricted to the real head columns when D is padded to DP."""
    if D == DP:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (dims[None, :] < D)
    return mask


@triton.jit
def _load_vector(ptr, dims, D: tl.constexpr, DP: tl.constexpr):
    """One head vector (DP wide, the padded columns 0)."""
    if D == DP:
        vector = tl.load(ptr + dims)
    else:
        vector = tl.load(ptr + dims, mask=dims < D, other=0.0)
    return vector


@triton.jit
def _store_vector(ptr, dims, vector, D: tl.constexpr, DP: tl.constexpr):
    """Stores the real D columns of a DP-wide head vector."""
    if D == DP:
        tl.store(ptr + dims, vector)
    else:
        tl.store(ptr + dims, vector, mask=dims < D)


@triton.jit
def _query(q_ptr, b, g, stride_qb, stride_qg, stride_qr, R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
           ROWS: tl.constexpr):
    """The r query heads of kv-group g of row b, padded to ROWS rows (tl.dot needs 16) and DP columns."""
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DP)
    return tl.load(q_ptr + b * stride_qb + g * stride_qg + rows[:, None] * stride_qr + dims[None, :],
                   mask=_columns(rows < R, dims, D, DP), other=0.0)


@triton.jit
def _slopes(slopes_ptr, g, R: tl.constexpr, ROWS: tl.constexpr, ALIBI: tl.constexpr):
    """The ALiBi slopes of kv-group g's query heads (padded rows 0); zeros without ALiBi (never read then)."""
    rows = tl.arange(0, ROWS)
    if ALIBI:
        slope = tl.load(slopes_ptr + g * R + rows, mask=rows < R, other=0.0)
    else:
        slope = tl.zeros((ROWS,), dtype=tl.float32)
    return slope


@triton.jit
def _empty(ROWS: tl.constexpr, DP: tl.constexpr):
    """(running max, running sum, unnormalised output) before any slot."""
    return (tl.full((ROWS,), float("-inf"), dtype=tl.float32), tl.zeros((ROWS,), dtype=tl.float32),
            tl.zeros((ROWS, DP), dtype=tl.float32))


@triton.jit
def _tile(q, cache_ptr, rows_ptr, pad_ptr, b, g, slots, end, G, L, stride_pad, scale, slope, m_i, l_i, acc,
          D: tl.constexpr, DP: tl.constexpr, ROW_TABLE: tl.constexpr, EARLY_V: tl.constexpr, ALIBI: tl.constexpr):
    """Online-softmax update of (running max, sum, unnormalised output) with the filled slots among ``slots``.

    K, V and the padding flags depend on the fill level only; padding is applied to the scores. EARLY_V issues
    the V load together with K's (the single-pass kernel: few programs, each must keep loads in flight); without
    it V is loaded after the scores (the chunk kernel: many short programs, fewer live registers per program
    keep more of them resident — 1 µs per layer faster at batch 16). With ROW_TABLE (beam search) slot s is read
    from the cache row that wrote it. With ALIBI, ``slope`` [ROWS] times (slot − end) is added to the scores."""
    dims = tl.arange(0, DP)
    filled = slots < end
    if ROW_TABLE:
        src = tl.load(rows_ptr + b * L + slots, mask=filled, other=0).to(tl.int64)
    else:
        src = tl.zeros_like(slots).to(tl.int64) + b
    k_ptrs = cache_ptr + ((src * G + g) * L + slots)[:, None] * D + dims[None, :]
    kv_mask = _columns(filled, dims, D, DP)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if EARLY_V:
        v = tl.load(k_ptrs + tl.num_programs(0) * L * D, mask=kv_mask, other=0.0)
    padded = tl.load(pad_ptr + b * stride_pad + slots, mask=filled, other=1)
    valid = filled & (padded == 0)
    s = tl.dot(q, tl.trans(k)) * scale
    if ALIBI:
        s += slope[:, None] * (slots - end).to(tl.float32)[None, :]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if not EARLY_V:
        v = tl.load(k_ptrs + tl.num_programs(0) * L * D, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _finish(q, kv_ptr, cache_ptr, out_ptr, b, g, end, G, L, stride_kv, stride_kvb, stride_kvg, scale, m_i, l_i,
            acc, R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr):
    """Adds the new token's own score and value (from the QKV output: nothing races the cache write), writes the
    normalised output and stores the new K/V at slot ``end`` of the row's own cache row."""
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DP)
    k_new = _load_vector(kv_ptr + b * stride_kvb + g * stride_kvg, dims, D, DP)
    v_new = _load_vector(kv_ptr + stride_kv + b * stride_kvb + g * stride_kvg, dims, D, DP)
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale  # [ROWS]
    m_all = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_all)  # exp(-inf) = 0 where nothing earlier is attended
    w_new = tl.exp(s_new - m_all)
    out = (acc * alpha[:, None] + w_new[:, None] * v_new.to(tl.float32)[None, :]) / (l_i * alpha + w_new)[:, None]
    tl.store(out_ptr + b * (G * R * D) + (g * R + rows[:, None]) * D + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=_columns(rows < R, dims, D, DP))
    k_cache = cache_ptr + ((b * G + g) * L + end) * D
    _store_vector(k_cache, dims, k_new, D, DP)
    _store_vector(k_cache + tl.num_programs(0) * L * D, dims, v_new, D, DP)


@triton.jit
def single(q_ptr, kv_ptr, cache_ptr, pad_ptr, w_ptr, rows_ptr, slopes_ptr, out_ptr,
           G, L, stride_qb, stride_qg, stride_qr, stride_kv, stride_kvb, stride_kvg, stride_pad, scale,
           R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
           ROW_TABLE: tl.constexpr, ALIBI: tl.constexpr):
    """Grid (B * G,): one program walks all filled slots of its (row, kv-group), then finishes."""
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    end = tl.load(w_ptr)  # slots [0, end) are filled; slot ``end`` is the new token
    q = _query(q_ptr, b, g, stride_qb, stride_qg, stride_qr, R, D, DP, ROWS)
    slope = _slopes(slopes_ptr, g, R, ROWS, ALIBI)
    m_i, l_i, acc = _empty(ROWS, DP)
    for start in range(0, end, BLOCK_N):
        m_i, l_i, acc = _tile(q, cache_ptr, rows_ptr, pad_ptr, b, g, start + tl.arange(0, BLOCK_N), end, G, L,
                              stride_pad, scale, slope, m_i, l_i, acc, D, DP, ROW_TABLE, True, ALIBI)
    _finish(q, kv_ptr, cache_ptr, out_ptr, b, g, end, G, L, stride_kv, stride_kvb, stride_kvg, scale, m_i, l_i,
            acc, R, D, DP, ROWS)


@triton.jit
def partials(q_ptr, cache_ptr, pad_ptr, w_ptr, rows_ptr, slopes_ptr, o_ptr, m_ptr, l_ptr,
             G, L, stride_qb, stride_qg, stride_qr, stride_pad, scale,
             R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
             ROWS: tl.constexpr, NCHUNK: tl.constexpr, ROW_TABLE: tl.constexpr, ALIBI: tl.constexpr):
    """Grid (B * G, NCHUNK): flash-decoding over one chunk of slots (chunks past the fill level exit at once);
    stores the chunk's running max, sum and unnormalised output (DP columns a row) for ``combine``."""
    bg = tl.program_id(0)
    c = tl.program_id(1)
    b = bg // G
    g = bg % G
    end = tl.load(w_ptr)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DP)
    m_i, l_i, acc = _empty(ROWS, DP)
    start = c * CHUNK
    if start < end:
        q = _query(q_ptr, b, g, stride_qb, stride_qg, stride_qr, R, D, DP, ROWS)
        slope = _slopes(slopes_ptr, g, R, ROWS, ALIBI)
        for offset in range(0, CHUNK, BLOCK_N):
            m_i, l_i, acc = _tile(q, cache_ptr, rows_ptr, pad_ptr, b, g, start + offset + tl.arange(0, BLOCK_N),
                                  end, G, L, stride_pad, scale, slope, m_i, l_i, acc, D, DP, ROW_TABLE, False, ALIBI)
    part = (bg * NCHUNK + c) * ROWS
    tl.store(m_ptr + part + rows, m_i)
    tl.store(l_ptr + part + rows, l_i)
    tl.store(o_ptr + (part + rows[:, None]) * DP + dims[None, :], acc, mask=rows[:, None] < R)


@triton.jit
def combine(q_ptr, kv_ptr, cache_ptr, w_ptr, o_ptr, m_ptr, l_ptr, out_ptr,
            G, L, stride_qb, stride_qg, stride_qr, stride_kv, stride_kvb, stride_kvg, scale,
            R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr, NCHUNK: tl.constexpr):
    """Grid (B * G,): merges the chunks' partials into one running (max, sum, output), then finishes."""
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    end = tl.load(w_ptr)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DP)
    q = _query(q_ptr, b, g, stride_qb, stride_qg, stride_qr, R, D, DP, ROWS)
    m_i, l_i, acc = _empty(ROWS, DP)
    for c in range(NCHUNK):
        m_i = tl.maximum(m_i, tl.load(m_ptr + (bg * NCHUNK + c) * ROWS + rows))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    for c in range(NCHUNK):
        part = (bg * NCHUNK + c) * ROWS
        alpha = tl.exp(tl.load(m_ptr + part + rows) - m_safe)  # exp(-inf) = 0 for empty chunks
        l_i += alpha * tl.load(l_ptr + part + rows)
        acc += alpha[:, None] * tl.load(o_ptr + (part + rows[:, None]) * DP + dims[None, :],
                                        mask=rows[:, None] < R, other=0.0)
    # the sums are relative to m_safe, which is m_i unless no chunk attended anything (then they are 0)
    _finish(q, kv_ptr, cache_ptr, out_ptr, b, g, end, G, L, stride_kv, stride_kvb, stride_kvg, scale, m_i, l_i,
            acc, R, D, DP, ROWS)
