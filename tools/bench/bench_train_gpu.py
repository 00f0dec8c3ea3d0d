"""Training throughput of our Megatron-Core trainer vs Hugging Face (GPT2LMHeadModel / LlamaForCausalLM).

Runs a GPT-2-style model (default 24 layers, hidden 1024, 16 heads = ~350M parameters, seq 2048, bf16) or a
Llama-family one (``--family llama``: RoPE, RMSNorm, SwiGLU, GQA) on synthetic tokens for a few dozen steps
through ``trainer.run.rank_main`` (the same code path as ``interop train``), then the same-size HF model on rank
0 in the same job, and prints tokens/s, TFLOP/s per GPU, MFU (against ``--peak-tflops``, 989 = H100 SXM dense
bf16) and peak memory. HF runs eager (SDPA, bf16 autocast, fused AdamW) or, with ``--hf-mode compile``, the
strongest setup we can build: the same plus ``torch.compile`` and Liger's kernels where Liger has them (Llama:
RoPE, RMSNorm, SwiGLU, fused linear cross-entropy; GPT-2: none). ``--disable`` switches one of our fused kernels
off (``trainer.kernels``) for an ablation.

    python tools/bench/bench_train_gpu.py --preset gpt2-1.3b                # 1 GPU, 1.3B GPT-2 shape
    python tools/bench/bench_train_gpu.py --preset llama-1.2b --hf-mode compile-liger --micro-batch 8 --num-micro 2 --hf-micro-batch 4
    python tools/bench/bench_train_gpu.py --preset gpt2-1.3b --disable linear_cross_entropy --no-baseline
    python tools/bench/bench_train_gpu.py                                   # 1 GPU
    torchrun --nproc-per-node 2 tools/bench/bench_train_gpu.py --tp 2       # TP2
    torchrun --nproc-per-node 2 tools/bench/bench_train_gpu.py --distributed-optimizer   # DP2 + dist. opt.
    python tools/bench/bench_train_gpu.py --tiny                            # CPU smoke test (fp32)

FLOPs are model FLOPs (6·N per token over the matrix weights incl. the logits + causal-free attention
12·L·h·s, the same formula for both sides), so the MFU of the two sides is directly comparable. The first ``--warmup`` steps are excluded from the timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


PRESETS = {
    # GPT-2 shape at 1.3B (the BENCHMARKS rows since issue 6)
    "gpt2-1.3b": dict(family="gpt2", layers=24, hidden=2048, heads=16, vocab=50257),
    # Llama-3.2-1B shape: 16 layers, hidden 2048, 32 heads / 8 KV groups, SwiGLU 8192, vocab 128256, tied (1.24B)
    "llama-1.2b": dict(family="llama", layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=128256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a model shape (overrides the sizes)")
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--kv-heads", type=int, default=None, help="llama: query groups (GQA)")
    p.add_argument("--ffn", type=int, default=None, help="MLP hidden size (default 4h for gpt2, the llama rule)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch per GPU")
    p.add_argument("--num-micro", type=int, default=1, help="micro-batches per step per DP rank")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--attention", choices=["sdpa", "local"], default="sdpa",
                   help="our core attention: SDPA (default) or Megatron-Core's unfused local one")
    p.add_argument("--unfused-adam", action="store_true",
                   help="ablation: keep Megatron-Core's multi-tensor torch AdamW (skip trainer.optim.use_fused_adam)")
    p.add_argument("--no-bda-fusion", action="store_true",
                   help="ablation: unfused bias + dropout + residual add on the GPU")
    p.add_argument("--no-foreach-grad-ops", action="store_true",
                   help="ablation: Megatron-Core's per-tensor grad-norm / clip-scale fallbacks (a host sync per tensor)")
    p.add_argument("--disable", action="append", default=[], metavar="KERNEL",
                   help="ablation: switch off one of trainer.kernels.KERNELS (repeatable; 'all' for every one)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--no-baseline", action="store_true", help="skip the HF baseline")
    p.add_argument("--hf-only", action="store_true", help="only the HF run (e.g. the compiled one in its own process)")
    p.add_argument("--hf-mode", choices=["eager", "compile", "compile-liger"], default="eager",
                   help="HF eager; torch.compile of the whole model; or (Llama) Liger's kernels with the decoder "
                        "compiled and Liger's fused linear cross-entropy eager (dynamo cannot trace it)")
    p.add_argument("--hf-micro-batch", type=int, default=None,
                   help="HF micro-batch (same tokens per step: micro-batch x num-micro is kept)")
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU-friendly (smoke test)")
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 2, 64, 4, 64, 512
        args.micro_batch, args.steps, args.warmup = 2, 6, 2
    return args


def ffn_size(args) -> int:
    if args.ffn:
        return args.ffn
    return 4 * args.hidden if args.family == "gpt2" else (int(8 * args.hidden / 3) + 63) // 64 * 64


def matrix_params(args) -> int:
    """Weights of the matrix products per token: attention Q, K, V, O; MLP (two or, gated, three); the logits."""
    h, kv = args.hidden, (args.kv_heads or args.heads) * (args.hidden // args.heads)
    mlp = (3 if args.family == "llama" else 2) * h * ffn_size(args)
    return args.layers * (2 * h * h + 2 * h * kv + mlp) + h * args.vocab


def model_flops_per_token(args) -> float:
    """6 FLOPs per matrix weight (fwd + bwd) + attention scores and values 12·L·h·s (the usual MFU convention,
    no causal discount). For GPT-2 this is the old 6·(12·L·h² + h·V) + 12·L·h·s."""
    return 6.0 * matrix_params(args) + 12.0 * args.layers * args.hidden * args.seq


def run_ours(args, world: int, cuda: bool) -> dict:
    import trainer.kernels
    import trainer.loop
    import trainer.model
    from trainer.config import ArchConfig, TrainConfig
    from trainer.run import rank_main

    trainer.kernels.disabled.update(trainer.kernels.KERNELS if "all" in args.disable else args.disable)
    if args.unfused_adam:
        trainer.loop.use_fused_adam = lambda optimizer: 0
    if args.no_bda_fusion:
        overrides = trainer.model.train_overrides
        trainer.model.train_overrides = lambda cfg: dict(overrides(cfg), bias_dropout_fusion=False)

    if args.no_foreach_grad_ops:
        trainer.loop.use_foreach_grad_ops = lambda: False

    dp = world // args.tp
    log_dir = tempfile.mkdtemp(prefix="bench-train-")
    cfg = TrainConfig(
        arch=ArchConfig(family=args.family, num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, num_query_groups=args.kv_heads, ffn_hidden_size=ffn_size(args),
                        vocab_size=args.vocab, max_position_embeddings=args.seq),
        tp_degree=args.tp, sequence_parallelism=args.sequence_parallel,
        use_distributed_optimizer=args.distributed_optimizer, recompute_activations=args.recompute,
        attention_backend=args.attention,
        mixed_precision="bf16" if cuda else "no",
        micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch * args.num_micro * dp,
        seq_length=args.seq, synthetic_data=True, train_iters=args.steps, lr=1e-4, lr_warmup_iters=0,
        lr_decay_style="constant", log_dir=log_dir, plot=False, progress=False, peak_tflops=args.peak_tflops,
        world_size=world,
    )
    installed = {}

    def after(tr, result):
        from trainer.kernels.linear_cross_entropy import uses_fused_loss

        installed.update(grad_accum_fusion=bool(tr.tc.gradient_accumulation_fusion),
                         linear_cross_entropy=uses_fused_loss(tr.model[0]),
                         swiglu_fusion=bool(tr.tc.bias_activation_fusion and tr.tc.gated_linear_unit),
                         cudnn_attention=cuda and args.attention == "sdpa"
                         and "cudnn_attention" not in trainer.kernels.disabled)
        return result

    result = rank_main(cfg, after=after)
    tokens_per_step = cfg.global_batch(world) * args.seq
    timed = timed_step_seconds(log_dir, tokens_per_step, args.warmup)
    seconds = sum(timed)
    tps = tokens_per_step * len(timed) / seconds if seconds else result.tokens_per_s
    return {"tokens_per_s": tps, "peak_memory_gb": result.peak_memory_gb, "kernels": installed,
            "final_loss": result.losses[-1] if result.losses else None, "steps_timed": len(timed)}


def timed_step_seconds(log_dir: str, tokens_per_step: int, warmup: int) -> list[float]:
    """Seconds of each step after the first ``warmup`` of a trainer run logging to ``log_dir`` (its metrics.jsonl
    has ``tokens_per_s`` = ``tokens_per_step`` / step time)."""
    rows = []
    if os.path.exists(os.path.join(log_dir, "metrics.jsonl")):
        rows = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    return [tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["iteration"] > warmup]


def hf_model(args, device, liger: bool):
    """The same-shape HF model (SDPA), Liger-patched first when asked and Liger has kernels for the family."""
    import transformers

    if args.family == "gpt2":
        config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden,
                                         n_layer=args.layers, n_head=args.heads, n_inner=ffn_size(args),
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
        cls, patched = transformers.GPT2LMHeadModel, []  # Liger has no GPT-2 kernels
    else:
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                          intermediate_size=ffn_size(args), num_hidden_layers=args.layers,
                                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                                          max_position_embeddings=args.seq, tie_word_embeddings=True,
                                          bos_token_id=0, eos_token_id=0)
        cls, patched = transformers.LlamaForCausalLM, []
        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
            patched = ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]
    model = cls._from_config(config, attn_implementation="sdpa").to(device)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model, patched


def run_hf(args, cuda: bool) -> dict:
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    model, patched = hf_model(args, device, liger=args.hf_mode == "compile-liger" and cuda)
    model.train()
    if args.hf_mode == "compile":
        model.compile()
    elif args.hf_mode == "compile-liger":
        (model.model if hasattr(model, "model") else model.transformer).compile()
    forward = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = args.micro_batch * args.num_micro
    micro = args.hf_micro_batch or args.micro_batch
    if batch % micro:
        raise SystemExit(f"--hf-micro-batch {micro} does not divide the {batch} samples of a step")
    num_micro = batch // micro
    times = []
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (batch, args.seq), generator=gen).to(device)
        micro_batches = [dict(input_ids=mb, labels=mb) for mb in tokens.split(micro)]
        seconds, loss = timed_hf_step(forward, model.parameters(), opt, micro_batches, cuda)
        if step >= args.warmup:
            times.append(seconds)
    tps = batch * args.seq * len(times) / sum(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"tokens_per_s": tps, "peak_memory_gb": peak, "final_loss": float(loss) * num_micro,
            "steps_timed": len(times), "mode": args.hf_mode, "liger": patched, "micro_batch": micro}


def timed_hf_step(forward, params, opt, micro_batches: list[dict], cuda: bool):
    """One optimizer step of a Transformers model over ``micro_batches`` (keyword inputs with ``labels``): bf16
    autocast on CUDA, gradients accumulated, clipped to 1.0. Returns (seconds, the last micro-batch's loss
    divided by the number of micro-batches)."""
    import torch

    params = list(params)
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for mb in micro_batches:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cuda):
            loss = forward(**mb).loss / len(micro_batches)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world % args.tp:
        raise SystemExit(f"world size {world} is not divisible by --tp {args.tp}")
    if not cuda and world == 1 and args.tp > 1:
        raise SystemExit("--tp > 1 on CPU: run under torchrun --nproc-per-node N (gloo)")
    ours = None if args.hf_only else run_ours(args, world, cuda)
    fpt = model_flops_per_token(args)
    gpus = world if cuda else 1
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": world, "tp": args.tp, "dp": world // args.tp,
        "distributed_optimizer": args.distributed_optimizer, "sequence_parallel": args.sequence_parallel,
        "attention": args.attention, "recompute": args.recompute,
        "fused_adam": not args.unfused_adam, "bda_fusion": not args.no_bda_fusion,
        "foreach_grad_ops": not args.no_foreach_grad_ops,
        "model": (f"{args.family} {args.layers}L h{args.hidden} {args.heads}heads kv{args.kv_heads or args.heads} "
                  f"ffn{ffn_size(args)} seq{args.seq} vocab{args.vocab}"),
        "params_m": round((matrix_params(args) + (args.hidden * args.seq if args.family == "gpt2" else 0)) / 1e6, 1),
        "flops_per_token_g": round(fpt / 1e9, 3), "disabled": args.disable,
        "micro_batch": args.micro_batch, "num_micro": args.num_micro, "steps": args.steps,
        "precision": "bf16" if cuda else "fp32",
    }
    if ours is not None:
        report["ours"] = dict(ours, tokens_per_s_per_gpu=ours["tokens_per_s"] / gpus,
                              tflops_per_gpu=ours["tokens_per_s"] * fpt / gpus / 1e12)
        report["ours"]["mfu"] = report["ours"]["tflops_per_gpu"] / args.peak_tflops if cuda else None
    if not args.no_baseline and rank == 0:
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        hf = run_hf(args, cuda)
        hf["tflops_per_gpu"] = hf["tokens_per_s"] * fpt / 1e12
        hf["mfu"] = hf["tflops_per_gpu"] / args.peak_tflops if cuda else None
        report[f"hf_{args.family}_{args.hf_mode}_1gpu"] = hf
        if ours is not None:
            report["ratio_ours_per_gpu_vs_hf"] = report["ours"]["tokens_per_s_per_gpu"] / hf["tokens_per_s"]
    if rank == 0:
        text = json.dumps(report, indent=2)
        print(text, flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")


if __name__ == "__main__":
    main()
