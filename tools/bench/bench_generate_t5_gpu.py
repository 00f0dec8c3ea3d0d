"""T5 generation throughput: ours (``trainer.generate_seq2seq`` over Megatron-Core's T5Model with the
:mod:`interop.t5` spec, its fast engine :mod:`trainer.generate_seq2seq_fast`) vs Transformers ``generate`` on the
same weights, one job.

A random T5 of T5-large's shape (v1.0: d_model 1024, 24 + 24 layers, 16 heads of 64, d_ff 4096, vocabulary
32128, ~738M parameters: T5-large's nominal 770M; ``--version 1.1`` for the gated-GELU / untied-head variant)
is built in Transformers, mapped into a Megatron-Core T5Model through :mod:`interop.t5.tensor_map`, and both generate
``--new-tokens`` tokens for ``--batch`` inputs of ``--input-len`` random tokens, greedy and with beam search.
``min_new_tokens = new_tokens`` so that every run does the same amount of work. Transformers runs with SDPA
attention, with its dynamic cache and (when it works for T5) its static cache; the faster is the baseline.
Throughput counts generated tokens per input: ``batch * new_tokens / seconds``; each timed run follows a
full warm-up run (compile, graph capture). The final table: ours vs Transformers' best cache, tokens/s, peak
memory, and how many rows' first ``--agree-tokens`` tokens agree (bf16 may diverge late).

GPU (the target): ``python tools/bench/bench_generate_t5_gpu.py``  (bf16, batch 16, 256 + 128 tokens)
CPU smoke run:    ``python tools/bench/bench_generate_t5_gpu.py --tiny``
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tools.bench.bench_generate_gpu import (  # noqa: E402
    DTYPES,
    add_run_args,
    bench_parser,
    hf_generate,
    parse_bench_args,
    random_prompts,
    timed,
    write_json,
)


def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--version", choices=["1.0", "1.1"], default="1.0")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32128)
    add_run_args(p, "--input-len", 256, new_tokens=128)
    p.add_argument("--no-dynamic-cache", action="store_true", help="skip Transformers' dynamic-cache run")
    p.add_argument("--compare-megatron", action="store_true",
                   help="also time our Megatron-Core-module path (trainer.generate_seq2seq engine='megatron')")
    p.add_argument("--agree-tokens", type=int, default=32, help="tokens-agree check over this many first tokens")
    return parse_bench_args(p, argv, dict(d_model=64, layers=2, heads=4, d_ff=128, vocab=1000, batch=4, input_len=16,
                                          new_tokens=8, dtype="fp32"))


def hf_model(args, device):
    import transformers

    proj = "relu" if args.version == "1.0" else "gated-gelu"
    cfg = transformers.T5Config(
        vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=args.d_ff,
        num_layers=args.layers, num_heads=args.heads, feed_forward_proj=proj, dropout_rate=0.0,
        tie_word_embeddings=args.version == "1.0", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(cfg)
        if args.version == "1.1":  # Transformers 5 ties T5's lm_head in memory; v1.1 has its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model.to(dtype=DTYPES[args.dtype]).eval()


def megatron_model(hf, args):
    from interop.t5.config import T5Config
    from interop.t5.spec import build_t5_model
    from interop.t5.tensor_map import hf_to_megatron, load_into_model

    dtype = DTYPES[args.dtype]
    cfg = T5Config.from_hf(hf.config, untied_lm_head=args.version == "1.1")
    state = {k: v.float() for k, v in hf.state_dict().items()}
    model = build_t5_model(cfg, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                           fp16=dtype == torch.float16)
    load_into_model(model, hf_to_megatron(state, cfg), cfg)
    return model.eval(), cfg


def _peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _agreement(ours: list[list[int]], theirs: list[list[int]], first: int) -> str:
    """'rows whose first ``first`` tokens agree / rows; mean common prefix' (bf16 may diverge late)."""
    prefixes = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    same = sum(p >= min(first, len(a)) for p, a in zip(prefixes, ours))
    return f"{same}/{len(prefixes)} rows, prefix {sum(prefixes) / len(prefixes):.0f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer import generate_seq2seq, generate_seq2seq_fast
    from trainer.generate import GenerationConfig

    results: dict = {"args": vars(args), "rows": []}
    with distributed(RuntimeConfig(layout=Layout())) as rt:
        device = rt.device
        hf = hf_model(args, device)
        ours, cfg = megatron_model(hf, args)
        params = sum(p.numel() for p in hf.parameters())
        ids, mask = random_prompts(args.vocab, args.batch, args.input_len, 2, device)
        n = args.new_tokens

        def run_ours(beams, engine, new=n):
            config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, num_beams=beams, eos_token_ids=(1,))
            tokens = generate_seq2seq.generate_seq2seq(ours, ids, mask, config=config, vocab_size=cfg.vocab_size,
                                                       engine=engine).tokens
            if generate_seq2seq.last_engine[0] != ("megatron" if engine == "megatron" else "fast"):
                raise RuntimeError(f"engine {engine} did not run: {generate_seq2seq.last_engine}")
            return tokens

        def run_hf(beams, cache, new=n):
            return hf_generate(hf, ids, mask, beams, cache, new, eos=1)

        modes = [("greedy", 1)] + ([(f"beam{args.beams}", args.beams)] if args.beams > 1 else [])
        caches = ([] if args.no_dynamic_cache else ["dynamic"]) + ([] if args.no_static_cache else ["static"])
        engines = ["fast"] + (["megatron"] if args.compare_megatron else [])
        print(f"model: T5 v{args.version}, {params / 1e6:.0f}M params, {args.dtype}, device {device}; "
              f"batch {args.batch}, input {args.input_len}, new {n}", flush=True)
        for mode, beams in modes:
            row = {"mode": mode}
            for engine in engines:
                key = "ours" if engine == "fast" else "ours_megatron"
                t0 = time.perf_counter()
                run_ours(beams, engine)  # warm-up: compile, graph capture, allocations
                row[f"{key}_warmup_s"] = time.perf_counter() - t0
                _reset_peak(device)
                seconds, tokens = timed(lambda: run_ours(beams, engine), device)
                row[key], row[f"{key}_peak_mb"] = args.batch * n / seconds, _peak_mb(device)
                if engine == "fast":
                    ours_tokens = tokens
                print(f"  {mode}: {key} {row[key]:.1f} tok/s (warm-up {row[f'{key}_warmup_s']:.1f} s)", flush=True)
            print(f"  fast-engine graphs captured: {generate_seq2seq_fast.captures}", flush=True)
            for cache in caches:
                try:
                    run_hf(beams, cache, n if cache == "static" else 4)  # static: compiled per cache length
                    _reset_peak(device)
                    seconds, hf_out = timed(lambda: run_hf(beams, cache), device)
                    row[f"hf_{cache}"], row[f"hf_{cache}_peak_mb"] = args.batch * n / seconds, _peak_mb(device)
                    print(f"  {mode}: transformers ({cache} cache) {row[f'hf_{cache}']:.1f} tok/s", flush=True)
                    hf_tokens = hf_out[:, 1:].tolist()  # the decoder start token dropped
                    row[f"agree_{cache}"] = _agreement(ours_tokens, hf_tokens, args.agree_tokens)
                except Exception as exc:  # a cache mode this Transformers/model does not support
                    row[f"hf_{cache}"] = None
                    print(f"  transformers {cache} cache failed: {type(exc).__name__}: {exc}", flush=True)
            best = max(caches, key=lambda c: row.get(f"hf_{c}") or 0, default=None)
            row["hf_best"] = best if best and row.get(f"hf_{best}") else None
            row["speedup"] = row["ours"] / row[f"hf_{best}"] if row["hf_best"] else float("nan")
            results["rows"].append(row)
    mb = lambda v: f"{v:,.0f}" if v else "-"  # noqa: E731
    print(f"\n{'mode':7} {'ours tok/s':>10} {'ours MB':>8} {'HF best':>14} {'HF tok/s':>9} {'HF MB':>8} "
          f"{'ours/HF':>8}  first {args.agree_tokens} tokens agree")
    for r in results["rows"]:
        best = r["hf_best"]
        hf_rate = r.get(f"hf_{best}") if best else None
        print(f"{r['mode']:7} {r['ours']:10.1f} {mb(r['ours_peak_mb']):>8} {(best or '-') + ' cache':>14} "
              f"{hf_rate or 0:9.1f} {mb(r.get(f'hf_{best}_peak_mb')):>8} {r['speedup']:7.2f}x  "
              f"{r.get(f'agree_{best}', '-')}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
