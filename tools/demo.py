"""`make demo`: the main job, end to end, on a real corpus (the Python standard library's sources).

Stages (tools/demo_stages/<name>.py, each ``run(ctx)``), in order:
  data      train a byte-level BPE tokenizer on the stdlib, preprocess into an mmap dataset, inspect it
  convert   make a tiny random HF model for that tokenizer, convert HF -> Megatron TP2xPP2 -> HF with --verify
  train     train it at TP2xPP2 on CPU, save, convert the checkpoint to HF
  generate  greedy, top-p and beam samples from the trained model
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "convert", "train", "generate"]


@dataclass
class DemoContext:
    """Paths shared by the stages; a stage fills in what it produced for the next one."""

    out: str = os.path.join(ROOT, "demo-out")
    artifacts: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def interop(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the CLI the way a user would, echoing the command."""
        print("$ interop " + " ".join(args), flush=True)
        # Megatron-Core announces its apex/TE fallbacks and deprecations on every rank; the demo hides them
        env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
        return subprocess.run([sys.executable, "-m", "interop", *args], check=check, cwd=ROOT, env=env)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main() -> None:
    sys.path.insert(0, ROOT)
    ctx = DemoContext()
    os.makedirs(ctx.out, exist_ok=True)
    start = time.time()
    banner("the CLI")
    ctx.interop("--version")
    ctx.interop("--help")
    for name in STAGES:
        banner(f"stage: {name}")
        stage = importlib.import_module(f"tools.demo_stages.{name}")
        t0 = time.time()
        stage.run(ctx)
        print(f"--- stage {name} took {time.time() - t0:.0f} s", flush=True)
    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs in {ctx.out}")


if __name__ == "__main__":
    main()
