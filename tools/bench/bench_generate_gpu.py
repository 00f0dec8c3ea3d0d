"""Generation throughput: our Megatron-Core engine vs Transformers ``generate`` on the same weights, one job.

A random GPT (GPT-2 shape by default: hidden 2048 x 24 layers, ~1.3B parameters, or ``--family llama``) is
built once in Transformers, copied into a Megatron-Core GPTModel through the project's converter, and both
generate ``--new-tokens`` tokens for ``--batch`` prompts of ``--prompt-len`` random tokens, greedy and with
beam search. ``min_new_tokens = new_tokens`` so that every run produces exactly the same amount of work.
Ours runs three times: ``megatron`` (Megatron-Core's modules and inference context), ``fast``
(``trainer.generate_fast``: static-shape decode step replayed as a CUDA graph; eager on CPU) and
``fast-compiled`` (the same with the per-layer step compiled by ``torch.compile`` before capture; CUDA only);
a fast engine's warm-up is its cold first call (engine, compile and graph capture, reported as "cold"), then
a warm full-length run is timed.
Transformers runs with SDPA attention, with its dynamic cache and with its static cache; the faster is the
baseline. Throughput counts generated tokens per prompt: ``batch * new_tokens / seconds``.

GPU (the target): ``python tools/bench/bench_generate_gpu.py``  (bf16, batch 16, 128 + 256 tokens)
CPU smoke run:    ``python tools/bench/bench_generate_gpu.py --tiny``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The parser the generation benches start from: ``doc``'s first line as description, and ``--tiny``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model on CPU (fp32): checks the script runs")
    return p


def add_run_args(p: argparse.ArgumentParser, length: str, length_default: int, new_tokens: int) -> None:
    """The run options the generation benches share, after their model-shape ones: batch, input length
    (``length``), new tokens, beams, dtype, and skipping Transformers' static cache."""
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(length, type=int, default=length_default)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--beams", type=int, default=4, help="0: skip beam search")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-static-cache", action="store_true", help="skip Transformers' static-cache run")


def parse_bench_args(p: argparse.ArgumentParser, argv, tiny: dict) -> argparse.Namespace:
    """Add ``--json`` and parse ``argv``; with ``--tiny`` the values of ``tiny`` replace the parsed ones."""
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        vars(args).update(tiny)
    return args


def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    add_run_args(p, "--prompt-len", 128, new_tokens=256)
    return parse_bench_args(p, argv, dict(hidden=64, layers=2, heads=4, vocab=1000, batch=4, prompt_len=16,
                                          new_tokens=16))


def hf_model(args, device):
    import transformers

    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if args.family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
            n_positions=max(1024, args.prompt_len + args.new_tokens), **common,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
            max_position_embeddings=max(1024, args.prompt_len + args.new_tokens), tie_word_embeddings=False, **common,
        )
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    return model.to(dtype=DTYPES[args.dtype]).eval()


ENGINES = ("megatron", "fast", "fast-compiled")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def megatron_model(hf, dtype):
    from interop.convert_stream import hf_to_canonical
    from interop.families.base import family_for_hf
    from interop.megatron_model import build_gpt_model, load_canonical

    hf_config = hf.config.to_dict()
    family = family_for_hf(hf_config)
    cfg = family.config_from_hf(hf_config)
    state = hf.state_dict()
    model = build_gpt_model(cfg, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                            fp16=dtype == torch.float16)
    load_canonical(model, hf_to_canonical(family, cfg, lambda n: state[n].float()), cfg)
    return model.eval(), cfg


