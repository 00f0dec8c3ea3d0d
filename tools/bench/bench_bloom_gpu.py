"""BLOOM (ALiBi) on one GPU: training and greedy generation, ours against Transformers' ``BloomForCausalLM``, one job.

(a) Training: our trainer (``trainer.run.rank_main``, the code path of ``interop train``; Megatron-Core GPT with the
ALiBi core attention of ``interop.alibi``: SDPA with a ``[1, heads, s, s]`` bias, and the word-embedding LayerNorm)
against Transformers' ``BloomForCausalLM`` (bf16 autocast, fused AdamW). Transformers' BLOOM has no SDPA / flash
path: its attention is eager — ``alibi.baddbmm(q, kᵀ)`` materialising the ``[batch · heads, s, s]`` scores, an
fp32 softmax and a bmm with V — so its micro-batch is smaller (same tokens per step: ``--hf-micro-batch``). Both
sides count the same model FLOPs (``bench_train_gpu.model_flops_per_token``), so their MFU compares directly. Our
fused linear cross-entropy (``trainer.kernels.linear_cross_entropy``, Liger) applies at TP1 bf16 when the
vocabulary needs no padding: BLOOM's 250,880 = 1,960 × 128, so it does; the report says whether it was installed.
A micro-batch that runs out of memory is retried at half the size (printed).

(b) Greedy generation, batch 16, 128-token random prompts, 128 new tokens (``min_new_tokens`` = 128: the same
work on both sides): our fast decode engine (``trainer.generate_fast``: ALiBi in the Triton decode kernels, CUDA
graph per token, compiled step; its cold first call — compile and capture — is reported separately; the table
names the attention its decode step ran: the Triton kernels, any head size, or the SDPA fallback) against
Transformers' ``generate`` (dynamic cache; static cache if this Transformers supports it for BLOOM). The first
``--agree-tokens`` generated tokens of each row are compared (bf16 on a random model: near-ties can flip a row).

Each variant runs on its own: one that fails prints its error and the others go on; one short table at the end.

    python tools/bench/bench_bloom_gpu.py                       # bloom-1b1 shape (1.07B), H100/H200, ~5 min
    python tools/bench/bench_bloom_gpu.py --preset bloom-1b7    # hidden 2048
    python tools/bench/bench_bloom_gpu.py --tiny                # CPU smoke run (fp32)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_generate_gpu  # noqa: E402
import bench_train_gpu  # noqa: E402

PRESETS = {
    "bloom-1b1": dict(layers=24, hidden=1536, heads=16, vocab=250880),
    "bloom-1b7": dict(layers=24, hidden=2048, heads=16, vocab=250880),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="bloom-1b1")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="ours, samples per micro-batch")
    p.add_argument("--num-micro", type=int, default=2, help="micro-batches per step (ours)")
    p.add_argument("--hf-micro-batch", type=int, default=2,
                   help="Transformers' micro-batch (its eager attention stores [b, h, s, s] scores); same samples "
                        "per step")
    p.add_argument("--hf-mode", choices=["eager", "compile"], default="eager",
                   help="Transformers as is, or with torch.compile of the whole model")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="generation: prompts")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-static-cache", action="store_true", help="skip Transformers' static-cache generate")
    p.add_argument("--agree-tokens", type=int, default=16, help="generation: compare the first N tokens per row")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny BLOOM on CPU (fp32): checks the script runs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, value)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.vocab, args.seq = 2, 48, 6, 512, 64
        args.micro_batch, args.num_micro, args.hf_micro_batch, args.steps, args.warmup = 2, 2, 1, 4, 1
        args.batch, args.prompt_len, args.new_tokens, args.agree_tokens = 4, 16, 8, 8
    return args


# ------------------------------------------------------------------------------------------ (a) training


def train_args(args):
    """bench_train_gpu's namespace for this BLOOM shape (its family choices stop at gpt2/llama: set after)."""
    targs = bench_train_gpu.parse_args([
        "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
        "--seq", str(args.seq), "--vocab", str(args.vocab), "--micro-batch", str(args.micro_batch),
        "--num-micro", str(args.num_micro), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--peak-tflops", str(args.peak_tflops), "--hf-micro-batch", str(args.hf_micro_batch),
        "--hf-mode", args.hf_mode,
    ])
    targs.family, targs.ffn = "bloom", 4 * args.hidden
    return targs


def hf_bloom(args, device, liger: bool):
    """Transformers' BLOOM of the benchmark's shape (eager attention: the only one it has), fp32 weights."""
    import transformers

    config = transformers.BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers,
                                      n_head=args.heads, hidden_dropout=0.0, attention_dropout=0.0,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = transformers.BloomForCausalLM._from_config(config).to(device)
    HF_INFO["attn_implementation"] = model.config._attn_implementation
    HF_INFO["transformers"] = transformers.__version__
    return model, []


