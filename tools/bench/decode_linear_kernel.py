"""An experiment (not used by the engine): a CUDA decode-GEMM kernel for ``out[≤16, N] = x · Wᵀ``, compiled at
run time with NVRTC (``torch.cuda._compile_kernel``) and launched through ``cuLaunchKernelEx``, for
``tools/bench/decode_linear_gpu.py``.

Why it was tried: cuBLAS streams the batch-16 decode step's weights at 1.9–2.05 TB/s where one long read reaches
3.0 TB/s. The kernel is shaped for the weight stream: each warp owns 16 weight rows × an even share of K and
loads them straight into registers, 16 bytes per thread per row, ``UNROLL`` steps of 32 columns ahead of its
math, in the tensor cores' fragment layout up to a permutation of K that x's fragments share (no shuffles, no
shared memory on the weight path); ``mma.sync`` m16n8k16 with weight rows as M and the token rows as N; the
warps of a block add their partial sums through shared memory; the epilogue adds the bias, optionally
tanh-GELU. Options measured: the L2 256-byte prefetch hint on weight loads, programmatic dependent launch
(``griddepcontrol``: weight loads issued before waiting for the kernel before, an early trigger for the next),
a LayerNorm of x on the fly from row statistics that the producing launch wrote (``NORM``), a residual add with
those statistics in the epilogue (``RESID``), and an L2 prefetch of the next weight bytes before the wait
(``L2AHEAD``). Results and why it is not in the engine: BENCHMARKS.md (seventh session).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

# (experiment) bytes of each weight row a launch prefetches into L2 before waiting for the kernel before it
L2AHEAD = int(os.environ.get("INTEROP_DECODE_LINEAR_L2AHEAD", "0"))

_SOURCE = r"""
typedef unsigned short bf16_t;
typedef unsigned int u32;

#ifndef KSPLIT
#define KSPLIT 4
#endif
#ifndef UNROLL
#define UNROLL 8
#endif
#ifndef ACT
#define ACT 0
#endif
#ifndef HALVES
#define HALVES 2
#endif
#ifndef TRIGGER
#define TRIGGER 0
#endif
#ifndef NORM
#define NORM 0
#endif
#ifndef RESID
#define RESID 0
#endif
#ifndef L2AHEAD
#define L2AHEAD 0
#endif

// 16-byte loads with cache qualifiers: weights stream past L1 (optionally fetching 256 bytes into L2 per miss);
// parameters (never written while the kernel runs) take the read-only path; activations written by the kernel
// before this one come from L2 (.cg), never from a possibly stale L1 line
#define LOAD16(name, qualifiers)                                                                  \
    __device__ __forceinline__ uint4 name(const bf16_t* p) {                                      \
        uint4 r;                                                                                  \
        asm volatile("ld.global" qualifiers ".v4.u32 {%0,%1,%2,%3}, [%4];"                        \
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));                      \
        return r;                                                                                 \
    }
#if PREFETCH256
LOAD16(load_weight, ".nc.L1::no_allocate.L2::256B")
#else
LOAD16(load_weight, ".nc.L1::no_allocate")
#endif
LOAD16(load_param, ".nc")
LOAD16(load_x, ".cg")

