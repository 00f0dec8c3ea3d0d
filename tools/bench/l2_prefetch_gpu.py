"""Does an L2 prefetch on a side stream, one kernel ahead, hide the gaps between a decode step's kernels?

Why: in a batch-16 decode step (GPT-2 1.3B shape, bf16) every kernel streams 8–50 MB and stands alone in the
dependency chain; measured alone, each pays ~3–4 µs of fixed cost (launch, first bytes, tail) on top of ~2.5 TB/s
of marginal streaming (``decode_kernels_gpu.py``: attention 10.8 / 17.4 / 24.1 µs at 17 / 34 / 50 MB). During those
µs the memory system is idle. Here, inside the same CUDA graph, a tiny kernel on a side stream issues
``cp.async.bulk.prefetch.L2`` for the first bytes of the NEXT kernel's weights (or KV cache) as soon as the
current kernel starts, so the next kernel starts on L2 hits. Nothing changes numerically (a prefetch moves no
data a kernel can see), so only the time of the chain is measured.

The chain is one decode step's per-layer sequence over 24 layers' tensors (L2-cold like a real step):
attention (``trainer.decode_attention``, single pass, 256 filled slots), proj, add + LayerNorm, fc1 + GELU
(cuBLASLt epilogue), fc2, add + LayerNorm, next layer's QKV. Schedules: which kernels get a prefetch of their
operand launched when the kernel before them starts, and how many bytes (``full`` or the first N MB, whole
rows; the cache as each (row, head)'s filled slots).

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/l2_prefetch_gpu.py
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
B, H, HEADS, D, FFN = 16, 2048, 16, 128, 8192
LENGTH, FILLED = 384, 256


@triton.jit
def _prefetch_kernel(base, n_rows, row_stride, row_bytes, chunk, chunks_per_row,
                     PER: tl.constexpr):
    """Program p issues ``cp.async.bulk.prefetch.L2`` for PER (row, chunk) pieces: piece j covers bytes
    ``[c * chunk, min((c + 1) * chunk, row_bytes))`` of row r (``base`` is a uint8 pointer)."""
    pid = tl.program_id(0)
    j = pid * PER + tl.arange(0, PER)
    total = n_rows * chunks_per_row
    live = j < total
    j = tl.where(live, j, 0)
    r = j // chunks_per_row
    c = j % chunks_per_row
    start = c.to(tl.int64) * chunk
    size = tl.minimum(row_bytes - start, chunk).to(tl.int32)
    size = tl.where(live, size, 16)
    ptrs = base + r.to(tl.int64) * row_stride + start
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                              [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _touch_kernel(base, n_rows, row_stride, row_elems, BLOCK: tl.constexpr):
    """Prefetch by loading (``ld.global.cg``-like, evict_last) and discarding: the fallback when the bulk
    prefetch is slow. One program per (row, block)."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(base + r.to(tl.int64) * row_stride + offs, mask=offs < row_elems, other=0,
                eviction_policy="evict_last")
    s = tl.sum(v.to(tl.float32), axis=0)
    if s == 12345.678:  # never true for these inputs; keeps the load alive
        tl.store(base, s.to(base.dtype.element_ty))