HF_INFO: dict = {}  # what the Transformers model ran with (filled by hf_bloom)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def with_smaller_micro_batches(run, targs, field: str, report: dict, label: str):
    """``run(targs)``; on CUDA out-of-memory, again at half the micro-batch (same samples per step) down to 1."""
    while True:
        try:
            return run(targs)
        except torch.OutOfMemoryError:
            free_memory()
            micro = getattr(targs, field) or targs.micro_batch
            if micro <= 1:
                raise
            print(f"  {label}: out of memory at micro-batch {micro}, retrying at {micro // 2}", flush=True)
            if field == "micro_batch":
                targs.num_micro *= 2
            setattr(targs, field, micro // 2)
            report.setdefault("oom_retries", []).append(f"{label} micro-batch {micro}")


def bench_train(args, cuda: bool, report: dict) -> None:
    targs = train_args(args)
    fpt = bench_train_gpu.model_flops_per_token(targs)
    report["train_model"] = (f"bloom {targs.layers}L h{targs.hidden} {targs.heads} heads ffn{targs.ffn} "
                             f"seq{targs.seq} vocab{targs.vocab}, {bench_train_gpu.matrix_params(targs) / 1e9:.2f}B "
                             "matrix params")
    for side in ("ours", "hf"):
        free_memory()
        try:
            if side == "ours":
                out = with_smaller_micro_batches(lambda t: bench_train_gpu.run_ours(t, 1, cuda), targs,
                                                 "micro_batch", report, "ours")
                out["micro_batch"], out["num_micro"] = targs.micro_batch, targs.num_micro
                # bench_train_gpu's flag names the trainer's SDPA core; BLOOM's is interop.alibi's (a family's own
                # core attention wins): SDPA with an additive [1, heads, s, s] bias, PyTorch picks the backend
                out["kernels"].pop("cudnn_attention", None)
                out["attention"] = "interop.alibi SDPA + additive ALiBi bias"
            else:
                out = with_smaller_micro_batches(lambda t: bench_train_gpu.run_hf(t, cuda, build=hf_bloom), targs,
                                                 "hf_micro_batch", report, "transformers")
                out["attention"] = (f"{HF_INFO.get('attn_implementation')} (Transformers "
                                    f"{HF_INFO.get('transformers')}: BLOOM has no SDPA path; baddbmm ALiBi + fp32 "
                                    "softmax)")
            out["tflops_per_gpu"] = out["tokens_per_s"] * fpt / 1e12
            out["mfu"] = out["tflops_per_gpu"] / args.peak_tflops if cuda else None
            report[f"train_{side}"] = out
            print(f"  train {side}: {out['tokens_per_s']:.0f} tok/s, {out['tflops_per_gpu']:.1f} TFLOP/s, "
                  f"peak {out['peak_memory_gb']:.1f} GiB, micro-batch {out['micro_batch']}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the others go on
            report[f"train_{side}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"  train {side} FAILED: {report[f'train_{side}']['error']}", flush=True)
            traceback.print_exc()


# ------------------------------------------------------------------------------------------ (b) generation


def agreement(ours: list[list[int]], hf: list[list[int]], n: int) -> dict:
    """Rows whose first ``n`` tokens agree, and the mean length of the agreeing prefix (capped at n)."""
    prefix = []
    for a, b in zip(ours, hf):
        k = 0
        while k < min(n, len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k)
    return {"rows_equal": f"{sum(k == n for k in prefix)}/{len(prefix)}",
            "mean_prefix": sum(prefix) / max(1, len(prefix))}


def decode_attention_used(engine) -> str:
    """What the fast engine's decode step attended with: the Triton kernels (at which head size, walked as which
    power of two) or the SDPA fallback (bloom-1b1's head size 96 fell back to SDPA before the kernels took any
    size)."""
    if engine is None:
        return "no fast engine"
    from trainer import decode_attention

    d = engine.arch.head_dim
    if engine.fused_attention:
        return (f"Triton decode kernels (trainer.decode_attention, ALiBi in-kernel), head_dim {d} "
                f"(walked as {decode_attention.padded_head_dim(d)})")
    return f"SDPA over the bucketed cache + [B, heads, L] ALiBi bias (fallback), head_dim {d}"


def bench_generate(args, cuda: bool, report: dict) -> None:
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer import generate_fast
    from trainer.generate import GenerationConfig, generate

    free_memory()
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.new_tokens
    with distributed(RuntimeConfig(layout=Layout())) as rt:
        device = rt.device
        hf, _ = hf_bloom(args, device, liger=False)
        hf = hf.to(dtype).eval()
        ours, cfg = bench_generate_gpu.megatron_model(hf, dtype)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(4, args.vocab, (args.batch, args.prompt_len), generator=gen).to(device)
        mask = torch.ones_like(ids)
        tokens = {}

        def run_ours():
            config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_ids=(2,))
            return generate(ours, ids, mask, config=config, vocab_size=cfg.vocab_size, engine="fast").tokens

        def run_hf(cache, new=n):
            kwargs = dict(cache_implementation="static") if cache == "static" else {}
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  eos_token_id=2, pad_token_id=3, **kwargs)
            return out[:, args.prompt_len:].tolist()

        try:
            captured, compiled = generate_fast.captures, generate_fast.compiled_captures
            cold, _ = bench_generate_gpu.timed(run_ours, device)
            seconds, tokens["ours"] = bench_generate_gpu.timed(run_ours, device)
            engine = generate_fast.engine_of(ours)
            report["generate_ours"] = {
                "tokens_per_s": args.batch * n / seconds, "cold_first_call_s": cold,
                "cuda_graph": generate_fast.captures > captured,
                "compiled": generate_fast.compiled_captures > compiled,
                "triton_decode_attention": bool(engine and engine.fused_attention),
                "decode_attention": decode_attention_used(engine),
            }
            print(f"  generate ours (fast engine): {args.batch * n / seconds:.1f} tok/s; cold first call "
                  f"{cold:.1f} s; {report['generate_ours']}", flush=True)
        except Exception as exc:  # noqa: BLE001
            report["generate_ours"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            print(f"  generate ours FAILED: {report['generate_ours']['error']}", flush=True)
            traceback.print_exc()
        for cache in ("dynamic",) + (() if args.no_static_cache else ("static",)):
            try:
                # warm-up; a static cache compiles for its length on CUDA: a full-length warm-up
                run_hf(cache, n if cache == "static" else 4)
                seconds, tokens[cache] = bench_generate_gpu.timed(lambda: run_hf(cache), device)
                report[f"generate_hf_{cache}"] = {"tokens_per_s": args.batch * n / seconds}
                print(f"  generate transformers ({cache} cache): {args.batch * n / seconds:.1f} tok/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. no static cache for BLOOM in this Transformers
                report[f"generate_hf_{cache}"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                print(f"  generate transformers ({cache} cache) FAILED: {report[f'generate_hf_{cache}']['error']}",
                      flush=True)
        if "ours" in tokens and "dynamic" in tokens:
            report["generate_agreement"] = agreement(tokens["ours"], tokens["dynamic"], args.agree_tokens)
        generate_fast.release(ours)


# ------------------------------------------------------------------------------------------ report


def table(report: dict, args) -> str:
    def val(section, key, fmt="{:.0f}"):
        value = report.get(section, {}).get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    def ratio(a, b):
        x, y = report.get(a, {}).get("tokens_per_s"), report.get(b, {}).get("tokens_per_s")
        return f"{x / y:.2f}x" if x and y else "-"

    hf_best = max(("generate_hf_dynamic", "generate_hf_static"),
                  key=lambda k: report.get(k, {}).get("tokens_per_s") or 0)
    lines = [
        f"{'':28} {'ours':>12} {'transformers':>14} {'ours/HF':>8}",
        f"{'train tokens/s':28} {val('train_ours', 'tokens_per_s'):>12} {val('train_hf', 'tokens_per_s'):>14} "
        f"{ratio('train_ours', 'train_hf'):>8}",
        f"{'train MFU':28} {val('train_ours', 'mfu', '{:.1%}'):>12} {val('train_hf', 'mfu', '{:.1%}'):>14}",
        f"{'train peak GiB':28} {val('train_ours', 'peak_memory_gb', '{:.1f}'):>12} "
        f"{val('train_hf', 'peak_memory_gb', '{:.1f}'):>14}",
        f"{'train micro-batch':28} {val('train_ours', 'micro_batch'):>12} {val('train_hf', 'micro_batch'):>14}",
        f"{'greedy tokens/s (' + hf_best.split('_')[-1] + ')':28} {val('generate_ours', 'tokens_per_s', '{:.1f}'):>12} "
        f"{val(hf_best, 'tokens_per_s', '{:.1f}'):>14} {ratio('generate_ours', hf_best):>8}",
    ]
    agree = report.get("generate_agreement")
    if agree:
        lines.append(f"first {args.agree_tokens} tokens equal: {agree['rows_equal']} rows, mean agreeing prefix "
                     f"{agree['mean_prefix']:.1f}")
    if report.get("generate_ours", {}).get("decode_attention"):
        lines.append(f"our decode attention: {report['generate_ours']['decode_attention']}")
    kernels = report.get("train_ours", {}).get("kernels")
    if kernels:
        lines.append(f"our fused kernels: {kernels}")
    for side in ("train_ours", "train_hf"):
        if report.get(side, {}).get("attention"):
            lines.append(f"{side} attention: {report[side]['attention']}")
    lines += [f"{key}: {value['error']}" for key, value in report.items()
              if isinstance(value, dict) and "error" in value]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": "bf16" if cuda else "fp32",
              "args": vars(args)}
    print(f"BLOOM benchmark: {args.preset if not args.tiny else 'tiny'} on {report['device']}", flush=True)
    start = time.perf_counter()
    if not args.skip_train:
        bench_train(args, cuda, report)
    if not args.skip_generate:
        try:
            bench_generate(args, cuda, report)
        except Exception as exc:  # noqa: BLE001 - e.g. the model did not fit: the training numbers still print
            report["generate_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"  generation FAILED: {report['generate_error']}", flush=True)
            traceback.print_exc()
    report["wall_s"] = time.perf_counter() - start
    print(table(report, args), flush=True)
    print(f"(wall {report['wall_s']:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