__device__ __forceinline__ float load_stat(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ bf16_t load_x1(const bf16_t* p) {
    bf16_t r;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

// c += A (16 x 16, weight rows x K) * B (16 x 8, K x token rows)
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_to_float(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ bf16_t float_to_bf16(float v) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
}

// LayerNorm of 8 bf16 values (one 16-byte load) with the row's mean and 1/std: (x - mu) * r * gamma + beta,
// rounded to bf16 as torch's layer_norm rounds its output
__device__ __forceinline__ uint4 norm8(uint4 x, uint4 g, uint4 b, float mu, float r) {
    const u32 xs[4] = {x.x, x.y, x.z, x.w}, gs[4] = {g.x, g.y, g.z, g.w}, bs[4] = {b.x, b.y, b.z, b.w};
    u32 o[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float lo = (__uint_as_float(xs[i] << 16) - mu) * r * __uint_as_float(gs[i] << 16)
                         + __uint_as_float(bs[i] << 16);
        const float hi = (__uint_as_float(xs[i] & 0xffff0000u) - mu) * r * __uint_as_float(gs[i] & 0xffff0000u)
                         + __uint_as_float(bs[i] & 0xffff0000u);
        o[i] = pack2(lo, hi);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

// out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]) for m < rows; grid: n / 16 blocks of KSPLIT warps
extern "C" __global__ void __launch_bounds__(KSPLIT * 32)
decode_linear(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias,
              bf16_t* __restrict__ out, int rows, int k, int ldx, int ldo, int has_bias,
              const bf16_t* __restrict__ resid, float* __restrict__ stats_out,
              const float* __restrict__ stats_in, int nparts, const bf16_t* __restrict__ gamma,
              const bf16_t* __restrict__ beta, float eps) {
    __shared__ float partial[KSPLIT][16][17];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * 16;
    // this warp's steps of 32 columns: an even share of K / 32 (shares differ by at most one step)
    const int first_step = warp * (k / 32) / KSPLIT;
    const int steps = (warp + 1) * (k / 32) / KSPLIT - first_step;
    const int k0 = first_step * 32 + 8 * q;
    const bf16_t* w_lo = w + (size_t)(n0 + g) * k + k0;      // weight rows g and g + 8 of this block
    const bf16_t* w_hi = w_lo + (size_t)8 * k;
    // token rows past `rows` read row 0 (their results are never stored): no predicates in the loop
    const bf16_t* x_lo = x + (size_t)(g < rows ? g : 0) * ldx + k0;
    const bf16_t* x_hi = x + (size_t)(g + 8 < rows ? g + 8 : 0) * ldx + k0;
    float acc_lo[4] = {0.f, 0.f, 0.f, 0.f}, acc_hi[4] = {0.f, 0.f, 0.f, 0.f};
    uint4 buf_lo[UNROLL], buf_hi[UNROLL];
#if TRIGGER
    // programmatic dependent launch: the next kernel's blocks may start as this one's leave the SMs
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (u < steps) {
            buf_lo[u] = load_weight(w_lo + 32 * u);
            buf_hi[u] = load_weight(w_hi + 32 * u);
        }
    }
#if L2AHEAD
    // (experiment) the next L2AHEAD bytes of each of the warp's 16 weight rows into L2 before the wait
    if (lane < 16 && steps > UNROLL) {
        const bf16_t* row = w + (size_t)(n0 + lane) * k + (first_step + UNROLL) * 32;
        const int left = (steps - UNROLL) * 64;
        const int bytes = left < L2AHEAD ? left : L2AHEAD;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(row), "r"(bytes) : "memory");
    }
#endif
    // the weights do not depend on the kernel before; x does: with programmatic dependent launch the weight
    // loads above overlap that kernel's tail, and this waits for its results (a no-op otherwise)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#if NORM
    // the rows' mean and 1/std from the producer's per-block partial sums [nparts][16 rows][sum, sum of squares],
    // added in a fixed order (deterministic)
    __shared__ float stat_part[KSPLIT][32];
    __shared__ float stat_row[16][2];
    {
        // up to 16 independent loads per thread per round: one L2 round trip for up to 16 * KSPLIT parts
        float acc = 0.f;
        for (int p0 = warp; p0 < nparts; p0 += 16 * KSPLIT) {
            float v[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int p = p0 + j * KSPLIT;
                v[j] = p < nparts ? load_stat(stats_in + p * 32 + lane) : 0.f;
            }
#pragma unroll
            for (int j = 0; j < 16; ++j) acc += v[j];
        }
        stat_part[warp][lane] = acc;
        __syncthreads();
        if (threadIdx.x < 16) {
            float s1 = 0.f, s2 = 0.f;
            for (int v = 0; v < KSPLIT; ++v) {
                s1 += stat_part[v][2 * threadIdx.x];
                s2 += stat_part[v][2 * threadIdx.x + 1];
            }
            const float mu = s1 / k;
            stat_row[threadIdx.x][0] = mu;
            stat_row[threadIdx.x][1] = rsqrtf(fmaxf(s2 / k - mu * mu, 0.f) + eps);
        }
        __syncthreads();
    }
    const float mu_lo = stat_row[g][0], r_lo = stat_row[g][1];
    const float mu_hi = stat_row[g + 8][0], r_hi = stat_row[g + 8][1];
    const bf16_t* gamma_k = gamma + k0;
    const bf16_t* beta_k = beta + k0;
#endif
    for (int s = 0; s < steps; s += UNROLL) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int step = s + u;
            if (step >= steps) break;
#if NORM
            const uint4 gk = load_param(gamma_k + 32 * step), bk = load_param(beta_k + 32 * step);
            const uint4 xa = norm8(load_x(x_lo + 32 * step), gk, bk, mu_lo, r_lo);
#if HALVES == 2
            const uint4 xb = norm8(load_x(x_hi + 32 * step), gk, bk, mu_hi, r_hi);
#endif
#else
            const uint4 xa = load_x(x_lo + 32 * step);
#if HALVES == 2
            const uint4 xb = load_x(x_hi + 32 * step);
#endif
#endif
            const uint4 a = buf_lo[u], b = buf_hi[u];
            // K permutation shared by both operands: mma 1 takes columns 8q..8q+3, mma 2 8q+4..8q+7
            mma(acc_lo, a.x, b.x, a.y, b.y, xa.x, xa.y);
            mma(acc_lo, a.z, b.z, a.w, b.w, xa.z, xa.w);
#if HALVES == 2
            mma(acc_hi, a.x, b.x, a.y, b.y, xb.x, xb.y);
            mma(acc_hi, a.z, b.z, a.w, b.w, xb.z, xb.w);
#endif
            if (step + UNROLL < steps) {  // refill the registers just consumed
                buf_lo[u] = load_weight(w_lo + 32 * (step + UNROLL));
                buf_hi[u] = load_weight(w_hi + 32 * (step + UNROLL));
            }
        }
    }
    // accumulator fragment: acc[0..1] = (feature g, tokens 2q, 2q + 1), acc[2..3] = (feature g + 8, same tokens)
    partial[warp][g][2 * q] = acc_lo[0];
    partial[warp][g][2 * q + 1] = acc_lo[1];
    partial[warp][g + 8][2 * q] = acc_lo[2];
    partial[warp][g + 8][2 * q + 1] = acc_lo[3];
    partial[warp][g][8 + 2 * q] = acc_hi[0];
    partial[warp][g][8 + 2 * q + 1] = acc_hi[1];
    partial[warp][g + 8][8 + 2 * q] = acc_hi[2];
    partial[warp][g + 8][8 + 2 * q + 1] = acc_hi[3];
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += KSPLIT * 32) {  // a half-warp holds one token row's 16 features
        const int f = i & 15, m = i >> 4;
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < KSPLIT; ++s) v += partial[s][f][m];
        if (has_bias) v += bf16_to_float(bias[n0 + f]);
