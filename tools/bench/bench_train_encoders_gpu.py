"""Training throughput of our BERT and T5 training (Megatron-Core models through ``interop train``'s code path)
against Transformers' ``MegatronBertForPreTraining`` and ``T5ForConditionalGeneration``, in one job.

Shapes (bf16, one GPU, synthetic batches on both sides, dropout off on both sides):

* ``bert``: BERT-large — 24 layers, hidden 1024, 16 heads, FFN 4096, seq 512, vocabulary 30,522 (ours pads it to
  30,592 by Megatron's rule and masks the padding rows out of the loss; HF gets 30,592 rows), MLM + NSP heads,
  15 % of the positions carry the MLM loss. Micro-batch 32 × 1 (32 sequences a step) on both sides: at 16 × 2 our
  step is bound by the host (twice the Python and kernel launches per token; H100, 2026-12-07: 102–113 ms median
  at 32 × 1 against 144–199 ms at 16 × 2, the latter moving with the host's load) while Transformers' is not
  (207 vs 223 ms); ``--bert-micro-batch 16 --bert-num-micro 2`` gives the other split.
* ``t5``: T5-base (v1.0: ReLU, tied embeddings) — 12 + 12 layers, d_model 768, 12 heads × 64, d_ff 3072, encoder
  512 / decoder 128 tokens, vocabulary 32,128. Micro-batch 32 × 1.

Ours: :func:`trainer.run.rank_main` with ``synthetic_data: true`` (Float16Module bf16 weights, fp32 main params,
torch's fused AdamW; BERT on SDPA with the key-padding mask and the LM head at the loss positions
(:mod:`trainer.spec_encoder`), T5 on :mod:`interop.t5`'s SDPA-with-bias attention).
HF: fp32 weights under bf16 autocast, fused AdamW, grad clipping 1.0; SDPA for T5, eager attention for
MegatronBert (Transformers has no SDPA path for it). Each variant runs in its own process (a variant that fails,
e.g. out of memory, prints its error and the others go on; peak memory is per variant), at most
``--variant-timeout`` 120 s each and ``--budget`` 330 s in all, so the job ends within 6 minutes.

Tokens/s: BERT counts encoder tokens (batch × 512). T5 counts encoder + decoder tokens (batch × (512 + 128)).
MFU: model FLOPs (see :func:`flops_per_sample`: 6 per matrix weight per token it touches, the LM head over every
position, attention scores and values 12·s_q·s_k·d per layer with no masking discount, the same count for both
sides) × samples/s / ``--peak-tflops`` (989 = H100 SXM dense bf16; also used for H200).

    python tools/bench/bench_train_encoders_gpu.py                      # both models, ours + HF (≤ 6 min on an H100)
    python tools/bench/bench_train_encoders_gpu.py --models bert --bert-micro-batch 16 --bert-num-micro 2
    python tools/bench/bench_train_encoders_gpu.py --tiny               # CPU smoke test (tiny shapes, fp32)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train_gpu import timed_hf_step, timed_step_seconds  # noqa: E402 - after the path set-up

SHAPES = {
    "bert": dict(layers=24, hidden=1024, heads=16, kv=64, ffn=4096, seq=512, dec_seq=0, vocab=30522, hf_vocab=30592,
                 micro=32, num_micro=1),
    "t5": dict(layers=12, dec_layers=12, hidden=768, heads=12, kv=64, ffn=3072, seq=512, dec_seq=128, vocab=32128,
               hf_vocab=32128, micro=32, num_micro=1),
}
TINY = {
    "bert": dict(layers=2, hidden=64, heads=4, kv=16, ffn=128, seq=64, dec_seq=0, vocab=500, hf_vocab=512, micro=2,
                 num_micro=2),
    "t5": dict(layers=2, dec_layers=2, hidden=64, heads=4, kv=16, ffn=128, seq=64, dec_seq=16, vocab=512,
               hf_vocab=512, micro=2, num_micro=1),
}
RESULT = "RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--sides", nargs="+", choices=["ours", "hf"], default=["ours", "hf"])
    for model in SHAPES:
        p.add_argument(f"--{model}-micro-batch", type=int, default=None)
        p.add_argument(f"--{model}-num-micro", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--variant-timeout", type=int, default=120, help="seconds one variant may take")
    p.add_argument("--budget", type=int, default=330,
                   help="seconds all variants together may take (a variant past it is stopped and reported)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, CPU-friendly (smoke test)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = 4, 1
    return args


def shape(args, model: str) -> dict:
    s = dict((TINY if args.tiny else SHAPES)[model])
    s["micro"] = getattr(args, f"{model}_micro_batch") or s["micro"]
    s["num_micro"] = getattr(args, f"{model}_num_micro") or s["num_micro"]
    return s


def flops_per_sample(model: str, s: dict) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 × forward, 2 per multiply-add).

    BERT: per token Q, K, V, O (4·h·d), the MLP (2·h·ffn), the MLM head's dense (h²) and decoder (h·V); the
    attention 12·L·s²·d (scores and values, fwd + bwd). T5: encoder layers as BERT's over s_e tokens; decoder
    layers self-attention over s_d, cross-attention Q/O over s_d and K/V over s_e (the encoder output), the
    MLP over s_d; attention 12·s_d²·d (self) + 12·s_d·s_e·d (cross) per decoder layer; the LM head over s_d.
    The pooler/NSP head and the norms are left out (per-sequence or O(h) work)."""
    h, d, f, v = s["hidden"], s["heads"] * s["kv"], s["ffn"], s["hf_vocab"]
    se, sd = s["seq"], s["dec_seq"]
    if model == "bert":
        per_token = s["layers"] * (4 * h * d + 2 * h * f) + h * h + h * v
        return 6.0 * per_token * se + 12.0 * s["layers"] * se * se * d
    encoder = 6.0 * s["layers"] * (4 * h * d + 2 * h * f) * se + 12.0 * s["layers"] * se * se * d
    decoder = 6.0 * s["dec_layers"] * ((4 * h * d + 2 * h * d + 2 * h * f) * sd + 2 * h * d * se)
    decoder += 12.0 * s["dec_layers"] * (sd * sd + sd * se) * d
    return encoder + decoder + 6.0 * h * v * sd


