"""Micro-benchmarks of a batch-16 decode step's kernels on one GPU: how fast can the weights and the cache stream?

The fast engine's greedy step (GPT-2 1.3B shape, bf16, batch 16) is ~170 dependent kernels that stream 2.63 GB of
weights and ~0.8 GB of KV cache. This script measures, each as the mean of a CUDA-graph replay over 24 layers'
tensors (L2-cold, like a real step):

* ``attn``  — the decode attention of ``trainer.decode_attention`` (single-pass vs chunked + combine) at 128 / 256
  / 383 filled slots, against ``torch.sum`` over the same bytes;
* ``gemm``  — the four layer GEMMs (M = 16): cuBLAS against a Triton swap-AB kernel (``W · xᵀ``, a few output rows
  per program, whole K) over a sweep of tiles, and a split-K variant with fp32 atomics (non-deterministic: an
  upper bound, not a candidate); then a chain of all 96 layer GEMMs;
* ``pdl``   — the same chain with programmatic dependent launch (``launch_pdl`` + ``gdc_wait``), with the first
  weight tiles loaded before the wait, an early ``gdc_launch_dependents``, or an L2 prefetch of the weights
  (``cp.async.bulk.prefetch.L2``, sm90);
* ``card``  — one long read and one long copy, the card's streaming rates;
* ``floor`` — (not in the default set) a step's weights and cache read one ``torch.sum`` per operand in step
  order, against the same bytes in one read: the least a kernel-per-operation step can take.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/decode_kernels_gpu.py [attn] [gemm] [pdl] [card] [floor]
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEV = "cuda"
LAYERS = 24
ROWS = 16  # batch 16: one token per row
SHAPES = {"qkv": (6144, 2048), "proj": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192)}  # (N, K)


@triton.jit
def _prefetch_rows_l2(row_ptrs, nbytes):
    """``cp.async.bulk.prefetch.L2`` of ``nbytes`` from each row pointer (sm90)."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                              [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def skinny_linear(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, sxm, swn, som,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
                  EARLY_TRIGGER: tl.constexpr, PEEL: tl.constexpr, PREFETCH: tl.constexpr):
    """``o = x @ w.T + b`` for M <= BM rows, computed as ``w · xᵀ`` (BN output features per program, whole K).

    PDL: wait on the previous kernel before reading ``x`` (``gdc_wait``) and let the next one launch after it
    (or, EARLY_TRIGGER, before); PEEL: the first weight tile is loaded before the wait; PREFETCH > 0: 1/PREFETCH
    of the program's weight rows prefetched into L2 before the wait."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rn[:, None] * swn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :]
    if PREFETCH > 0:
        _prefetch_rows_l2(w_ptr + rn * swn, tl.full([BN], 0, tl.int32) + (K * 2) // PREFETCH)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    start = 0
    if PEEL:
        w0 = tl.load(w_ptrs, eviction_policy="evict_first")
    if PDL:
        if EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
    if PEEL:
        x0 = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(w0, tl.trans(x0), acc)
        w_ptrs += BK
        x_ptrs += BK
        start = BK
    for _ in range(start, K, BK):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BK
        x_ptrs += BK
    acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
    tl.store(o_ptr + rm[None, :] * som + rn[:, None], acc.to(o_ptr.dtype.element_ty), mask=rm[None, :] < M)


@triton.jit
def skinny_linear_splitk(x_ptr, w_ptr, o_ptr, M, N, K, sxm, swn, som, k_per,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``o += x[:, slice] @ w[:, slice].T`` into a zeroed fp32 ``o`` with atomics (grid: N tiles x K splits)."""
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    rn = pid * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rn[:, None] * swn + pk * k_per + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * sxm + pk * k_per + rk[None, :]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for _ in range(0, k_per, BK):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BK
        x_ptrs += BK
    tl.atomic_add(o_ptr + rm[None, :] * som + rn[:, None], acc, mask=rm[None, :] < M, sem="relaxed")