#if ACT == 1
        v = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
#endif
#if RESID
        // residual stream: out = resid + x W^T + b, and this block's share of each row's LayerNorm statistics
        if (m < rows) v += bf16_to_float(load_x1(resid + (size_t)m * ldo + n0 + f));
        const bf16_t o = float_to_bf16(v);
        if (m < rows) out[(size_t)m * ldo + n0 + f] = o;
        float s1 = bf16_to_float(o), s2 = s1 * s1;
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) {
            s1 += __shfl_xor_sync(0xffffffffu, s1, off);
            s2 += __shfl_xor_sync(0xffffffffu, s2, off);
        }
        if (f == 0) {
            stats_out[blockIdx.x * 32 + 2 * m] = s1;
            stats_out[blockIdx.x * 32 + 2 * m + 1] = s2;
        }
#else
        if (m < rows) out[(size_t)m * ldo + n0 + f] = float_to_bf16(v);
#endif
    }
}
"""


@functools.lru_cache(maxsize=None)
def _compiled(ksplit: int, unroll: int, prefetch256: bool, act: int, halves: int, trigger: bool, norm: bool,
              resid: bool):
    """The kernel for one configuration (NVRTC; cached per process)."""
    flags = dict(KSPLIT=ksplit, UNROLL=unroll, PREFETCH256=int(prefetch256), ACT=act, HALVES=halves,
                 TRIGGER=int(trigger), NORM=int(norm), RESID=int(resid), L2AHEAD=L2AHEAD)
    defines = "".join(f"#define {name} {value}\n" for name, value in flags.items())
    return torch.cuda._compile_kernel(defines + _SOURCE, "decode_linear")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _launch(kernel, grid: tuple, block: tuple, args: list, pdl: bool) -> None:
    """``cuLaunchKernelEx`` on the current stream; with ``pdl`` the launch allows programmatic stream
    serialization (what ``_compile_kernel``'s own launcher cannot ask for): the kernel may start before the
    one before it has finished, and waits for it at its ``griddepcontrol.wait``."""
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    holders = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
               else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                           ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                           ctypes.pointer(attr) if pdl else None, int(pdl))
    _check_cuda(_get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None))


# (KSPLIT, UNROLL, L2 256-byte prefetch) measured best on an H100 for the GPT-2 1.3B decode step's shapes
# (tools/bench/decode_linear_gpu.py, mean over 24 layers' weights)
TUNED = {(6144, 2048): (8, 4, False), (2048, 2048): (16, 4, True), (8192, 2048): (4, 4, True),
         (2048, 8192): (16, 4, True), (50304, 2048): (16, 8, True)}
WARPS_PER_SM = 24  # the grid's target: enough warps in flight per SM to cover a load's latency, one wave


def pick_config(n: int, k: int, sms: int = 132) -> tuple[int, int, bool] | None:
    """(KSPLIT, UNROLL, prefetch) for a weight [n, k]: warps per block (each an even share of K) so that the grid
    holds about ``WARPS_PER_SM`` warps per SM; None when K is not a multiple of 32."""
    if k % 32:
        return None
    if (n, k) in TUNED:
        return TUNED[n, k]
    blocks = n // 16
    ksplit = 1
    while ksplit < 16 and blocks * ksplit * 2 <= sms * WARPS_PER_SM and k // (32 * ksplit * 2) >= 4:
        ksplit *= 2
    return ksplit, 4, True


def launch(x, weight, bias, out, act: int = 0, config: tuple | None = None, pdl: bool = False,
           trigger: bool = False, resid: torch.Tensor | None = None, stats_out: torch.Tensor | None = None,
           norm: tuple | None = None) -> None:
    """Run the kernel into ``out`` [rows, n]. Not checked: bf16 x [rows ≤ 16, K] with unit column stride and
    16-byte aligned rows, W [n, K] contiguous, n % 16 == 0, K % 32 == 0.

    ``resid`` [rows, n] (same row stride as ``out``): ``out = resid + x·Wᵀ + b``, and the block's share of each
    row's statistics goes to ``stats_out`` [n / 16, 16, 2] fp32 (sum and sum of squares of 16 features).
    ``norm = (stats, gamma, beta, eps)``: x is LayerNorm'ed on the fly with statistics summed from ``stats``
    [parts, 16, 2] as another launch's ``stats_out`` wrote them. ``pdl``: launched with programmatic stream
    serialization; ``trigger``: lets the next such launch start early (its blocks then wait for this one's
    results at their ``griddepcontrol.wait``)."""
    n, k = weight.shape
    ksplit, unroll, prefetch = config or pick_config(n, k)
    kernel = _compiled(ksplit, unroll, prefetch, act, 2 if x.size(0) > 8 else 1, trigger, norm is not None,
                       resid is not None)
    stats_in, gamma, beta, eps = norm if norm is not None else (weight, weight, weight, 0.0)
    args = [x, weight, bias if bias is not None else weight, out, x.size(0), k, x.stride(0), out.stride(0),
            int(bias is not None), resid if resid is not None else weight,
            stats_out if stats_out is not None else weight, stats_in,
            stats_in.size(0) if norm is not None else 0, gamma, beta, float(eps)]
    _launch(kernel, (n // 16, 1, 1), (ksplit * 32, 1, 1), args, pdl)
