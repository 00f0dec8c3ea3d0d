"""Where a fast-engine decode step's time goes on the GPU: graph replay, per-kernel profile, and the floor.

Builds the benchmark's model (``bench_generate_gpu``: GPT-2 shape 1.31B, bf16, batch 16, 128 + 256 tokens),
captures the fast engine's decode step, and prints (1) ms per graph replay, (2) the kernels of one step
grouped by name with their share, (3) micro-benchmarks of the step's GEMM shapes and attention against the
copy bandwidth of the card, so the gap between the step and its memory-traffic floor is visible.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/profile_decode_gpu.py [--family llama]
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

import torch  # noqa: E402

# variants: "<compile mode or default>:<attend bucket>:<fused attention 1/0>"
VARIANTS = os.environ.get("PROFILE_VARIANTS", "default:64:1,default:64:0").split(",")
import torch.nn.functional as F  # noqa: E402


def graphed_ms(fn, reps: int = 50) -> float:
    """Milliseconds per call of ``fn`` captured ``reps`` times in one CUDA graph (launch cost excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / (5 * reps)


def main(argv=None) -> None:
    import bench_generate_gpu as bench
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer import generate_fast

    args = bench.parse_args(argv)
    with distributed(RuntimeConfig(layout=Layout())) as rt, torch.inference_mode():
        device, dtype = rt.device, bench.DTYPES[args.dtype]
        hf = bench.hf_model(args, device)
        ours, cfg = bench.megatron_model(hf, dtype)
        del hf
        torch.cuda.empty_cache()
        b, s, n = args.batch, args.prompt_len, args.new_tokens
        from trainer.generate import GenerationConfig, generate

        ids = torch.randint(1, args.vocab, (b, s), device=device)
        for variant in VARIANTS:
            mode, bucket, fused = variant.split(":")
            generate_fast.FUSED_ATTENTION = fused == "1"
            generate_fast.COMPILE_MODE = None if mode == "default" else mode
            generate_fast.ATTEND_BUCKET = int(bucket)
            generate_fast._ENGINES.clear()
            torch.cuda.empty_cache()

            def run(new):
                config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, eos_token_ids=(0,))
                return generate(ours, ids, None, config=config, vocab_size=cfg.vocab_size, engine="fast")

            t0 = time.perf_counter()
            run(n)  # cold: compile + one capture per attended length
            cold = time.perf_counter() - t0
            timing = {}
            for new in (1, n):
                run(new)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(new)
                torch.cuda.synchronize()
                timing[new] = time.perf_counter() - t0
            engine = generate_fast._ENGINES[ours]
            order = [engine.graphs[engine.graph_key(w)][0] for w in range(s, s + n - 1)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for graph in order:
                graph.replay()
            torch.cuda.synchronize()
            replay_ms = 1e3 * (time.perf_counter() - t0) / len(order)
            loop_ms = 1e3 * (timing[n] - timing[1]) / (n - 1)
            print(f"[{variant}] cold {cold:.1f} s; generate {b * n / timing[n]:.0f} tok/s; prefill+1 step "
                  f"{1e3 * timing[1]:.1f} ms; loop {loop_ms:.3f} ms/step; graph replay {replay_ms:.3f} ms/step "
                  f"(graphs: {sorted(engine.graphs)}; fused attention: {engine.fused_attention})", flush=True)

            from torch.profiler import ProfilerActivity, profile

            mid = engine.graphs[engine.graph_key(s + n // 2)][0]
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    mid.replay()
                torch.cuda.synchronize()
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_name: dict = {}
            for e in events:
                name = e.name[:90]
                tot, cnt = by_name.get(name, (0.0, 0))
                by_name[name] = (tot + e.device_time, cnt + 1)
            total = sum(t for t, _ in by_name.values())
            print(f"  mid-run step: {len(events) / 5:.0f} kernels, {total / 5 / 1e3:.3f} ms kernel time")
            for name, (tot, cnt) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
                print(f"  {tot / 5:8.1f} us/step {cnt / 5:5.0f}x  {100 * tot / total:5.1f}%  {name}")
            # the host loop around the graphs: what runs on the GPU besides the replays, and host time per op
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(33)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))

        if os.environ.get("PROFILE_MICRO", "1") == "0":
            return
        # the floor: bytes a step must read (weights + filled KV cache) at the card's copy bandwidth
        big = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(big)
        copy_ms = graphed_ms(lambda: dst.copy_(big), reps=10)
        bw = 2 * big.numel() / copy_ms / 1e6  # GB/s, read + write
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        kv = engine.k_cache.numel() * engine.k_cache.element_size() * 2 * (s + n // 2) / engine.length
        print(f"copy bandwidth {bw:.0f} GB/s; weights {weights / 1e9:.2f} GB + KV (mid-run) {kv / 1e9:.2f} GB -> "
              f"floor {1e3 * (weights + kv) / bw / 1e9:.3f} ms/step")
        del big, dst

        h = args.hidden
        x = torch.randn(b, h, device=device, dtype=dtype)
        # each GEMM shape over all layers' weights in turn (as a step reads them: from HBM, not L2)
        mods = {"qkv": lambda l: l.self_attention.linear_qkv, "proj": lambda l: l.self_attention.linear_proj,
                "fc1": lambda l: l.mlp.linear_fc1, "fc2": lambda l: l.mlp.linear_fc2}
        layers = engine.layers
        for name, get in mods.items():
            lins = [get(l) for l in layers]
            w0 = lins[0].weight
            inp = torch.randn(b, w0.size(1), device=device, dtype=dtype)
            res = torch.randn(b, w0.size(0), device=device, dtype=dtype)
            inp32 = torch.randn(32, w0.size(1), device=device, dtype=dtype)
            inp64 = torch.randn(64, w0.size(1), device=device, dtype=dtype)
            variants = {
                "linear+bias (addmm, Lt)": lambda: [F.linear(inp, m.weight, m.bias) for m in lins],
                "rows padded to 32": lambda: [F.linear(inp32, m.weight, m.bias) for m in lins],
                "rows padded to 64": lambda: [F.linear(inp64, m.weight, m.bias) for m in lins],
                "swapped: mm(w, x.T)": lambda: [torch.mm(m.weight, inp.t()) for m in lins],
                "linear, no bias (mm)": lambda: [F.linear(inp, m.weight) for m in lins],
                "addmm(residual C)": lambda: [torch.addmm(res, inp, m.weight.t()) for m in lins],
                "gelu epilogue": lambda: [torch._addmm_activation(m.bias, inp, m.weight.t(), use_gelu=True)
                                          for m in lins],
            }
            for label, fn in variants.items():
                ms = graphed_ms(fn, reps=4) / len(lins)
                print(f"  gemm {name:5} {tuple(w0.shape)} {label:24}: {1e3 * ms:6.1f} us, "
                      f"{w0.numel() * 2 / ms / 1e6:5.0f} GB/s (x{len(lins)} = {ms * len(lins):.3f} ms)")
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
            ms = graphed_ms(lambda: [F.linear(inp, m.weight, m.bias) for m in lins], reps=4) / len(lins)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
            print(f"  gemm {name:5} {tuple(w0.shape)} {'no reduced-prec. reduce':24}: {1e3 * ms:6.1f} us, "
                  f"{w0.numel() * 2 / ms / 1e6:5.0f} GB/s")
        head = engine.output_weight
        ms = graphed_ms(lambda: F.linear(x, head))
        print(f"  gemm head {tuple(head.shape)}: {1e3 * ms:7.1f} us, {head.numel() * 2 / ms / 1e6:6.0f} GB/s")
        a = engine.arch
        q = torch.randn(b, a.groups, a.heads // a.groups, a.head_dim, device=device, dtype=dtype)
        kc, vc = engine.k_cache[0], engine.v_cache[0]
        bias = torch.zeros(b, 1, 1, engine.length, device=device, dtype=dtype)
        for label, fn in {
            "sdpa masked, full cache": lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias),
            "sdpa no mask, full cache": lambda: F.scaled_dot_product_attention(q, kc, vc),
            "sdpa no mask, 256 slots": lambda: F.scaled_dot_product_attention(q, kc[:, :, :256], vc[:, :, :256]),
        }.items():
            ms = graphed_ms(fn)
            print(f"  {label}: {1e3 * ms:7.1f} us (x{a.num_layers} = {ms * a.num_layers:.3f} ms)")


if __name__ == "__main__":
    main()
