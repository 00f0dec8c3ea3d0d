"""The decode step's linear layers on one GPU: the experimental CUDA kernel of ``decode_linear_kernel.py`` against
cuBLAS (seventh session; not used by the engine — BENCHMARKS.md says why).

Each number is the mean µs per GEMM of a CUDA-graph replay over 24 layers' weights (L2-cold, like a real step),
GPT-2 1.3B shapes at batch 16 (plus the LM head and the Llama-family benchmark model's MLP shapes): cuBLAS
(``addmm``; fc1 with cuBLASLt's bias + tanh-GELU epilogue, as the engine runs it), the kernel with the
configuration the engine picks, and a sweep of warps per block (K split), unroll depth and the L2 256-byte
prefetch hint; one launch over a 1.6 GB weight (the kernel's streaming rate without launch ramps); then the
chain of all 96 layer GEMMs of a step, also with programmatic dependent launch. Correctness first: the kernel
against an fp32 reference at 16, 5 and 1 rows, and a proj → fc1 → fc2 → head chain with the residual add, the
row statistics and the on-the-fly LayerNorm, launched with PDL in a CUDA graph.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/decode_linear_gpu.py [check] [sweep] [steady] [chain]
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decode_kernels_gpu import LAYERS, ROWS, SHAPES, graph_us, layer_tensors  # noqa: E402
import decode_linear_kernel as dl  # noqa: E402

DEV = "cuda"
EXTRA = {"lm_head": (50304, 2048, 2), "llama_fc1": (10880, 2048, LAYERS), "llama_fc2": (2048, 5440, LAYERS)}


def check(n: int, k: int) -> float:
    """Largest error of the kernel vs an fp32 reference, relative to the reference's largest value."""
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.02
    worst = 0.0
    for rows in (16, 5, 1):
        x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
        for gelu in (False, True):
            for bias in (b, None):
                ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                if gelu:
                    ref = F.gelu(ref, approximate="tanh")
                out = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
                dl.launch(x, w, bias, out, act=int(gelu))
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-2, (n, k, rows, gelu, bias is None, err)
                worst = max(worst, err)
    return worst