def graph_step_ms(model, device, prompt_len: int, new_tokens: int, reps: int = 3):
    """Milliseconds per decode step of the fast engine's captured graphs alone (None without graphs), replayed
    in the order a run uses them (one graph per attended length and row-table mode): how much of a loop step is the model itself,
    the rest being the host loop and prefill."""
    from trainer.generate_fast import _ENGINES

    engine = _ENGINES.get(model)
    if device.type != "cuda" or engine is None or not engine.graphs:
        return None
    keys = [engine.graph_key(w) for w in range(prompt_len, prompt_len + new_tokens - 1)]
    if any(key not in engine.graphs for key in keys):
        return None
    graphs = [engine.graphs[key][0] for key in keys]
    graphs[-1].replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / (reps * len(graphs))


def random_prompts(vocab: int, batch: int, length: int, low: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids in ``[low, vocab)`` of shape ``(batch, length)`` on ``device``, and an all-ones mask."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(low, vocab, (batch, length), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def hf_generate(hf, ids, mask, beams: int, cache: str, new: int, eos: int):
    """Transformers ``generate``: exactly ``new`` tokens, greedy or beam, with its ``cache`` (dynamic or static)."""
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, num_beams=beams, eos_token_id=eos, pad_token_id=0, **kwargs)


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` to ``path`` (``--json``) when one is given."""
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.generate import GenerationConfig, generate

    results: dict = {"args": vars(args), "rows": []}
    with distributed(RuntimeConfig(layout=Layout())) as rt:
        device = rt.device
        dtype = DTYPES[args.dtype]
        hf = hf_model(args, device)
        ours, cfg = megatron_model(hf, dtype)
        params = sum(p.numel() for p in hf.parameters())
        ids, mask = random_prompts(args.vocab, args.batch, args.prompt_len, 1, device)
        n = args.new_tokens

        def run_ours(beams, engine, new=n):
            config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, num_beams=beams, eos_token_ids=(0,))
            return generate(ours, ids, mask, config=config, vocab_size=cfg.vocab_size, engine=engine).tokens

        def run_hf(beams, cache, new=n):
            return hf_generate(hf, ids, mask, beams, cache, new, eos=0)

        modes = [("greedy", 1)] + ([(f"beam{args.beams}", args.beams)] if args.beams > 1 else [])
        caches = ["dynamic"] + ([] if args.no_static_cache else ["static"])
        print(f"model: {args.family}, {params / 1e9:.2f}B params, {args.dtype}, device {device}; batch {args.batch}, "
              f"prompt {args.prompt_len}, new {n}", flush=True)
        for mode, beams in modes:
            row = {"mode": mode}
            ours_tokens = {}
            for engine in ENGINES:
                key = engine.replace("-", "_")
                if engine.startswith("fast"):  # first call: engine (+ compile) + graph capture; then a warm run
                    from trainer import generate_fast

                    if engine == "fast-compiled" and device.type != "cuda":
                        continue  # the compiled step is for the CUDA graph path
                    generate_fast.COMPILE = engine == "fast-compiled"
                    captured, compiled = generate_fast.captures, generate_fast.compiled_captures
                    seconds, _ = timed(lambda: run_ours(beams, "fast"), device)
                    row[f"ours_{key}_cold"] = args.batch * n / seconds
                    row[f"{key}_cold_s"] = seconds
                    row[f"{key}_cuda_graph"] = generate_fast.captures > captured
                    row[f"{key}_compiled"] = generate_fast.compiled_captures > compiled
                    label = (" (CUDA graph" + (", compiled" if row[f"{key}_compiled"] else "") + ")"
                             if row[f"{key}_cuda_graph"] else " (eager: no CUDA graph)")
                    seconds, ours_tokens[engine] = timed(lambda: run_ours(beams, "fast"), device)
                else:
                    label = ""
                    run_ours(beams, engine, 4)  # warm-up (allocations, kernels)
                    seconds, ours_tokens[engine] = timed(lambda: run_ours(beams, engine), device)
                row[f"ours_{key}"] = args.batch * n / seconds
                print(f"  {mode}: ours ({engine}) {row[f'ours_{key}']:.1f} tok/s{label}"
                      + (f"; cold first call {row[f'{key}_cold_s']:.1f} s" if label else ""), flush=True)
                if engine.startswith("fast"):
                    row[f"{key}_graph_step_ms"] = graph_step_ms(ours, device, args.prompt_len, n)
                    if row[f"{key}_graph_step_ms"]:
                        step_ms = 1e3 * args.batch / row[f"ours_{key}"]  # per generated token
                        print(f"  {mode}: {engine} decode step alone (graph replay) "
                              f"{row[f'{key}_graph_step_ms']:.3f} ms; whole loop {step_ms:.3f} ms per step "
                              "(prefill and host work included)", flush=True)
            for engine in ENGINES[1:]:
                if engine in ours_tokens:
                    same = sum(a == b for a, b in zip(ours_tokens["megatron"], ours_tokens[engine]))
                    row[f"{engine.replace('-', '_')}_vs_megatron_rows"] = f"{same}/{len(ours_tokens[engine])}"
            best_ours = "fast_compiled" if row.get("fast_compiled_compiled") else "fast"
            row["best_ours"] = best_ours
            for cache in caches:
                try:
                    # warm-up; with a static cache on CUDA Transformers compiles the forward, whose shapes
                    # depend on the cache length, so its warm-up is a full-length run
                    run_hf(beams, cache, n if cache == "static" else 4)
                    seconds, hf_out = timed(lambda: run_hf(beams, cache), device)
                    row[f"hf_{cache}"] = args.batch * n / seconds
                    print(f"  {mode}: transformers ({cache} cache) {row[f'hf_{cache}']:.1f} tok/s", flush=True)
                    if cache == "dynamic":
                        hf_tokens = hf_out[:, args.prompt_len:].tolist()
                        same = sum(a == b for a, b in zip(ours_tokens[best_ours.replace("_", "-")], hf_tokens))
                        row["identical_rows"] = f"{same}/{len(hf_tokens)}"
                except Exception as exc:  # a cache mode this Transformers/model does not support
                    row[f"hf_{cache}"] = None
                    print(f"  transformers {cache} cache failed: {type(exc).__name__}: {exc}", flush=True)
            best = max((v for k, v in row.items() if k.startswith("hf_") and v), default=None)
            row["speedup"] = row[f"ours_{best_ours}"] / best if best else float("nan")
            row["speedup_fast_uncompiled"] = row["ours_fast"] / best if best else float("nan")
            row["speedup_megatron"] = row["ours_megatron"] / best if best else float("nan")
            results["rows"].append(row)
    header = (f"{'mode':8} {'ours-megatron':>13} {'ours-fast':>11} {'fast-comp':>11} {'fast ms':>8} {'comp ms':>8} "
              f"{'HF dynamic':>11} {'HF static':>11} {'best/bestHF':>11} {'fast/bestHF':>11} {'meg/bestHF':>10} "
              f"{'best=HFdyn':>10} {'fast=meg':>8} {'comp=meg':>8}")
    print(header)
    print("  (fast ms / comp ms: one graph replay of the decode step; best = fast-compiled when it compiled)")
    for r in results["rows"]:
        fmt = lambda v, w=11, d=1: f"{v:{w}.{d}f}" if v else f"{'-':>{w}}"  # noqa: E731
        print(f"{r['mode']:8} {fmt(r['ours_megatron'], 13)} {fmt(r['ours_fast'])} {fmt(r.get('ours_fast_compiled'))} "
              f"{fmt(r.get('fast_graph_step_ms'), 8, 3)} {fmt(r.get('fast_compiled_graph_step_ms'), 8, 3)} "
              f"{fmt(r.get('hf_dynamic'))} {fmt(r.get('hf_static'))} {r['speedup']:10.2f}x "
              f"{r['speedup_fast_uncompiled']:10.2f}x {r['speedup_megatron']:9.2f}x "
              f"{r.get('identical_rows', '-'):>10} {r['fast_vs_megatron_rows']:>8} "
              f"{r.get('fast_compiled_vs_megatron_rows', '-'):>8}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
