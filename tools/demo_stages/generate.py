"""Demo stage "generate": samples from the demo model with ``interop generate`` — greedy (at TP2 on CPU
ranks), top-p with decay, and beam search — on prompts of Python code.

Uses the trained Megatron checkpoint when the train stage ran, else its HF export, else the untrained HF
model from the convert stage (samples are then noise, but the pipeline is the same).
"""
from __future__ import annotations

import os

PROMPTS = ["def read_lines(path):\n    ", "import os\n\nclass ", "    for key, value in "]
SOURCES = ("trained_megatron", "trained_hf", "hf_init")


def run(ctx) -> None:
    source = next((ctx.artifacts[k] for k in SOURCES if ctx.artifacts.get(k)), None)
    if source is None:
        print("(no model from earlier stages: nothing to generate from)")
        return
    common = [source, "--max-new-tokens", "32"]
    tokenizer = ctx.artifacts.get("tokenizer")
    if tokenizer and os.path.exists(tokenizer):
        common += ["--tokenizer", tokenizer]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]
    print(f"model: {source}", flush=True)
    print("\n--- greedy (TP2, two CPU ranks)", flush=True)
    ctx.interop("generate", *common, "--tp", "2")
    print("\n--- top-p 0.9 (decay 0.95, floor 0.5), temperature 0.8, seed 7", flush=True)
    ctx.interop("generate", *common, "--sample", "--top-p", "0.9", "--top-p-decay", "0.95", "--top-p-bound", "0.5",
                "--temperature", "0.8", "--seed", "7")
    print("\n--- beam search: 4 beams, length penalty 1.0, early stopping", flush=True)
    ctx.interop("generate", *common, "--num-beams", "4", "--early-stopping", "true")
