"""Demo stage "train": ``interop train`` at TP2xPP2 on four CPU gloo ranks, from the convert stage's random
Llama-style HF model, on the data stage's stdlib mmap dataset; a short first run, a resume to as many steps
as fit in the time budget (the loss keeps falling across the restart), ``interop convert`` of the
checkpoint to HF, and a greedy continuation from the trained HF model."""
from __future__ import annotations

import json
import os
import time

BUDGET_S = 280  # training time for both runs together (~4.5 min on 2 cores, startup included)
FIRST_STEPS = 20
MAX_STEPS = 600
PROMPT = "def read_lines(path):\n    "


def _config(ctx) -> dict:
    return {
        "tp_degree": 2, "pp_degree": 2,
        "seq_length": 128, "micro_batch_size": 2, "global_batch_size": 8,
        "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 20, "lr_decay_style": "cosine", "weight_decay": 0.01,
        "gradient_clipping": 1.0, "eval_interval": 50, "eval_iters": 2, "log_interval": 1, "seed": 1234,
        "model": ctx.artifacts["hf_init"], "data_path": [ctx.artifacts["data_prefix"]], "split": "98,2,0",
    }


def _seconds_per_step(metrics: str) -> float:
    rows = [json.loads(line) for line in open(metrics) if '"tokens_per_s"' in line]
    rows = rows[2:] or rows  # skip warm-up steps
    return sum(8 * 128 / r["tokens_per_s"] for r in rows) / len(rows)


def run(ctx) -> None:
    save = ctx.path("trained-megatron")
    config = ctx.path("train.yaml")
    with open(config, "w") as fh:
        json.dump(_config(ctx), fh, indent=1)  # JSON is YAML
    print(open(config).read(), flush=True)
    if os.path.isdir(save):
        import shutil

        shutil.rmtree(save)
    t0 = time.time()
    ctx.interop("train", config, "--train-iters", str(FIRST_STEPS), "--save", save)
    per_step = _seconds_per_step(os.path.join(save, "metrics.jsonl"))
    left = BUDGET_S - (time.time() - t0)
    steps = int(min(MAX_STEPS, max(FIRST_STEPS + 10, FIRST_STEPS + left / (per_step * 1.05))))
    print(f"\n{per_step:.2f} s/step measured: resuming from step {FIRST_STEPS} to {steps} "
          f"(new process, optimizer/scheduler/data position restored)", flush=True)
    ctx.interop("train", config, "--load", save, "--save", save, "--train-iters", str(steps),
                "--set", f"lr_decay_iters={steps}", "--set", "override_opt_param_scheduler=true")
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl")) if '"loss"' in line]
    losses = [r["loss"] for r in rows]
    k = max(1, len(losses) // 10)
    print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f} "
          f"(curve: {os.path.join(save, 'loss.png')})", flush=True)
    hf_out = ctx.path("trained-hf")
    ctx.interop("convert", save, hf_out, "--force")
    ctx.artifacts.update(trained_megatron=save, trained_hf=hf_out)
    _sample(ctx, hf_out)


def _sample(ctx, hf_dir: str) -> None:
    """Greedy continuation with Transformers from the exported model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = hf_dir if os.path.exists(os.path.join(hf_dir, "tokenizer.json")) else ctx.artifacts.get("tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
    print("\n--- greedy sample from the trained model (Transformers):", flush=True)
    print(tok.decode(out[0], skip_special_tokens=True), flush=True)