def tokens_per_sample(model: str, s: dict) -> int:
    return s["seq"] + s["dec_seq"]


def run_ours(model: str, s: dict, args, cuda: bool) -> dict:
    from trainer.run import rank_main

    log_dir = tempfile.mkdtemp(prefix="bench-encoders-")
    batch = s["micro"] * s["num_micro"]
    result = rank_main(ours_config(model, s, args, cuda, log_dir))
    timed = timed_step_seconds(log_dir, batch * s["seq"], args.warmup)  # the loop counts seq_length tokens a sample
    return {"samples_per_s": batch * len(timed) / sum(timed), "peak_memory_gb": result.peak_memory_gb,
            "final_loss": result.losses[-1], "steps_timed": len(timed), "step_ms": step_spread(timed)}


def step_spread(seconds: list[float]) -> list[float]:
    """[min, median, max] step time in ms: a mean far above the median means some steps stall."""
    import statistics

    return [round(1e3 * f(seconds), 1) for f in (min, statistics.median, max)] if seconds else []


def ours_config(model: str, s: dict, args, cuda: bool, log_dir: str):
    """The :class:`trainer.config.TrainConfig` of our side for shape ``s`` (also ``profile_train_gpu.py``'s)."""
    from trainer.config import ArchConfig, TrainConfig

    if model == "bert":
        arch = ArchConfig(family="bert", num_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                          ffn_hidden_size=s["ffn"], vocab_size=s["vocab"], max_position_embeddings=s["seq"])
    else:
        arch = ArchConfig(family="t5", num_layers=s["layers"], num_decoder_layers=s["dec_layers"],
                          hidden_size=s["hidden"], num_attention_heads=s["heads"], kv_channels=s["kv"],
                          ffn_hidden_size=s["ffn"], vocab_size=s["vocab"], feed_forward_proj="relu",
                          tie_word_embeddings=True, norm_epsilon=1e-6)
    batch = s["micro"] * s["num_micro"]
    return TrainConfig(
        arch=arch, mixed_precision="bf16" if cuda else "no", micro_batch_size=s["micro"], global_batch_size=batch,
        seq_length=s["seq"], decoder_seq_length=max(s["dec_seq"], 1), synthetic_data=True, train_iters=args.steps,
        lr=1e-4, lr_warmup_iters=0, lr_decay_style="constant", log_dir=log_dir, plot=False, progress=False,
        peak_tflops=args.peak_tflops, world_size=1,
    )


