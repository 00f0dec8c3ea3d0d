"""Training throughput of our Megatron-Core trainer vs Hugging Face (GPT2LMHeadModel / LlamaForCausalLM).

Runs a GPT-2-style model (default 24 layers, hidden 1024, 16 heads = ~350M parameters, seq 2048, bf16) or a
Llama-family one (``--family llama``: RoPE, RMSNorm, SwiGLU, GQA) on synthetic tokens for a few dozen steps
through ``trainer.run.rank_main`` (the same code path as ``interop train``), then the same-size HF model on rank
0 in the same job, and prints tokens/s, TFLOP/s per GPU, MFU (against ``--peak-tflops``, 989 = H100 SXM dense
bf16) and peak memory. HF runs eager (SDPA, bf16 autocast, fused AdamW) or, with ``--hf-mode compile``, the
strongest setup we can build: the same plus ``torch.compile`` and Liger's kernels where Liger has them (Llama:
RoPE, RMSNorm, SwiGLU, fused linear cross-entropy; GPT-2: none). ``--disable`` switches one of our fused kernels
off (``trainer.kernels``) for an ablation, ``--enable`` one of the candidates on (``trainer.kernels.CANDIDATES``,
off by default until measured faster).

``--ablation`` is the one-job measurement of issue 22 (1×H100, <= 9 minutes with every compile): each row is its
own process (this script again) — ours with the current defaults, with the padded-vocabulary fused loss switched
off (a default since it measured faster) and with each candidate switched on, for the
GPT-2 1.3B and the Llama 1.2B shapes, then Transformers compiled (+ Liger for Llama) and eager — in priority
order, skipping rows once ``--budget-s`` would be exceeded; then one table: tokens/s, MFU, peak memory, the last
step's loss (the candidates must not move it beyond bf16 noise) and the ratio to ours with the defaults.

    python tools/bench/bench_train_gpu.py --preset gpt2-1.3b                # 1 GPU, 1.3B GPT-2 shape
    python tools/bench/bench_train_gpu.py --preset llama-1.2b --hf-mode compile-liger --micro-batch 8 --num-micro 2 --hf-micro-batch 4
    python tools/bench/bench_train_gpu.py --preset gpt2-1.3b --disable linear_cross_entropy --no-baseline
    python tools/bench/bench_train_gpu.py                                   # 1 GPU
    torchrun --nproc-per-node 2 tools/bench/bench_train_gpu.py --tp 2       # TP2
    torchrun --nproc-per-node 2 tools/bench/bench_train_gpu.py --distributed-optimizer   # DP2 + dist. opt.
    python tools/bench/bench_train_gpu.py --tiny                            # CPU smoke test (fp32)
    python tools/bench/bench_train_gpu.py --ablation --json ablation.json   # issue 22: one job, one table
    python tools/bench/bench_train_gpu.py --ablation --tiny                 # its CPU smoke (candidates forced)

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
    p.add_argument("--enable", action="append", default=[], metavar="KERNEL",
                   help="switch on one of trainer.kernels.CANDIDATES where it applies (repeatable; 'all')")
    p.add_argument("--force", action="append", default=[], metavar="KERNEL",
                   help="switch a kernel on even where it does not apply (CPU smoke of its code path)")
    p.add_argument("--ablation", action="store_true",
                   help="issue 22's one-job ablation: every candidate and the HF rows, one table (see above)")
    p.add_argument("--budget-s", type=float, default=500.0, help="--ablation: wall-clock budget for all rows")
    p.add_argument("--rows", default=None,
                   help="--ablation: only these rows (1-based indices into ABLATION, comma-separated), e.g. for a "
                        "second job with the rows the first one's budget skipped")
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
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 2, 64, 4, 64, 500  # 500: padded to 512
        args.kv_heads, args.ffn = (2 if args.family == "llama" else None), None
        args.micro_batch, args.steps, args.warmup = 2, 6, 2
        args.num_micro, args.hf_micro_batch = 1, None
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
    from trainer.run import rank_main

    trainer.kernels.disabled.update(trainer.kernels.KERNELS if "all" in args.disable else args.disable)
    trainer.kernels.enabled.update(trainer.kernels.CANDIDATES if "all" in args.enable else args.enable)
    trainer.kernels.forced.update(args.force)
    if args.unfused_adam:
        trainer.loop.use_fused_adam = lambda optimizer: 0
    if args.no_bda_fusion:
        unfuse_bias_dropout_add()

    if args.no_foreach_grad_ops:
        trainer.loop.use_foreach_grad_ops = lambda: False

    log_dir = tempfile.mkdtemp(prefix="bench-train-")
    cfg = ours_config(args, world, cuda, log_dir)
    installed = {}

    def after(tr, result):
        installed.update(trainer.kernels.active_in(tr),
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


def ours_config(args, world: int, cuda: bool, log_dir: str):
    """The :class:`trainer.config.TrainConfig` of our side of the benchmark (also ``profile_train_gpu.py``'s)."""
    from trainer.config import ArchConfig, TrainConfig

    dp = world // args.tp
    return TrainConfig(
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


def unfuse_bias_dropout_add() -> None:
    """Ablation: runs built after this call add bias, dropout and residual eagerly (the trainer's default on a GPU
    is Megatron-Core's torch.compile'd ``bias_dropout_fusion``)."""
    import trainer.model

    overrides = trainer.model.train_overrides
    trainer.model.train_overrides = lambda cfg: dict(overrides(cfg), bias_dropout_fusion=False)


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


def run_hf(args, cuda: bool, build=None) -> dict:
    """HF training steps; ``build(args, device, liger)`` -> (model, patched kernels) replaces :func:`hf_model`
    (another family's benchmark, e.g. bench_bloom_gpu.py)."""
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    model, patched = (build or hf_model)(args, device, liger=args.hf_mode == "compile-liger" and cuda)
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


#: --ablation rows in priority order (what is cut first when the budget runs out is last):
#: (preset, label, extra arguments); "ENABLE" expands to --enable on a GPU and to --force in a CPU smoke
ABLATION = [
    ("gpt2-1.3b", "ours, defaults", []),
    ("gpt2-1.3b", "without padded_linear_cross_entropy", ["--disable", "padded_linear_cross_entropy"]),
    ("gpt2-1.3b", "+ compiled_layer", ["ENABLE", "compiled_layer"]),
    ("llama-1.2b", "ours, defaults", []),
    ("llama-1.2b", "+ compiled_layer", ["ENABLE", "compiled_layer"]),
    ("llama-1.2b", "Transformers + torch.compile + Liger", ["--hf-only", "--hf-mode", "compile-liger"]),
    ("gpt2-1.3b", "+ liger_norm", None),  # None: a kernel since removed (docs/experiments.md); the numbers stay
    ("llama-1.2b", "+ liger_norm", None),
    ("gpt2-1.3b", "Transformers + torch.compile", ["--hf-only", "--hf-mode", "compile"]),
    ("gpt2-1.3b", "+ all candidates", ["ENABLE", "all"]),
    ("llama-1.2b", "+ all candidates", ["ENABLE", "all"]),
    ("llama-1.2b", "Transformers + torch.compile", ["--hf-only", "--hf-mode", "compile"]),
    ("gpt2-1.3b", "Transformers eager", ["--hf-only"]),
    ("llama-1.2b", "Transformers eager", ["--hf-only"]),
    ("gpt2-1.3b", "+ bias_gelu_fusion", ["ENABLE", "bias_gelu_fusion"]),
    ("gpt2-1.3b", "+ bias_epilogue", ["ENABLE", "bias_epilogue"]),
    ("llama-1.2b", "+ rope_fusion", ["ENABLE", "rope_fusion"]),
    ("llama-1.2b", "+ sdpa_gqa", ["ENABLE", "sdpa_gqa"]),
    # each side at its faster split of the same 16 samples (BENCHMARKS.md, training speed, 2026-12-07)
    ("gpt2-1.3b", "ours, defaults, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1"]),
    ("gpt2-1.3b", "Transformers + torch.compile, micro-batch 8 x 2",
     ["--hf-only", "--hf-mode", "compile", "--hf-micro-batch", "8"]),
    ("llama-1.2b", "ours, defaults, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1"]),
    ("llama-1.2b", "Transformers + torch.compile, micro-batch 8 x 2",
     ["--hf-only", "--hf-mode", "compile", "--hf-micro-batch", "8"]),
    # the second round of issue-22 kernels at 16 x 1: rows 23-30 measured each alone against the defaults of the day
    # (BENCHMARKS.md, training speed, job D); those that won are defaults now, so their rows switch them off
    ("llama-1.2b", "without qkv_rope, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1", "--disable",
                                                             "qkv_rope"]),
    ("llama-1.2b", "without swiglu_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "swiglu_kernel"]),
    ("gpt2-1.3b", "+ gelu_bias_grad, micro-batch 16 x 1", None),
    ("gpt2-1.3b", "+ padded_loss_columns, micro-batch 16 x 1", None),
    ("llama-1.2b", "without qkv_rope, swiglu_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "qkv_rope", "--disable", "swiglu_kernel"]),
    ("gpt2-1.3b", "+ gelu_bias_grad + padded_loss_columns, micro-batch 16 x 1", None),
    ("llama-1.2b", "without norm_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "norm_kernel"]),
    ("gpt2-1.3b", "without norm_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "norm_kernel"]),
    ("gpt2-1.3b", "+ device_grad_clip, micro-batch 16 x 1", None),
    ("llama-1.2b", "+ device_grad_clip, micro-batch 16 x 1", None),
    ("gpt2-1.3b", "+ add_norm, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm"]),
    ("llama-1.2b", "+ add_norm, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm"]),
    ("gpt2-1.3b", "+ adamw_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "adamw_kernel"]),
    ("llama-1.2b", "+ adamw_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "adamw_kernel"]),
    ("gpt2-1.3b", "+ add_norm + adamw_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm", "ENABLE", "adamw_kernel"]),
    ("llama-1.2b", "+ add_norm + adamw_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm", "ENABLE", "adamw_kernel"]),
    ("gpt2-1.3b", "+ loss_bias_epilogue, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "loss_bias_epilogue"]),
    ("gpt2-1.3b", "+ add_norm + adamw_kernel + loss_bias_epilogue, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm", "ENABLE", "adamw_kernel", "ENABLE",
      "loss_bias_epilogue"]),
    ("gpt2-1.3b", "+ qkv_split, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "qkv_split"]),
    ("gpt2-1.3b", "+ all candidates but compiled_layer, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "add_norm", "ENABLE", "adamw_kernel", "ENABLE",
      "loss_bias_epilogue", "ENABLE", "qkv_split"]),
    # rows 33-42 switched the third round on (rows 42 and 38 measured on 2026-12-08); those kernels are defaults now,
    # so these rows switch them off: the defaults before them
    ("gpt2-1.3b", "without add_norm, adamw_kernel, loss_bias_epilogue, qkv_split, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "add_norm", "--disable", "adamw_kernel", "--disable",
      "loss_bias_epilogue", "--disable", "qkv_split"]),
    ("llama-1.2b", "without add_norm, adamw_kernel, micro-batch 16 x 1",
     ["--micro-batch", "16", "--num-micro", "1", "--disable", "add_norm", "--disable", "adamw_kernel"]),
    # each of them alone (not measured on 2026-12-08): what each gives, as one switched off from today's defaults
    *[(preset, f"without {name}, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1", "--disable", name])
      for preset, name in (("gpt2-1.3b", "add_norm"), ("gpt2-1.3b", "adamw_kernel"),
                           ("gpt2-1.3b", "loss_bias_epilogue"), ("gpt2-1.3b", "qkv_split"),
                           ("llama-1.2b", "add_norm"), ("llama-1.2b", "adamw_kernel"))],
    # rows 51-52: the fourth round's candidate; rows 53-54: the weight-gradient fusion, last measured at 4 x 1
    *[(preset, "+ adamw_multi_tensor, micro-batch 16 x 1",
       ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "adamw_multi_tensor"])
      for preset in ("gpt2-1.3b", "llama-1.2b")],
    *[(preset, "without grad_accum_fusion, micro-batch 16 x 1",
       ["--micro-batch", "16", "--num-micro", "1", "--disable", "grad_accum_fusion"])
      for preset in ("gpt2-1.3b", "llama-1.2b")],
    # rows 55-58: the other fourth-round candidates alone; rows 59-60: all three
    *[(preset, f"+ {name}, micro-batch 16 x 1", ["--micro-batch", "16", "--num-micro", "1", "ENABLE", name])
      for name in ("pinned_batches", "wgrad_first_write") for preset in ("gpt2-1.3b", "llama-1.2b")],
    *[(preset, "+ adamw_multi_tensor + pinned_batches + wgrad_first_write, micro-batch 16 x 1",
       ["--micro-batch", "16", "--num-micro", "1", "ENABLE", "adamw_multi_tensor", "ENABLE", "pinned_batches",
        "ENABLE", "wgrad_first_write"]) for preset in ("gpt2-1.3b", "llama-1.2b")],
]


