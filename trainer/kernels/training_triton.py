"""The Triton kernels of :mod:`trainer.kernels.qkv_rope`, :mod:`trainer.kernels.swiglu`, :mod:`trainer.kernels.norm`
(with :mod:`trainer.kernels.add_norm`) and :mod:`trainer.kernels.adamw` (imported only where Triton is; each of those
modules says why and what).

All are memory-bound passes over ``[tokens, width]`` activations (AdamW: over flat parameters): fp32 arithmetic
inside, one rounding to the output dtype on each store, 64-bit offsets (the activations pass 2³¹ elements at 1B
scale).
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
def norm_fwd(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, r_ptr, c_ptr, h_ptr, n_rows, width, stride_x, stride_y,
             stride_r, stride_h, eps, RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ADD: tl.constexpr,
             ADD_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """LayerNorm (``RMS`` False) or RMSNorm of ``ROWS`` whole rows (``BLOCK`` ≥ width): ``y = x̂·w (+ b)`` with
    ``x̂ = (x − mean)·rstd`` (RMSNorm: no mean); each row's mean and rstd (fp32) kept for the backward pass.
    ``ADD``: the rows normalised are ``h = x + r (+ c)`` (a residual add and, ``ADD_BIAS``, a broadcast bias, summed in
    fp32 and rounded once), stored to ``h`` as well."""
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.arange(0, BLOCK)
    rmask, cmask = row < n_rows, col < width
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x += tl.load(r_ptr + row[:, None] * stride_r + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if ADD_BIAS:
            x += tl.load(c_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :]
        rounded = x.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row[:, None] * stride_h + col[None, :], rounded, mask=mask)
        x = rounded.to(tl.float32)  # normalise what was stored, as the unfused norm would read it
    if RMS:
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        xc = x
    else:
        mean = tl.sum(x, axis=1) / width
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / width + eps)
    y = xc * rstd[:, None] * tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row[:, None] * stride_y + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=rmask)
    tl.store(rstd_ptr + row, rstd, mask=rmask)


@triton.jit
def _band_rows(band, start, n_rows, ROWS_PER_PROGRAM: tl.constexpr, ROWS: tl.constexpr):
    """Rows ``start .. start + ROWS`` of program ``band``'s band of ``ROWS_PER_PROGRAM`` (int64), and which exist."""
    row = (band * ROWS_PER_PROGRAM + start + tl.arange(0, ROWS)).to(tl.int64)
    return row, row < n_rows