def check_fused(rows: int) -> float:
    """proj (+ residual, statistics) → fc1 (LayerNorm inside, GELU) → fc2 (+ residual) → head (LayerNorm inside),
    each launched with PDL and an early trigger in a CUDA graph, replayed on new inputs; largest error relative to
    the fp32 maths on the previous launch's bf16 output."""
    h, ffn, vocab, eps = 256, 1024, 512, 1e-5

    def param(*shape, scale=0.05):
        return torch.randn(*shape, device=DEV, dtype=torch.bfloat16) * scale

    attn, resid = param(rows, h, scale=1.0), param(rows, h, scale=1.0)
    w_proj, b_proj, w_fc1, b_fc1, w_fc2, b_fc2, w_head = (param(h, h), param(h), param(ffn, h), param(ffn),
                                                          param(h, ffn), param(h), param(vocab, h))
    g1, be1, g2, be2 = param(h, scale=1.0) + 1, param(h), param(h, scale=1.0) + 1, param(h)
    x1, x2 = (torch.empty(rows, h, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    act = torch.empty(rows, ffn, device=DEV, dtype=torch.bfloat16)
    logits = torch.empty(rows, vocab, device=DEV, dtype=torch.bfloat16)
    st1, st2 = (torch.empty(h // 16, 16, 2, device=DEV) for _ in range(2))

    def chain():
        dl.launch(attn, w_proj, b_proj, x1, resid=resid, stats_out=st1, pdl=True, trigger=True)
        dl.launch(x1, w_fc1, b_fc1, act, act=1, norm=(st1, g1, be1, eps), pdl=True, trigger=True)
        dl.launch(act, w_fc2, b_fc2, x2, resid=x1, stats_out=st2, pdl=True, trigger=True)
        dl.launch(x2, w_head, None, logits, norm=(st2, g2, be2, eps), pdl=True)

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    attn.copy_(param(rows, h, scale=1.0))
    graph.replay()
    torch.cuda.synchronize()
    f = lambda t: t.float()  # noqa: E731
    refs = [(x1, f(resid) + f(attn) @ f(w_proj).t() + f(b_proj)),
            (act, F.gelu(F.layer_norm(f(x1), (h,), f(g1), f(be1), eps) @ f(w_fc1).t() + f(b_fc1), approximate="tanh")),
            (x2, f(x1) + f(act) @ f(w_fc2).t() + f(b_fc2)),
            (logits, F.layer_norm(f(x2), (h,), f(g2), f(be2), eps) @ f(w_head).t())]
    worst = max(((out.float() - ref).abs().max() / ref.abs().max()).item() for out, ref in refs)
    o = x2.float().view(rows, h // 16, 16)
    stats = torch.stack((o.sum(-1), o.square().sum(-1)), -1).transpose(0, 1)
    worst = max(worst, ((st2[:, :rows] - stats).abs().max() / stats.abs().max()).item())
    assert worst < 2e-2, (rows, worst)
    return worst


def configs(n: int, k: int):
    for ksplit in (2, 4, 8, 16):
        if k // (32 * ksplit) < 4:
            continue
        for unroll in (4, 8):
            for prefetch in (False, True):
                yield ksplit, unroll, prefetch


def sweep() -> dict:
    best = {}
    all_shapes = {**{nm: (n, k, LAYERS) for nm, (n, k) in SHAPES.items()}, **EXTRA}
    for name, (n, k, copies) in all_shapes.items():
        ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        bs = [torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(ROWS, k, device=DEV, dtype=torch.bfloat16)
        out = torch.empty(ROWS, n, device=DEV, dtype=torch.bfloat16)
        gelu = name == "fc1"
        mb = n * k * 2 / 1e6
        if gelu:
            t_ref = graph_us(lambda: [torch._addmm_activation(b, x, w.t(), use_gelu=True) for w, b in zip(ws, bs)])
        else:
            t_ref = graph_us(lambda: [torch.addmm(b, x, w.t(), out=out) for w, b in zip(ws, bs)])
        t_ref /= copies
        t_def = graph_us(lambda: [dl.launch(x, w, b, out, act=int(gelu)) for w, b in zip(ws, bs)]) / copies
        rows = []
        for config in configs(n, k):
            t = graph_us(lambda: [dl.launch(x, w, b, out, act=int(gelu), config=config)
                                  for w, b in zip(ws, bs)]) / copies
            rows.append((t, config))
        rows.sort()
        best[name] = rows[0][1]
        print(f"{name:9s} {mb:6.1f} MB: cuBLAS {t_ref:6.2f} µs ({mb / t_ref:.2f} TB/s) | kernel, engine's config "
              f"{dl.pick_config(n, k)} {t_def:6.2f} µs ({mb / t_def:.2f} TB/s) | best "
              + ", ".join(f"{c} {t:.2f}" for t, c in rows[:4]) + f" | worst {rows[-1][1]} {rows[-1][0]:.2f}",
              flush=True)
        del ws, bs
    return best


def steady() -> None:
    """One launch over a 1.6 GB weight (many waves): the kernel's streaming rate without launch ramps."""
    n, k = 24 * 16384, 2048
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(ROWS, k, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(ROWS, n, device=DEV, dtype=torch.bfloat16)
    gb = n * k * 2 / 1e9
    t = graph_us(lambda: torch.sum(w, dtype=torch.float32), reps=5, repeats=3)
    line = f"steady: {gb:.2f} GB weight; torch.sum {t:.0f} µs ({gb / t * 1e3:.2f} TB/s)"
    t = graph_us(lambda: torch.mm(x, w.t(), out=out), reps=5, repeats=3)
    line += f"; cuBLAS {t:.0f} µs ({gb / t * 1e3:.2f} TB/s)"
    for config in ((2, 4, True), (4, 4, True), (8, 4, True), (8, 4, False)):
        t = graph_us(lambda: dl.launch(x, w, None, out, config=config), reps=5, repeats=3)
        line += f"; {config} {gb / t * 1e3:.2f} TB/s"
    print(line, flush=True)


def chain(best: dict) -> None:
    """The 96 layer GEMMs of a step in step order: cuBLAS, the kernel, the kernel with programmatic dependent
    launch (each GEMM's weight loads start while the one before finishes), with and without an early trigger."""
    ws, bs, xs, outs = layer_tensors()
    gb = sum(n * k * 2 for n, k in SHAPES.values()) * LAYERS / 1e9

    def cublas():
        for i in range(LAYERS):
            for nm in SHAPES:
                if nm == "fc1":
                    torch._addmm_activation(bs[nm][i], xs[nm], ws[nm][i].t(), use_gelu=True)
                else:
                    torch.addmm(bs[nm][i], xs[nm], ws[nm][i].t(), out=outs[nm])

    def kernel(configs, pdl=False, trigger=False):
        def run():
            for i in range(LAYERS):
                for nm in SHAPES:
                    dl.launch(xs[nm], ws[nm][i], bs[nm][i], outs[nm], act=int(nm == "fc1"),
                              config=configs.get(nm), pdl=pdl, trigger=trigger)
        return run

    # the outputs of one variant against cuBLAS (same inputs: every variant computes the same products)
    kernel(best, pdl=True, trigger=True)()
    got = {nm: o.clone() for nm, o in outs.items()}
    cublas()
    for nm in ("qkv", "proj", "fc2"):
        err = (got[nm].float() - outs[nm].float()).abs().max().item()
        assert err < 0.05, (nm, err)
    variants = [("cuBLAS", cublas), ("kernel, tuned configs", kernel({})), ("kernel, this sweep's best", kernel(best)),
                ("tuned + PDL", kernel({}, pdl=True)), ("tuned + PDL + early trigger", kernel({}, True, True)),
                ("cuBLAS again", cublas)]
    for label, fn in variants:
        t = graph_us(fn, reps=10, repeats=3)
        print(f"chain of 96 layer GEMMs ({gb:.2f} GB): {label:30s} {t:7.0f} µs ({gb / t * 1e3:.2f} TB/s)", flush=True)


def main() -> None:
    t0 = time.time()
    parts = sys.argv[1:] or ["check", "sweep", "steady", "chain"]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    torch.manual_seed(0)
    if "check" in parts:
        for name, (n, k) in {**SHAPES, **{nm: v[:2] for nm, v in EXTRA.items()}}.items():
            print(f"check {name:9s} [{n}, {k}] config {dl.pick_config(n, k)}: max rel err {check(n, k):.1e}",
                  flush=True)
        for rows in (3, 16):
            print(f"check fused PDL chain, {rows} rows: max rel err {check_fused(rows):.1e}", flush=True)
    best = sweep() if "sweep" in parts else {}
    if "steady" in parts:
        steady()
    if "chain" in parts:
        chain(best)
    print("best configs:", best)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