def ablation_row(index: int, preset: str, label: str, report: dict | None, wall: float, note: str = "") -> dict:
    """One table row from a child's JSON report (None: the child failed or was skipped)."""
    row = {"row": index, "model": preset, "run": label, "wall_s": round(wall, 1), "note": note}
    if report:
        side = report.get("ours") or next((v for k, v in report.items() if k.startswith("hf_")), None) or {}
        row.update(tokens_per_s=side.get("tokens_per_s"), mfu=side.get("mfu"), peak_gb=side.get("peak_memory_gb"),
                   final_loss=side.get("final_loss"), device=report.get("device"),
                   kernels=sorted(k for k, on in (side.get("kernels") or {}).items() if on))
    return row


def run_ablation(args, argv: list[str]) -> None:
    """Every ABLATION row as its own process within ``--budget-s``; then one markdown table (and ``--json``)."""
    import subprocess

    import torch

    cuda = torch.cuda.is_available()
    common = ["--micro-batch", str(args.micro_batch), "--num-micro", str(args.num_micro), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)]
    if args.hf_micro_batch:
        common += ["--hf-micro-batch", str(args.hf_micro_batch)]
    if args.tiny:
        common.append("--tiny")
    start, rows, longest = time.monotonic(), [], {}
    chosen = {int(i) for i in args.rows.split(",")} if args.rows else set(range(1, len(ABLATION) + 1))
    for index, (preset, label, extra) in enumerate(ABLATION, 1):
        if index not in chosen:
            continue
        if extra is None:
            rows.append(ablation_row(index, preset, label, None, 0.0, "removed: measured no faster"))
            continue
        kind = "hf" if "--hf-only" in extra else "ours"
        flag = "--enable" if cuda else "--force"
        extra = [flag if a == "ENABLE" else a for a in extra]
        if "all" in extra and not cuda:
            from trainer.kernels import CANDIDATES

            extra = [a for a in extra if a != "all"] + ["padded_linear_cross_entropy"] \
                + [a for name in CANDIDATES for a in (flag, name)]
        remaining = args.budget_s - (time.monotonic() - start)
        if remaining < longest.get(kind, 30.0) + 5:
            rows.append(ablation_row(index, preset, label, None, 0.0, "skipped: budget"))
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            out = fh.name
        cmd = [sys.executable, os.path.abspath(__file__), "--preset", preset, *common, *extra, "--json", out]
        if kind == "ours":
            cmd.append("--no-baseline")
        t0, note, report = time.monotonic(), "", None
        try:
            proc = subprocess.run(cmd, timeout=min(remaining - 3, 300), capture_output=True, text=True)
            if proc.returncode == 0:
                report = json.load(open(out))
            else:
                note = "failed: " + (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:160]
        except subprocess.TimeoutExpired:
            note = "timed out"
        wall = time.monotonic() - t0
        longest[kind] = max(longest.get(kind, 0.0), wall)
        rows.append(ablation_row(index, preset, label, report, wall, note))
        print(f"[{time.monotonic() - start:6.1f}s] {preset} {label}: {rows[-1].get('tokens_per_s')} {note}",
              file=sys.stderr, flush=True)
    def split(label: str) -> str:  # a row's "micro-batch N x M" label suffix: rows compare within their split
        return label.rsplit("micro-batch", 1)[1].strip() if "micro-batch" in label else ""

    base = {(r["model"], split(r["run"])): r.get("tokens_per_s") for r in rows if r["run"].startswith("ours, defaults")}
    lines = ["| # | model | run | tok/s | MFU | peak GB | last loss | vs ours defaults | wall s | kernels / note |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tps, ref = r.get("tokens_per_s"), base.get((r["model"], split(r["run"])))
        cells = [str(r["row"]), r["model"], r["run"], f"{tps:,.0f}" if tps else "—",
                 f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "—",
                 f"{r['peak_gb']:.1f}" if r.get("peak_gb") else "—",
                 f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "—",
                 f"{tps / ref:.3f}×" if tps and ref else "—", f"{r['wall_s']:.0f}",
                 r["note"] or ", ".join(r.get("kernels") or [])]
        lines.append("| " + " | ".join(cells) + " |")
    device = next((r["device"] for r in rows if r.get("device")), "?")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, seq {args.seq if args.tiny else 2048}, "
          f"micro-batch {args.micro_batch} x {args.num_micro}, {args.steps} steps ({args.warmup} warm-up), "
          f"total {time.monotonic() - start:.0f} s: python tools/bench/bench_train_gpu.py {' '.join(argv)}")
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


def main(argv=None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.ablation:
        if not args.tiny:  # the issue-22 shapes and step budget unless given explicitly
            defaults = dict(micro_batch=("--micro-batch", 8), num_micro=("--num-micro", 2), steps=("--steps", 9),
                            warmup=("--warmup", 3), hf_micro_batch=("--hf-micro-batch", 4))
            for key, (flag, value) in defaults.items():
                if flag not in raw:
                    setattr(args, key, value)
        run_ablation(args, raw)
        return
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
