"""Experiment (issue 7): does one persistent launch with grid-wide barriers stream the decode step's weights faster?

The greedy 2x target needs the batch-16 decode step's ~2.4 GB of layer weights (96 dependent M = 16 GEMMs) to
stream nearer the 2.9-3.0 TB/s of one long read; separate launches reach ~2.0 TB/s. This runs the same 96-GEMM
chain (GPT-2 1.3B shapes, weights in one buffer) as ONE Triton kernel of P programs (one or two per SM) that
walk each GEMM's output tiles and meet at a grid barrier (atomic counter, spin with a limit) before the next GEMM;
variants: tiles, P, the next GEMM's first weight tile loaded before the barrier, and no barrier at all (wrong
results, an upper bound on streaming). Baselines in the same run: separate cuBLAS and Triton launches, and 96
barriers alone. ``check`` runs a small chain on one program (also under ``TRITON_INTERPRET=1``).

Result (2026-11-26, H100, BENCHMARKS.md): best persistent chain 1,245 µs vs 1,187 µs for separate Triton
launches; even without barriers the best is 1,016 µs (2.38 TB/s); a barrier costs ~1.2 µs alone, ~2.4 µs with
the tile imbalance. A persistent Triton decode kernel would not reach the rate the 2x target needs.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/persistent_chain_gpu.py
"""
import os
import sys

import torch
import triton
import triton.language as tl

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def grid_barrier(counter_ptr, target, SPIN_LIMIT: tl.constexpr):
    """Every program's stores before, every program's loads after: block barrier, release-add on the counter,
    acquire-spin until ``target`` programs arrived (at most SPIN_LIMIT polls: a missing program must not hang
    the GPU; the result is then wrong, which the correctness check catches)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()


@triton.jit
def chain_kernel(w_ptr, offs_ptr, ns_ptr, ks_ptr, act_ptr, counter_ptr, L, P,
                 ACT_STRIDE: tl.constexpr, BUF_STRIDE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PREFETCH: tl.constexpr, BARRIER: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """GEMM l of the chain reads ping-pong buffer l % 2 ([BM, ACT_STRIDE]) and writes the other one; program
    ``pid`` computes output tiles pid, pid + P, ... of BN features (whole K) of each GEMM. Activations are read
    with ``.cg`` (L2, not the SM's incoherent L1: other programs wrote them). PREFETCH: the program's first weight
    block of GEMM l + 1 is loaded before the barrier that ends GEMM l."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn0 = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # first weight block of this program's first tile of GEMM 0
    n0 = tl.multiple_of(tl.load(ns_ptr), 16)
    k0 = tl.multiple_of(tl.load(ks_ptr), 64)
    w_pre = tl.load(w_ptr + (pid * BN + rn0)[:, None].to(tl.int64) * k0 + rk[None, :],
                    mask=(pid * BN + rn0)[:, None] < n0, other=0.0)
    for l in range(L):
        n = tl.multiple_of(tl.load(ns_ptr + l), 16)
        k = tl.multiple_of(tl.load(ks_ptr + l), 64)
        off = tl.multiple_of(tl.load(offs_ptr + l), 64)
        x_base = act_ptr + (l % 2) * BUF_STRIDE
        o_base = act_ptr + ((l + 1) % 2) * BUF_STRIDE
        n_tiles = n // BN
        for t in range(pid, n_tiles, P):
            rn = t * BN + rn0
            acc = tl.zeros((BN, BM), tl.float32)
            start = 0
            if PREFETCH:
                if t == pid:
                    x0 = tl.load(x_base + rm[:, None] * ACT_STRIDE + rk[None, :], cache_modifier=".cg")
                    acc = tl.dot(w_pre, tl.trans(x0), acc)
                    start = BK
            w_ptrs = w_ptr + off + rn[:, None].to(tl.int64) * k + start + rk[None, :]
            x_ptrs = x_base + rm[:, None] * ACT_STRIDE + start + rk[None, :]
            for kk in range(start, k, BK):
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs, cache_modifier=".cg")
                acc = tl.dot(w, tl.trans(x), acc)
                w_ptrs += BK
                x_ptrs += BK
            tl.store(o_base + rm[None, :] * ACT_STRIDE + rn[:, None], acc.to(o_base.dtype.element_ty))
        if PREFETCH:
            if l + 1 < L:
                n1 = tl.multiple_of(tl.load(ns_ptr + l + 1), 16)
                k1 = tl.multiple_of(tl.load(ks_ptr + l + 1), 64)
                off1 = tl.multiple_of(tl.load(offs_ptr + l + 1), 64)
                w_pre = tl.load(w_ptr + off1 + (pid * BN + rn0)[:, None].to(tl.int64) * k1 + rk[None, :],
                                mask=(pid * BN + rn0)[:, None] < n1, other=0.0)
        if BARRIER:
            grid_barrier(counter_ptr, P * (l + 1), SPIN_LIMIT)


SHAPES = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]  # qkv proj fc1 fc2 (N, K)


