"""The Triton kernels of :mod:`trainer.kernels.qkv_rope`, :mod:`trainer.kernels.swiglu` and
:mod:`trainer.kernels.bias_gelu_grad` (imported only where Triton is; each of those modules says why and what).

All three are memory-bound elementwise passes over ``[tokens, width]`` activations: fp32 arithmetic inside, one
rounding to the output dtype on each store, 64-bit row offsets (the activations pass 2³¹ elements at 1B scale).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rope_rows(batch, n_tokens, HEADS: tl.constexpr, PER_GROUP: tl.constexpr, HALF: tl.constexpr,
               BLOCK: tl.constexpr, COLS: tl.constexpr):
    """This program's block of (token, packed head slot) rows: position, batch row, group, slot in the group,
    columns of a half head and the masks."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
    token, r = rows // HEADS, rows % HEADS
    c = tl.arange(0, COLS)[None, :]
    cmask = c < HALF
    mask = (rows < n_tokens * HEADS) & cmask
    return token // batch, token % batch, r, r // PER_GROUP, r % PER_GROUP, c, mask


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, pos, c, mask, HALF: tl.constexpr):
    """cos and sin at each row's position for the low and the high half of a head (activation dtype, to fp32)."""
    base = pos * 2 * HALF + c
    c1 = tl.load(cos_ptr + base, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + base, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def packed_rope_fwd(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, batch, n_tokens,
                    sx_s, sx_b, sq_s, sq_b, sk_s, sk_b, sv_s, sv_b,
                    HEADS: tl.constexpr, PER_GROUP: tl.constexpr, QPG: tl.constexpr, HALF: tl.constexpr,
                    BLOCK: tl.constexpr, COLS: tl.constexpr):
    """``BLOCK`` packed head slots (slot ``r`` of a token: group ``r // PER_GROUP``; query slots ``< QPG``, then
    the key, then the value) per program, rotated (query, key) or copied (value) to their own tensors."""
    pos, b, r, g, j, c, mask = _rope_rows(batch, n_tokens, HEADS, PER_GROUP, HALF, BLOCK, COLS)
    src = x_ptr + pos * sx_s + b * sx_b + r * (2 * HALF) + c
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c1, c2, s1, s2 = _rope_tables(cos_ptr, sin_ptr, pos, c, mask, HALF)
    rotate = j <= QPG
    y1 = tl.where(rotate, x1 * c1 - x2 * s1, x1)
    y2 = tl.where(rotate, x2 * c2 + x1 * s2, x2)
    dst_q = q_ptr + pos * sq_s + b * sq_b + (g * QPG + j) * (2 * HALF) + c
    dst_k = k_ptr + pos * sk_s + b * sk_b + g * (2 * HALF) + c
    dst_v = v_ptr + pos * sv_s + b * sv_b + g * (2 * HALF) + c
    is_q, is_k, is_v = mask & (j < QPG), mask & (j == QPG), mask & (j == QPG + 1)
    tl.store(dst_q, y1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(dst_q + HALF, y2.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(dst_k, y1.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(dst_k + HALF, y2.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(dst_v, y1.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(dst_v + HALF, y2.to(v_ptr.dtype.element_ty), mask=is_v)


@triton.jit
def packed_rope_bwd(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dx_ptr, batch, n_tokens,
                    sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sv_s, sv_b, sv_h, sx_s, sx_b,
                    HEADS: tl.constexpr, PER_GROUP: tl.constexpr, QPG: tl.constexpr, HALF: tl.constexpr,
                    BLOCK: tl.constexpr, COLS: tl.constexpr):
    """The packed gradient: query/key gradients rotated back (the transpose), the value's copied, written in the
    QKV projection's layout."""
    pos, b, r, g, j, c, mask = _rope_rows(batch, n_tokens, HEADS, PER_GROUP, HALF, BLOCK, COLS)
    is_q, is_k, is_v = mask & (j < QPG), mask & (j == QPG), mask & (j == QPG + 1)
    src_q = dq_ptr + pos * sq_s + b * sq_b + (g * QPG + j) * sq_h + c
    src_k = dk_ptr + pos * sk_s + b * sk_b + g * sk_h + c
    src_v = dv_ptr + pos * sv_s + b * sv_b + g * sv_h + c
    g1 = (tl.load(src_q, mask=is_q, other=0.0).to(tl.float32)
          + tl.load(src_k, mask=is_k, other=0.0).to(tl.float32)
          + tl.load(src_v, mask=is_v, other=0.0).to(tl.float32))
    g2 = (tl.load(src_q + HALF, mask=is_q, other=0.0).to(tl.float32)
          + tl.load(src_k + HALF, mask=is_k, other=0.0).to(tl.float32)
          + tl.load(src_v + HALF, mask=is_v, other=0.0).to(tl.float32))
    c1, c2, s1, s2 = _rope_tables(cos_ptr, sin_ptr, pos, c, mask, HALF)
    rotate = j <= QPG
    d1 = tl.where(rotate, g1 * c1 + g2 * s2, g1)
    d2 = tl.where(rotate, g2 * c2 - g1 * s1, g2)
    dst = dx_ptr + pos * sx_s + b * sx_b + r * (2 * HALF) + c
    tl.store(dst, d1.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, d2.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_block(n_rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ``ROWS`` rows and ``BLOCK`` columns of the ``[N, F]`` output, and their mask."""
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    col = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    return row, col, (row < n_rows) & (col < width)


@triton.jit
def swiglu_fwd(y_ptr, out_ptr, n_rows, width, stride_y, stride_out, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``silu(y₁) · y₂`` from the two halves of each row."""
    row, col, mask = _swiglu_block(n_rows, width, ROWS, BLOCK)
    y1 = tl.load(y_ptr + row * stride_y + col, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(y_ptr + row * stride_y + width + col, mask=mask, other=0.0).to(tl.float32)
    out = y1 * tl.sigmoid(y1) * y2
    tl.store(out_ptr + row * stride_out + col, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(g_ptr, y_ptr, dy_ptr, n_rows, width, stride_g, stride_y, stride_dy, ROWS: tl.constexpr,
               BLOCK: tl.constexpr):
    """Both halves of the packed gradient from one read of ``y₁``, ``y₂`` and the output gradient."""
    row, col, mask = _swiglu_block(n_rows, width, ROWS, BLOCK)
    g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    y1 = tl.load(y_ptr + row * stride_y + col, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(y_ptr + row * stride_y + width + col, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(y1)
    d1 = g * sig * (1.0 + y1 * (1.0 - sig)) * y2
    d2 = g * (y1 * sig)
    tl.store(dy_ptr + row * stride_dy + col, d1.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + row * stride_dy + width + col, d2.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_bwd(g_ptr, y_ptr, bias_ptr, dx_ptr, partial_ptr, n_rows, width, stride_g, stride_y, stride_dx,
                  ROWS_PER_PROGRAM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The tanh-GELU gradient of ``y + bias`` times the output gradient for ``ROWS_PER_PROGRAM`` rows of a column
    block, stored, and the stored (rounded) values summed per column into this row block's fp32 partial sums."""
    block = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    cmask = col < width
    bias = tl.load(bias_ptr + col, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_ROWS):
        row = (block * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (row[:, None] < n_rows) & cmask[None, :]
        g = tl.load(g_ptr + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row[:, None] * stride_y + col[None, :], mask=mask, other=0.0).to(tl.float32)
        x = y + bias[None, :]
        inner = 0.79788456 * x * (1.0 + 0.044715 * x * x)
        tanh_out = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh, saturating correctly at both ends
        ff = 0.5 * x * ((1.0 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1.0 + tanh_out)
        dx = (ff * g).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + row[:, None] * stride_dx + col[None, :], dx, mask=mask)
        acc += tl.sum(tl.where(mask, dx.to(tl.float32), 0.0), axis=0)
    tl.store(partial_ptr + block * width + col, acc, mask=cmask)