def graph_us(fn, reps: int = 30, repeats: int = 1) -> float:
    """Mean µs per replay of ``fn`` captured in a CUDA graph (warmed up on a side stream first); with
    ``repeats`` > 1 the timed loop of ``reps`` replays runs that many times and the median loop's mean is returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps * 1e3)
    return sorted(times)[len(times) // 2]


def linear(x, w, b, out, tile, pdl=False, early=False, peel=False, prefetch=0):
    bn, bk, warps, stages = tile
    n, k = w.shape
    skinny_linear[(n // bn,)](x, w, b, out, x.size(0), n, k, x.stride(0), w.stride(0), out.stride(0), BM=16,
                              BN=bn, BK=bk, PDL=pdl, EARLY_TRIGGER=early, PEEL=peel, PREFETCH=prefetch,
                              num_warps=warps, num_stages=stages, launch_pdl=pdl)


def layer_tensors():
    """24 layers' weights and biases per GEMM shape, one input and one output each."""
    ws = {nm: [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
          for nm, (n, k) in SHAPES.items()}
    bs = {nm: [torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
          for nm, (n, _) in SHAPES.items()}
    xs = {nm: torch.randn(ROWS, k, device=DEV, dtype=torch.bfloat16) for nm, (_, k) in SHAPES.items()}
    outs = {nm: torch.empty(ROWS, n, device=DEV, dtype=torch.bfloat16) for nm, (n, _) in SHAPES.items()}
    return ws, bs, xs, outs


TILES = [(16, 128, 4, 4), (16, 256, 4, 4), (16, 256, 4, 3), (16, 512, 4, 3), (16, 256, 8, 4), (16, 256, 2, 4),
         (32, 128, 4, 4), (32, 256, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (32, 256, 8, 3), (64, 128, 4, 4),
         (64, 64, 4, 6)]


def gemm_part(tensors) -> dict:
    ws, bs, xs, outs = tensors
    print("== layer GEMMs, M=16, bf16: µs per GEMM (mean over 24 layers' weights) ==")
    best = {}
    for nm, (n, k) in SHAPES.items():
        x, out = xs[nm], outs[nm]
        gb = n * k * 2 / 1e9
        t = graph_us(lambda: [torch.addmm(b, x, w.t(), out=out) for w, b in zip(ws[nm], bs[nm])]) / LAYERS
        print(f"{nm:5s} cuBLAS addmm {t:6.2f} µs ({gb / t * 1e3:.2f} TB/s)")
        ref = F.linear(x.float(), ws[nm][0].float(), bs[nm][0].float())
        results = []
        for tile in TILES:
            linear(x, ws[nm][0], bs[nm][0], out, tile)
            err = (out.float() - ref).abs().max().item()
            assert err < 0.05, (nm, tile, err)
            t = graph_us(lambda: [linear(x, w, b, out, tile) for w, b in zip(ws[nm], bs[nm])]) / LAYERS
            results.append((t, tile))
        results.sort()
        best[nm] = results[0][1]
        for t, tile in results[:3]:
            print(f"      Triton {tile} {t:6.2f} µs ({gb / t * 1e3:.2f} TB/s)")
        if n == 2048:
            acc = torch.zeros(ROWS, n, device=DEV, dtype=torch.float32)
            for split, bn, bk in ((2, 32, 256), (4, 32, 128), (4, 64, 128), (8, 32, 128)):
                def run():
                    for w in ws[nm]:
                        acc.zero_()
                        skinny_linear_splitk[(n // bn, split)](x, w, acc, ROWS, n, k, x.stride(0), w.stride(0),
                                                               acc.stride(0), k // split, BM=16, BN=bn, BK=bk,
                                                               num_warps=4, num_stages=4)
                t = graph_us(run) / LAYERS
                print(f"      Triton split-K {split} ({bn}, {bk}), fp32 atomics + memset {t:6.2f} µs")
    gb = sum(n * k * 2 for n, k in SHAPES.values()) * LAYERS / 1e9
    t_cublas = graph_us(lambda: [torch.addmm(bs[nm][i], xs[nm], ws[nm][i].t(), out=outs[nm])
                                 for i in range(LAYERS) for nm in SHAPES])
    t_triton = graph_us(lambda: [linear(xs[nm], ws[nm][i], bs[nm][i], outs[nm], best[nm])
                                 for i in range(LAYERS) for nm in SHAPES])
    print(f"chain of 96 layer GEMMs ({gb:.2f} GB): cuBLAS {t_cublas:.0f} µs ({gb / t_cublas * 1e3:.2f} TB/s), "
          f"Triton best tiles {t_triton:.0f} µs ({gb / t_triton * 1e3:.2f} TB/s) {best}")
    return best


def pdl_part(tensors) -> None:
    ws, bs, xs, outs = tensors
    gb = sum(n * k * 2 for n, k in SHAPES.values()) * LAYERS / 1e9
    print("== chain of 96 layer GEMMs with programmatic dependent launch: µs per chain ==")
    tile_sets = {
        "A": {"qkv": (64, 128, 4, 4), "proj": (16, 256, 4, 4), "fc1": (64, 128, 4, 4), "fc2": (16, 256, 4, 4)},
        "B": {"qkv": (32, 128, 4, 4), "proj": (16, 128, 4, 4), "fc1": (32, 128, 4, 4), "fc2": (16, 256, 4, 4)},
    }
    variants = [dict(), dict(pdl=True), dict(pdl=True, peel=True), dict(pdl=True, early=True),
                dict(pdl=True, prefetch=4), dict(pdl=True, prefetch=1), dict(prefetch=1)]
    for name, tiles in tile_sets.items():
        for variant in variants:
            t = graph_us(lambda: [linear(xs[nm], ws[nm][i], bs[nm][i], outs[nm], tiles[nm], **variant)
                                  for i in range(LAYERS) for nm in SHAPES])
            label = ", ".join(f"{k}={v}" for k, v in variant.items()) or "plain launches"
            print(f"  tiles {name}, {label:28s} {t:7.0f} µs ({gb / t * 1e3:.2f} TB/s)")


def attention_part() -> None:
    from trainer import decode_attention as da

    b, g, d, length = 16, 16, 128, 384
    print(f"== decode attention, B{b} G{g} D{d}, cache {length}: µs per layer ==")
    caches = [torch.randn(2, b, g, length, d, device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
    q = torch.randn(b, g, 1, d, device=DEV, dtype=torch.bfloat16)
    kv = torch.randn(2, b, g, 1, d, device=DEV, dtype=torch.bfloat16)
    pad = torch.zeros(b, length, dtype=torch.bool, device=DEV)
    pad[:3, :5] = True
    scale = d ** -0.5
    sink = torch.empty(2, b, g, d, device=DEV, dtype=torch.float32)
    saved = da.SINGLE_PASS
    try:
        for end in (128, 256, 383):
            index = torch.tensor([end], device=DEV)
            mb = 2 * b * g * end * d * 2 / 1e6
            times = {}
            for single in (True, False):
                da.SINGLE_PASS = single
                times[single] = graph_us(lambda: [da.decode_attention(q, kv, c, pad, index, scale) for c in caches])
            views = [c[:, :, :, :end] for c in caches]
            t_sum = graph_us(lambda: [torch.sum(v, dim=3, out=sink) for v in views]) / LAYERS
            single_us, chunked_us = times[True] / LAYERS, times[False] / LAYERS
            print(f"  {end} slots ({mb:.1f} MB): single pass {single_us:6.2f} µs ({mb / single_us:.2f} TB/s), "
                  f"chunked + combine {chunked_us:6.2f} µs ({mb / chunked_us:.2f} TB/s), "
                  f"torch.sum of the same bytes {t_sum:6.2f} µs ({mb / t_sum:.2f} TB/s)")
    finally:
        da.SINGLE_PASS = saved


def card_part() -> None:
    big = torch.empty(1_300_000_000, dtype=torch.bfloat16, device=DEV)
    t = graph_us(lambda: torch.sum(big, dtype=torch.float32), reps=5)
    print(f"== card: one torch.sum over 2.6 GB {t:7.0f} µs ({2.6 / t * 1e3:.2f} TB/s); ", end="")
    half = big.numel() // 2
    t = graph_us(lambda: big[half:].copy_(big[:half]), reps=5)
    print(f"one 1.3 GB copy {t:7.0f} µs ({2.6 / t * 1e3:.2f} TB/s read + write)")


def floor_part() -> None:
    """The step's operands read one kernel each (``torch.sum``), in step order, as one CUDA graph: the least a step
    made of one kernel per operation can take — any GEMM or attention kernel reads at least its operand, and norms,
    activations, embedding and argmax come on top. Operands of the GPT-2 1.3B shape at batch 16 mid-run (256 filled
    cache slots): per layer the QKV weight, the layer's K and V, the proj, fc1 and fc2 weights; then the LM head."""
    ws = [[torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for n, k in SHAPES.values()] for _ in range(LAYERS)]
    kv = [torch.randn(2, ROWS, 16, 256, 128, device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
    head = torch.randn(50257, 2048, device=DEV, dtype=torch.bfloat16)
    order = [t for layer, cache in zip(ws, kv) for t in (layer[0], cache, layer[1], layer[2], layer[3])] + [head]
    nbytes = sum(t.numel() * t.element_size() for t in order)

    def chain():
        for t in order:
            torch.sum(t, dtype=torch.float32)

    per_op = graph_us(chain, reps=10, repeats=3)
    del ws, kv, head, order
    big = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    one = graph_us(lambda: torch.sum(big, dtype=torch.float32), reps=10, repeats=3)
    print(f"== floor: {nbytes / 1e9:.2f} GB per step; read one kernel per operand ({LAYERS * 5 + 1} kernels) "
          f"{per_op:7.0f} µs ({nbytes / per_op / 1e6:.2f} TB/s); the same bytes as one read {one:7.0f} µs "
          f"({nbytes / one / 1e6:.2f} TB/s)")


def main() -> None:
    t0 = time.time()
    parts = sys.argv[1:] or ["attn", "gemm", "pdl", "card"]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    torch.manual_seed(0)
    if "attn" in parts:
        attention_part()
    if "gemm" in parts or "pdl" in parts:
        tensors = layer_tensors()
        if "gemm" in parts:
            gemm_part(tensors)
        if "pdl" in parts:
            pdl_part(tensors)
        del tensors
    if "card" in parts:
        card_part()
    if "floor" in parts:
        floor_part()
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