class Chain:
    """The 96 (or ``layers`` x len(shapes)) weights in one buffer with their offsets and shapes, and the buffers."""

    def __init__(self, layers, device, dtype=torch.bfloat16, shapes=SHAPES, rows=16):
        self.shapes = [s for _ in range(layers) for s in shapes]
        sizes = [n * k for n, k in self.shapes]
        self.w = (torch.randn(sum(sizes), device=device, dtype=torch.float32) * 0.02).to(dtype)
        offs = [0]
        for s in sizes[:-1]:
            offs.append(offs[-1] + s)
        self.offs = torch.tensor(offs, dtype=torch.int64, device=device)
        self.ns = torch.tensor([n for n, _ in self.shapes], dtype=torch.int32, device=device)
        self.ks = torch.tensor([k for _, k in self.shapes], dtype=torch.int32, device=device)
        self.width = max(max(n, k) for n, k in self.shapes)
        self.act = torch.zeros(2, rows, self.width, device=device, dtype=dtype)
        self.x0 = torch.randn(rows, self.width, device=device, dtype=dtype)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.rows = rows

    def weight(self, i):
        n, k = self.shapes[i]
        o = int(self.offs[i])
        return self.w[o:o + n * k].view(n, k)

    def run(self, P, BN=16, BK=256, warps=4, stages=4, prefetch=False, barrier=True, L=None):
        L = len(self.shapes) if L is None else L
        self.counter.zero_()
        self.act[0].copy_(self.x0)
        chain_kernel[(P,)](self.w, self.offs, self.ns, self.ks, self.act, self.counter, L, P,
                           ACT_STRIDE=self.width, BUF_STRIDE=self.rows * self.width, BM=self.rows, BN=BN, BK=BK,
                           PREFETCH=prefetch, BARRIER=barrier, SPIN_LIMIT=2_000_000,
                           num_warps=warps, num_stages=stages)
        return self.act[L % 2]

    def reference(self, L=None):
        """The same ping-pong buffers in fp32 maths (columns past a GEMM's N keep older values, as in the kernel)."""
        L = len(self.shapes) if L is None else L
        bufs = [self.x0.float().clone(), torch.zeros_like(self.x0, dtype=torch.float32)]
        for i in range(L):
            n, k = self.shapes[i]
            y = bufs[i % 2][:, :k] @ self.weight(i).float().t()
            bufs[(i + 1) % 2][:, :n] = y.to(self.act.dtype).float()
        return bufs[L % 2]


def check(device):
    """A small chain on one program (no other program to wait for: runs under the interpreter too) vs PyTorch."""
    torch.manual_seed(0)
    small = [(64, 128), (32, 64), (128, 64), (64, 128)]
    c = Chain(2, device, dtype=torch.bfloat16 if not INTERP else torch.float32, shapes=small)
    for prefetch in (False, True):
        out = c.run(P=1, BN=16, BK=32, prefetch=prefetch).float().clone()
        ref = c.reference()
        n = c.shapes[-1][0]
        err = (out[:, :n] - ref[:, :n]).abs().max().item() / ref[:, :n].abs().max().item()
        print("check prefetch", prefetch, "rel err", err)
        assert err < 2e-2


def bench():
    """The chain as separate launches (cuBLAS, Triton), 96 barriers alone, then the persistent variants."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tools.bench.decode_kernels_gpu import graph_us, linear

    check("cuda")
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms, "triton", triton.__version__, flush=True)
    torch.manual_seed(0)
    c = Chain(24, "cuda")
    gb = c.w.numel() * 2 / 1e9
    # baselines: separate launches
    ws = [c.weight(i) for i in range(len(c.shapes))]
    zb = torch.zeros(8192, device="cuda", dtype=torch.bfloat16)
    xs = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16)
    outs = torch.empty(16, 8192, device="cuda", dtype=torch.bfloat16)
    tiles = {(6144, 2048): (64, 128, 4, 4), (2048, 2048): (16, 256, 4, 4), (8192, 2048): (64, 128, 4, 4),
             (2048, 8192): (16, 256, 4, 4)}
    t = graph_us(lambda: [torch.mm(xs[:, :w.size(1)], w.t(), out=outs[:, :w.size(0)]) for w in ws])
    print(f"separate cuBLAS mm chain: {t:7.0f} us ({gb / t * 1e3:.2f} TB/s)", flush=True)
    t = graph_us(lambda: [linear(xs[:, :w.size(1)], w, zb[:w.size(0)], outs[:, :w.size(0)], tiles[tuple(w.shape)])
                          for w in ws])
    print(f"separate Triton best tiles chain: {t:7.0f} us ({gb / t * 1e3:.2f} TB/s)", flush=True)
    # barrier cost alone
    nb = Chain(24, "cuda", shapes=[(8, 64)] * 4)
    t = graph_us(lambda: nb.run(P=sms))
    print(f"96 grid barriers alone (P={sms}): {t:7.1f} us ({t / 96:.2f} us each)", flush=True)
    configs = [(16, 256, 4, 4), (16, 128, 4, 6), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (16, 256, 8, 4)]
    for cfg in configs:
        bn, bk, warps, stages = cfg
        for per_sm in (1, 2):
            P = sms * per_sm
            for prefetch in (False, True):
                try:
                    out = c.run(P=P, BN=bn, BK=bk, warps=warps, stages=stages, prefetch=prefetch, L=12)
                    torch.cuda.synchronize()
                    ref = c.reference(12)
                    n = c.shapes[11][0]
                    err = ((out.float()[:, :n] - ref[:, :n]).abs().max() / ref[:, :n].abs().max()).item()
                    t = graph_us(lambda: c.run(P=P, BN=bn, BK=bk, warps=warps, stages=stages, prefetch=prefetch))
                    tnb = graph_us(lambda: c.run(P=P, BN=bn, BK=bk, warps=warps, stages=stages, prefetch=prefetch,
                                                 barrier=False))
                    print(f"persistent {cfg} P={P} prefetch={prefetch}: {t:7.0f} us ({gb / t * 1e3:.2f} TB/s), "
                          f"no barrier {tnb:7.0f} us, rel err {err:.1e}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"persistent {cfg} P={P} prefetch={prefetch}: FAILED {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    bench() if torch.cuda.is_available() else check("cpu")