class Region:
    """Rows of a tensor to prefetch: ``n_rows`` rows of ``row_bytes`` bytes, ``row_stride`` bytes apart."""

    def __init__(self, tensor: torch.Tensor, n_rows: int, row_stride: int, row_bytes: int):
        self.tensor, self.n_rows, self.row_stride, self.row_bytes = tensor, n_rows, row_stride, row_bytes

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    def first(self, nbytes: int | None) -> "Region":
        """The first ``nbytes`` of a weight matrix (whole rows); None: all of it."""
        if nbytes is None or nbytes >= self.nbytes:
            return self
        return Region(self.tensor, max(1, nbytes // self.row_bytes), self.row_stride, self.row_bytes)

    def issue(self, how: str, chunk: int = 16384, per: int = 128) -> None:
        if how == "bulk":
            chunks = -(-self.row_bytes // chunk)
            total = self.n_rows * chunks
            base = self.tensor.view(torch.uint8)
            _prefetch_kernel[(-(-total // per),)](base, self.n_rows, self.row_stride, self.row_bytes, chunk, chunks,
                                                   PER=per, num_warps=4)
        else:
            elem = self.tensor.element_size()
            block = 2048
            _touch_kernel[(self.n_rows, -(-self.row_bytes // elem // block))](
                self.tensor, self.n_rows, self.row_stride // elem, self.row_bytes // elem, BLOCK=block, num_warps=4)


def weight_region(w: torch.Tensor) -> Region:
    return Region(w, w.size(0), w.stride(0) * w.element_size(), w.size(1) * w.element_size())


def cache_region(cache: torch.Tensor, filled: int) -> Region:
    """[2, B, G, L, d]: each (K/V, row, head)'s first ``filled`` slots."""
    two, b, g, length, d = cache.shape
    return Region(cache, two * b * g, length * d * cache.element_size(), filled * d * cache.element_size())


class Step:
    """24 layers' weights and caches and the per-layer kernel sequence of one decode step."""

    def __init__(self):
        def w(n, k):
            return torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * k ** -0.5

        def b(n):
            return torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.02

        self.layers = []
        for _ in range(LAYERS):
            self.layers.append(dict(
                qkv=w(3 * H, H), qkv_b=b(3 * H), proj=w(H, H), proj_b=b(H), fc1=w(FFN, H), fc1_b=b(FFN),
                fc2=w(H, FFN), fc2_b=b(H), ln1=torch.ones(H, device=DEV, dtype=torch.bfloat16), ln1_b=b(H),
                ln2=torch.ones(H, device=DEV, dtype=torch.bfloat16), ln2_b=b(H),
                cache=torch.randn(2, B, HEADS, LENGTH, D, device=DEV, dtype=torch.bfloat16)))
        self.x = torch.randn(B, H, device=DEV, dtype=torch.bfloat16)
        self.pad = torch.zeros(B, LENGTH, dtype=torch.bool, device=DEV)
        self.index = torch.tensor([FILLED], device=DEV)
        self.side = torch.cuda.Stream()

    def operand(self, i: int, kernel: str) -> Region:
        layer = self.layers[i]
        if kernel == "attn":
            return cache_region(layer["cache"], FILLED)
        return weight_region(layer[kernel])

    def run(self, schedule: dict, how: str = "bulk", chunk: int = 16384) -> None:
        """One step. ``schedule`` maps a kernel name (attn, proj, fc1, fc2, qkv) to the bytes of its operand to
        prefetch (None: all) when the kernel before it starts; kernels not named get none."""
        from trainer import decode_attention as da

        main = torch.cuda.current_stream()
        side = self.side
        scale = D ** -0.5
        x = self.x
        order = []  # (layer, kernel name, thunk)
        state = {}

        def qkv_of(i):
            def go():
                layer = self.layers[i]
                h = F.layer_norm(state["x"], (H,), layer["ln1"], layer["ln1_b"])
                qkv = torch.addmm(layer["qkv_b"], h, layer["qkv"].t()).view(B, HEADS, 3, D)
                state["q"] = qkv[:, :, :1]
                state["kv"] = qkv[:, :, 1:].permute(2, 0, 1, 3).unsqueeze(3)
            return go

        def attn_of(i):
            def go():
                state["out"] = da.decode_attention(state["q"], state["kv"], self.layers[i]["cache"], self.pad,
                                                   self.index, scale).reshape(B, H)
            return go

        def residual_of(i, weight, source):
            """proj (source "out") or fc2 (source "h"): the residual stream plus the layer's linear of source."""
            def go():
                layer = self.layers[i]
                state["x"] = state["x"] + torch.addmm(layer[f"{weight}_b"], state[source], layer[weight].t())
            return go

        def fc1_of(i):
            def go():
                layer = self.layers[i]
                h = F.layer_norm(state["x"], (H,), layer["ln2"], layer["ln2_b"])
                state["h"] = torch._addmm_activation(layer["fc1_b"], h, layer["fc1"].t(), use_gelu=True)
            return go

        state["x"] = x
        for i in range(LAYERS):
            order += [(i, "qkv", qkv_of(i)), (i, "attn", attn_of(i)), (i, "proj", residual_of(i, "proj", "out")),
                      (i, "fc1", fc1_of(i)), (i, "fc2", residual_of(i, "fc2", "h"))]
        for n, (i, name, go) in enumerate(order):
            if n + 1 < len(order):
                j, nxt, _ = order[n + 1]
                if nxt in schedule:
                    # the prefetch of the next kernel's operand starts together with this kernel
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        self.operand(j, nxt).first(schedule[nxt]).issue(how, chunk)
            go()
        if schedule:
            main.wait_stream(side)


def graph_us(fn) -> float:
    """Median of three timed loops of 20 replays (``decode_kernels_gpu.graph_us``)."""
    from tools.bench.decode_kernels_gpu import graph_us as timed

    return timed(fn, reps=20, repeats=3)


def main() -> None:
    t0 = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    torch.manual_seed(0)
    step = Step()
    mb = 1 << 20
    every = ("attn", "proj", "fc1", "fc2", "qkv")
    schedules = {
        "none": {},
        "proj full": {"proj": None},
        "attn full": {"attn": None},
        "fc1 8MB": {"fc1": 8 * mb},
        "fc2 8MB": {"fc2": 8 * mb},
        "qkv 8MB": {"qkv": 8 * mb},
        "proj full, attn full": {"proj": None, "attn": None},
        "proj+fc1 4MB": {"proj": None, "fc1": 4 * mb},
        "all 2MB": {k: 2 * mb for k in every},
        "all 4MB": {k: 4 * mb for k in every},
        "all 8MB": {k: 8 * mb for k in every},
        "all 16MB": {k: 16 * mb for k in every},
        "weights 8MB": {k: 8 * mb for k in every if k != "attn"},
        "all full": {k: None for k in every},
    }
    results = []
    base = None
    for how, chunk in (("bulk", 16384), ("bulk", 65536), ("touch", 0)):
        for name, schedule in schedules.items():
            if how != "bulk" or chunk != 16384:
                if name not in ("none", "proj full", "attn full", "all 2MB", "all 4MB"):
                    continue
            try:
                t = graph_us(lambda: step.run(schedule, how, chunk))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
                print(f"{how:5s} {chunk:6d} {name:14s} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      flush=True)
                continue
            if base is None:
                base = t
            results.append((how, chunk, name, t))
            print(f"{how:5s} {chunk:6d} {name:14s} {t:8.0f} µs per step ({t / LAYERS:6.1f} per layer)  "
                  f"{base / t:5.3f}x vs none", flush=True)
    again = graph_us(lambda: step.run({}))
    print(f"none again: {again:.0f} µs", flush=True)
    print("\n| prefetch | chunk | schedule | µs per 24 layers | vs none |\n|---|---:|---|---:|---:|")
    for how, chunk, name, t in results:
        print(f"| {how} | {chunk} | {name} | {t:.0f} | {base / t:.3f}× |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
