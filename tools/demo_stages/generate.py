"""Demo stage "generate": samples from the train stage's Megatron checkpoint with ``interop generate`` and
the data stage's tokenizer — greedy (at TP2 on CPU ranks), top-p with decay, and beam search — on prompts
of Python code."""
from __future__ import annotations

PROMPTS = ["def read_lines(path):\n    ", "import os\n\nclass ", "    for key, value in "]


def run(ctx) -> None:
    source = ctx.artifacts["trained_megatron"]
    common = [source, "--max-new-tokens", "32", "--tokenizer", ctx.artifacts["tokenizer"]]
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
