"""Experiment (issue 7): can the decode step's norms and residual adds live inside its GEMMs? Kernels + micro-benchmark.

The fast engine's compiled step runs, per layer, two small add + norm kernels between the cuBLAS GEMMs (GPT-2
1.3B, batch 16, H100: ~2.5 µs each, 48 per step, plus their launch gaps). This script measures the alternative: a
Triton ``W · xᵀ`` GEMM (M = 16 rows) that (a) adds bias / residual in its epilogue and leaves per-tile row partials
(sum and squared deviations, merged by the consumer with Chan's pairwise variance: stable and deterministic), and
(b) normalises its input on the fly from those partials (LayerNorm), x loaded one step ahead by hand since it goes
through arithmetic before the dot. Variants: tiles, the first weight tile loaded before the statistics (``peel``),
and the statistics replaced by constants (``stats False``: what the in-loop normalisation alone costs).

Result (2026-11-26, H100, BENCHMARKS.md): the epilogue pieces are free (proj 6.9 -> 7.0 µs with residual + partials),
but a normalising GEMM costs 15.4-17.3 µs against 11.5 µs plain (statistics prologue ~3.5 µs, in-loop arithmetic
~2.3 µs), i.e. no faster than the compiled step's separate add + norm kernel + cuBLAS GEMM (~14.9 µs): the engine
keeps the compiled step.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/fused_linear_gpu.py
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BM = 16  # rows per program (tl.dot needs 16)
STAT_TILE = 16  # features per tile of a residual-stream writer (the partials' granularity)


@triton.jit
def _row_stats(stats_ptr, n_tiles, K, eps, BM: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr,
               NORM: tl.constexpr):
    """(shift, rstd) per row from the producer's per-tile partials: LayerNorm (NORM 1) subtracts the mean and
    divides by sqrt(var + eps); RMSNorm (NORM 2) shifts by 0 and divides by sqrt(mean of squares + eps)."""
    t = tl.arange(0, TILES)
    rm = tl.arange(0, BM)
    live = (t < n_tiles)[:, None]
    ptr = stats_ptr + (t[:, None] * BM + rm[None, :]) * 2
    tile_sum = tl.load(ptr, mask=live, other=0.0)
    tile_m2 = tl.load(ptr + 1, mask=live, other=0.0)
    tile_mean = tile_sum / TILE
    if NORM == 1:
        mean = tl.sum(tile_sum, 0) / K
        dev = tl.where(live, tile_mean - mean[None, :], 0.0)
        var = tl.sum(tile_m2 + TILE * dev * dev, 0) / K
        return mean, 1.0 / tl.sqrt(var + eps)
    mean_sq = tl.sum(tile_m2 + TILE * tile_mean * tile_mean, 0) / K
    return tl.zeros_like(mean_sq), 1.0 / tl.sqrt(mean_sq + eps)


@triton.jit
def _store_with_stats(y, out_ptr, stats_ptr, pid, rn, rm, M, stride_out, STATS: tl.constexpr, BN: tl.constexpr,
                      BM: tl.constexpr):
    """Store the tile ``y`` [BN features, BM rows] (already in the output dtype) and, with STATS, its per-row
    partials (sum, sum of squared deviations from the tile mean) of the stored values."""
    tl.store(out_ptr + rm[None, :] * stride_out + rn[:, None], y, mask=rm[None, :] < M)
    if STATS:
        yf = y.to(tl.float32)
        tile_sum = tl.sum(yf, 0)
        dev = yf - (tile_sum / BN)[None, :]
        tl.store(stats_ptr + (pid * BM + rm) * 2, tile_sum)
        tl.store(stats_ptr + (pid * BM + rm) * 2 + 1, tl.sum(dev * dev, 0))


@triton.jit
def fused_linear(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, stats_in_ptr, norm_w_ptr, norm_b_ptr, stats_out_ptr,
                 M, N, K, stride_x, stride_w, stride_res, stride_out, n_stat_tiles, eps,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr,
                 STAT_TILE: tl.constexpr, STAT_TILES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr,
                 HAS_RES: tl.constexpr, STATS_OUT: tl.constexpr, PEEL: tl.constexpr = False,
                 NORM_STATS: tl.constexpr = True):
    """``out = act(norm(x) @ w.T + bias) + res`` for one tile of BN output features (every piece optional).

    NORM (1 LayerNorm, 2 RMSNorm) normalises x on the fly from the producer's row partials, rounding to x's dtype
    before the product as a separate norm kernel would. K must be a multiple of BK, and with STATS_OUT, N of BN."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    n_ok = rn < N
    m_ok = rm < M
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_x + rk[None, :]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if NORM == 0:
        for k0 in range(0, K, BK):
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
            w_ptrs += BK
            x_ptrs += BK
    else:
        # x (and the norm's weight/bias) go through arithmetic before the dot, so the compiler's pipelining of
        # the dot's operand loads does not cover them: they are loaded one step ahead by hand (measured on an
        # H100: 2.2x slower GEMMs without). PEEL: the first step's weights are loaded before the row statistics.
        start = 0
        if PEEL:
            w0 = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        gain = tl.load(norm_w_ptr + rk).to(tl.float32)
        if NORM_BIAS:
            offset = tl.load(norm_b_ptr + rk).to(tl.float32)
        if NORM_STATS:
            shift, rstd = _row_stats(stats_in_ptr, n_stat_tiles, K, eps, BM, STAT_TILE, STAT_TILES, NORM)
        else:
            shift = tl.zeros((BM,), dtype=tl.float32)
            rstd = shift + 1.0
        if PEEL:
            xf = (x.to(tl.float32) - shift[:, None]) * rstd[:, None] * gain[None, :]
            if NORM_BIAS:
                xf = xf + offset[None, :]
                offset = tl.load(norm_b_ptr + BK + rk, mask=(rk >= 0) & (BK < K), other=0.0).to(tl.float32)
            acc = tl.dot(w0, tl.trans(xf.to(x_ptr.dtype.element_ty)), acc)
            x = tl.load(x_ptrs + BK, mask=m_ok[:, None] & (BK < K), other=0.0)
            gain = tl.load(norm_w_ptr + BK + rk, mask=(rk >= 0) & (BK < K), other=0.0).to(tl.float32)
            w_ptrs += BK
            x_ptrs += BK
            start = BK
        for k0 in range(start, K, BK):
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            more = k0 + BK < K
            x_next = tl.load(x_ptrs + BK, mask=m_ok[:, None] & more, other=0.0)
            gain_next = tl.load(norm_w_ptr + k0 + BK + rk, mask=(rk >= 0) & more, other=0.0).to(tl.float32)
            xf = (x.to(tl.float32) - shift[:, None]) * rstd[:, None] * gain[None, :]
            if NORM_BIAS:
                offset_next = tl.load(norm_b_ptr + k0 + BK + rk, mask=(rk >= 0) & more, other=0.0).to(tl.float32)
                xf = xf + offset[None, :]
                offset = offset_next
            acc = tl.dot(w, tl.trans(xf.to(x_ptr.dtype.element_ty)), acc)
            x = x_next
            gain = gain_next
            w_ptrs += BK
            x_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if GELU_TANH:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(u) = 2 sigmoid(2u) - 1
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * inner)
    if HAS_RES:
        acc += tl.load(res_ptr + rm[None, :] * stride_res + rn[:, None], mask=m_ok[None, :] & n_ok[:, None],
                       other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    if STATS_OUT:
        _store_with_stats(y, out_ptr, stats_out_ptr, pid, rn, rm, M, stride_out, True, BN, BM)
    else:
        tl.store(out_ptr + rm[None, :] * stride_out + rn[:, None], y, mask=m_ok[None, :] & n_ok[:, None])


def linear(x, weight, bias=None, *, norm=None, residual=None, stats_out=False, tile=(16, 256, 4, 4), peel=False,
           norm_stats=True):
    """``norm(x) @ weight.T + bias + residual`` (each optional; ``norm`` = (gamma, beta, eps, row partials)); with
    ``stats_out`` also the output's row partials (then BN must be STAT_TILE)."""
    m, k = x.shape
    n = weight.size(0)
    bn, bk, warps, stages = tile
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles = -(-n // bn)
    stats = torch.empty((tiles, BM, 2), dtype=torch.float32, device=x.device) if stats_out else out
    gamma, beta, eps, stats_in = norm if norm is not None else (out, out, 0.0, out)
    n_stat = stats_in.size(0) if norm is not None else 1
    fused_linear[(tiles,)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out, stats_in,
        gamma, beta, stats, m, n, k, x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), n_stat, eps, BM=BM, BN=bn, BK=bk, NORM=0 if norm is None else 1, NORM_BIAS=True,
        STAT_TILE=STAT_TILE, STAT_TILES=triton.next_power_of_2(n_stat), HAS_BIAS=bias is not None, GELU_TANH=False,
        HAS_RES=residual is not None, STATS_OUT=stats_out, PEEL=peel, NORM_STATS=norm_stats, num_warps=warps,
        num_stages=stages)
    return (out, stats) if stats_out else out


def check() -> None:
    """Against PyTorch (bf16 inputs, fp32 maths): residual + partials, then LayerNorm from those partials."""
    torch.manual_seed(0)
    h, n = 2048, 6144
    rand = lambda *s: torch.randn(*s, device="cuda").to(torch.bfloat16)  # noqa: E731
    x, a, w_p, w_q = rand(BM, h) + 3.0, rand(BM, h), rand(h, h) * h ** -0.5, rand(n, h) * h ** -0.5
    gamma, beta, b = rand(h) + 1, rand(h), rand(n)
    x2, stats = linear(a, w_p, None, residual=x, stats_out=True)
    ref = a.float() @ w_p.float().t() + x.float()
    assert (x2.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    for peel in (False, True):
        y = linear(x2, w_q, b, norm=(gamma, beta, 1e-5, stats), tile=(64, 128, 4, 4), peel=peel)
        ref = torch.nn.functional.layer_norm(x2, (h,), gamma, beta, 1e-5).float() @ w_q.float().t() + b.float()
        assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def main() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    from decode_kernels_gpu import LAYERS, SHAPES, graph_us, layer_tensors

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    check()
    ws, bs, xs, _ = layer_tensors()
    h = SHAPES["qkv"][1]
    x = xs["qkv"]
    _, stats = linear(xs["proj"], ws["proj"][0], bs["proj"][0], residual=x, stats_out=True)
    gamma = torch.ones(h, device="cuda", dtype=torch.bfloat16)
    norm = (gamma, torch.zeros_like(gamma), 1e-5, stats)
    wide = (64, 128, 4, 4)
    print("== M = 16, bf16, µs per GEMM (mean over 24 layers' weights, L2-cold) ==")
    cases = [("qkv", "bias", dict(bias=True, tile=wide)), ("proj", "bias", dict(bias=True)),
             ("proj", "bias + residual + partials", dict(bias=True, residual=x, stats_out=True)),
             ("fc1", "bias", dict(bias=True, tile=wide)),
             ("fc2", "bias + residual + partials", dict(bias=True, residual=x, stats_out=True))]
    for tile in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]:
        for peel, norm_stats in ((False, True), (True, True), (False, False)):
            cases += [(nm, f"LayerNorm + bias, tile {tile}, peel {peel}, stats {norm_stats}",
                       dict(bias=True, norm=norm, tile=tile, peel=peel, norm_stats=norm_stats)) for nm in ("qkv", "fc1")]
    for nm, label, kw in cases:
        kw = dict(kw)
        use_bias = kw.pop("bias")
        n, k = SHAPES[nm]
        t = graph_us(lambda: [linear(xs[nm], w, b if use_bias else None, **kw) for w, b in zip(ws[nm], bs[nm])])
        print(f"  {nm:5s} {label:55s} {t / LAYERS:6.2f} µs ({n * k * 2 / 1e6 / (t / LAYERS):.2f} TB/s)", flush=True)


if __name__ == "__main__":
    main()