def hf_bert(s: dict, device):
    import torch
    import transformers

    config = transformers.MegatronBertConfig(
        vocab_size=s["hf_vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ffn"], max_position_embeddings=s["seq"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.MegatronBertForPreTraining(config).to(device)

    def batch(gen, n):
        seq = s["seq"]
        tokens = torch.randint(0, s["vocab"], (n, seq), generator=gen)
        labels = torch.randint(0, s["vocab"], (n, seq), generator=gen)
        labels[torch.rand(n, seq, generator=gen) >= 0.15] = -100
        return dict(input_ids=tokens, token_type_ids=(torch.arange(seq) >= seq // 2).long().expand(n, seq),
                    attention_mask=torch.ones(n, seq, dtype=torch.long), labels=labels,
                    next_sentence_label=torch.randint(0, 2, (n,), generator=gen))

    return model, batch, config._attn_implementation or "eager"


def hf_t5(s: dict, device):
    import torch
    import transformers

    config = transformers.T5Config(
        vocab_size=s["hf_vocab"], d_model=s["hidden"], d_kv=s["kv"], d_ff=s["ffn"], num_layers=s["layers"],
        num_decoder_layers=s["dec_layers"], num_heads=s["heads"], feed_forward_proj="relu", dropout_rate=0.0,
        decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="sdpa").to(device)

    def batch(gen, n):
        return dict(input_ids=torch.randint(0, s["vocab"], (n, s["seq"]), generator=gen),
                    attention_mask=torch.ones(n, s["seq"], dtype=torch.long),
                    decoder_input_ids=torch.randint(0, s["vocab"], (n, s["dec_seq"]), generator=gen),
                    labels=torch.randint(0, s["vocab"], (n, s["dec_seq"]), generator=gen))

    return model, batch, model.config._attn_implementation


def run_hf(model: str, s: dict, args, cuda: bool) -> dict:
    import torch

    device = torch.device("cuda" if cuda else "cpu")
    net, make_batch, attention = (hf_bert if model == "bert" else hf_t5)(s, device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    micro, num_micro = s["micro"], s["num_micro"]
    times = []
    for step in range(args.steps):
        full = {k: v.to(device) for k, v in make_batch(gen, micro * num_micro).items()}
        micro_batches = [{k: v[m * micro:(m + 1) * micro] for k, v in full.items()} for m in range(num_micro)]
        seconds, loss = timed_hf_step(net, net.parameters(), opt, micro_batches, cuda)
        if step >= args.warmup:
            times.append(seconds)
    return {"samples_per_s": micro * num_micro * len(times) / sum(times),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "final_loss": float(loss) * num_micro, "steps_timed": len(times), "attention": attention,
            "step_ms": step_spread(times)}


def run_variant(args) -> None:
    """One variant (``<model>:<side>``) in this process; prints ``RESULT {json}``."""
    import torch

    model, side = args.variant.split(":")
    cuda = torch.cuda.is_available()
    s = shape(args, model)
    out = (run_ours if side == "ours" else run_hf)(model, s, args, cuda)
    fps = flops_per_sample(model, s)
    out.update(tokens_per_s=out["samples_per_s"] * tokens_per_sample(model, s),
               tflops=out["samples_per_s"] * fps / 1e12)
    out["mfu"] = out["tflops"] / args.peak_tflops if cuda else None
    print(RESULT + json.dumps(out), flush=True)


def spawn(variant: str, argv: list[str], timeout: int) -> dict:
    """Run one variant in a child process; its error (last lines of its output) instead of a result on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()][-3:]
    return {"error": f"exit code {done.returncode}: " + " | ".join(tail)}


def table(report: dict) -> str:
    rows = ["model  side  micro×n   tokens/s   samples/s  TFLOP/s   MFU     peak GiB  ratio vs HF  step ms min/med/max"]
    for model in report["models"]:
        hf = report["results"].get(f"{model}:hf", {})
        for side in report["sides"]:
            r = report["results"][f"{model}:{side}"]
            s = report["shapes"][model]
            head = f"{model:<6} {side:<5} {s['micro']:>3}×{s['num_micro']:<4}"
            if "error" in r:
                rows.append(f"{head} error: {r['error'][:200]}")
                continue
            ratio = r["tokens_per_s"] / hf["tokens_per_s"] if side == "ours" and "tokens_per_s" in hf else None
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   - "
            rows.append(f"{head} {r['tokens_per_s']:>10.0f} {r['samples_per_s']:>10.1f} {r['tflops']:>8.1f} "
                        f"{mfu:>7} {r['peak_memory_gb']:>8.2f}  " + (f"{ratio:.2f}x" if ratio else "     ")
                        + "       " + "/".join(str(v) for v in r.get("step_ms", [])))
    return "\n".join(rows)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant:
        run_variant(args)
        return
    import torch

    cuda = torch.cuda.is_available()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": "bf16" if cuda else "fp32",
              "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
              "models": args.models, "sides": args.sides,
              "shapes": {m: shape(args, m) for m in args.models},
              "tokens": {"bert": "encoder tokens", "t5": "encoder + decoder tokens"},
              "flops_per_sample_g": {m: round(flops_per_sample(m, shape(args, m)) / 1e9, 1) for m in args.models},
              "results": {}}
    start = time.perf_counter()
    for model in args.models:
        for side in args.sides:
            t0 = time.perf_counter()
            left = int(args.budget - (t0 - start))
            result = spawn(f"{model}:{side}", argv, min(args.variant_timeout, left)) if left > 5 else \
                {"error": f"not run: the {args.budget} s budget is spent"}
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            report["results"][f"{model}:{side}"] = result
            print(f"{model}:{side}: {json.dumps(result)}", flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