@triton.jit
def norm_bwd(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, dr_ptr, ds_ptr, n_rows, width,
             stride_dy, stride_x, stride_dx, stride_dr, ROWS_PER_PROGRAM: tl.constexpr, RMS: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_DR: tl.constexpr, SUM_DX: tl.constexpr, ROWS: tl.constexpr,
             BLOCK: tl.constexpr):
    """The input gradient of ``ROWS_PER_PROGRAM`` rows, ``ROWS`` at a time, from one read of ``x`` and ``dy``, and
    this program's fp32 partial sums of the weight (``dy·x̂``) and bias (``dy``) gradients. ``HAS_DR``: a gradient
    reaching ``x`` by another path (the residual stream) is added to the input gradient; ``SUM_DX``: this
    program's partial column sums of that input gradient (the gradient of a bias added into ``x``) too."""
    block = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    cmask = col < width
    w = tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    ds = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, ROWS):
        row, rmask = _band_rows(block, start, n_rows, ROWS_PER_PROGRAM, ROWS)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)[:, None]
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row, mask=rmask, other=0.0)[:, None]) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / width
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - xhat * c1 - tl.sum(wdy, axis=1)[:, None] / width) * rstd
        if HAS_DR:
            dx += tl.load(dr_ptr + row[:, None] * stride_dr + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row[:, None] * stride_dx + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
        if SUM_DX:
            ds += tl.sum(dx, axis=0)
    tl.store(dw_ptr + block * width + col, dw, mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + block * width + col, db, mask=cmask)
    if SUM_DX:
        tl.store(ds_ptr + block * width + col, ds, mask=cmask)


@triton.jit
def _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, grad_scale, decay, beta1, beta2, step_size, bc2_sqrt, eps):
    """AdamW on the elements ``offs`` of one parameter (torch's decoupled weight decay, bias corrections folded into
    ``step_size`` and ``bc2_sqrt``), the gradient scaled by ``grad_scale`` (clipping) as it is read and never written
    back; stores the parameter and both moments and returns the updated parameter (fp32)."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v + (1.0 - beta2) * (g * g - v)
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    return p


@triton.jit
def adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, n, grad_scale, decay, beta1, beta2, step_size, bc2_sqrt, eps,
               HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """One AdamW update (:func:`_adamw_update`) of ``BLOCK`` fp32 elements; ``HAS_OUT``: the updated parameter also
    stored, rounded, to ``out`` (the model's 16-bit copy)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, grad_scale, decay, beta1, beta2, step_size, bc2_sqrt,
                      eps)
    if HAS_OUT:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adamw_step_multi(addresses, numels, first_block, owner, grad_scale, decay, beta1, beta2, step_size, bc2_sqrt, eps,
                     OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`adamw_step` over many fp32 parameters in one launch: program ``i`` updates block ``i - first_block[t]``
    of parameter ``t = owner[i]``, whose parameter, gradient, two moments and 16-bit copy start at the addresses
    ``addresses[t, 0:5]`` (``numels[t]`` elements each). ``OUT_KIND``: 0 no copy, 1 bf16, 2 fp16."""
    pid = tl.program_id(0)
    t = tl.load(owner + pid)
    offs = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    row = addresses + t * 5
    fp32 = tl.pointer_type(tl.float32)
    p = _adamw_update(tl.load(row).to(fp32), tl.load(row + 1).to(fp32), tl.load(row + 2).to(fp32),
                      tl.load(row + 3).to(fp32), offs, mask, grad_scale, decay, beta1, beta2, step_size, bc2_sqrt, eps)
    if OUT_KIND == 1:
        tl.store(tl.load(row + 4).to(tl.pointer_type(tl.bfloat16)) + offs, p.to(tl.bfloat16), mask=mask)
    elif OUT_KIND == 2:
        tl.store(tl.load(row + 4).to(tl.pointer_type(tl.float16)) + offs, p.to(tl.float16), mask=mask)


@triton.jit
def qkv_concat_bwd(dq_ptr, dk_ptr, dv_ptr, dx_ptr, ds_ptr, n_rows, batch, sq_s, sq_b, sq_g, sk_s, sk_b, sk_g, sv_s,
                   sv_b, sv_g, ROWS_PER_PROGRAM: tl.constexpr, Q: tl.constexpr, QB: tl.constexpr, D: tl.constexpr,
                   DB: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr):
    """The gradient of a packed QKV tensor ``[s, b, groups, Q + 2·D]`` from the gradients of its query ``[s, b, groups,
    Q]``, key and value ``[s, b, groups, D]`` parts (any strides, unit column stride) for one band of
    ``ROWS_PER_PROGRAM`` token rows and one group, and this program's fp32 partial column sums of it (the QKV bias
    gradient) at ``ds[band, group·(Q + 2·D) + column]``."""
    band, g = tl.program_id(0), tl.program_id(1)
    width: tl.constexpr = Q + 2 * D
    qc, dc = tl.arange(0, QB), tl.arange(0, DB)
    qm, dm = qc < Q, dc < D
    sq, sk, sv = tl.zeros((QB,), dtype=tl.float32), tl.zeros((DB,), dtype=tl.float32), tl.zeros((DB,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, ROWS):
        row, rm = _band_rows(band, start, n_rows, ROWS_PER_PROGRAM, ROWS)
        s, b = row // batch, row % batch
        x = dx_ptr + (row * (GROUPS * width) + g * width)[:, None]
        q = tl.load(dq_ptr + (s * sq_s + b * sq_b + g * sq_g)[:, None] + qc[None, :], mask=rm[:, None] & qm[None, :],
                    other=0.0)
        tl.store(x + qc[None, :], q, mask=rm[:, None] & qm[None, :])
        k = tl.load(dk_ptr + (s * sk_s + b * sk_b + g * sk_g)[:, None] + dc[None, :], mask=rm[:, None] & dm[None, :],
                    other=0.0)
        tl.store(x + Q + dc[None, :], k, mask=rm[:, None] & dm[None, :])
        v = tl.load(dv_ptr + (s * sv_s + b * sv_b + g * sv_g)[:, None] + dc[None, :], mask=rm[:, None] & dm[None, :],
                    other=0.0)
        tl.store(x + Q + D + dc[None, :], v, mask=rm[:, None] & dm[None, :])
        sq += tl.sum(q.to(tl.float32), axis=0)
        sk += tl.sum(k.to(tl.float32), axis=0)
        sv += tl.sum(v.to(tl.float32), axis=0)
    out = ds_ptr + band * (GROUPS * width) + g * width
    tl.store(out + qc, sq, mask=qm)
    tl.store(out + Q + dc, sk, mask=dm)
    tl.store(out + Q + D + dc, sv, mask=dm)
