"""Benchmark: reshape a torch_dist checkpoint *with* its distributed-optimizer state (fp32 main params, Adam
moments; ``dp_reshardable``) next to the weights-only reshape of the same checkpoint.

The source is synthesized on disk without training: a GPT-2-shaped model at TP2xPP2 with random bf16 weights and
random fp32 optimizer state at Megatron-Core's exact bucket layout (``interop.optimizer_state`` writes it). Each
reshape (to TP1xPP2xDP2) runs as its own process under ``/usr/bin/time -v`` (wall time, peak RSS); the report
gives the largest fp32 tensor for the memory bound (peak RSS should stay within a few of it x 3).

    .venv/bin/python tools/bench/bench_optimizer_reshape.py [--shape medium|large|xl] [--workdir /tmp/bench-optim]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {  # (layers, hidden, heads): GPT-2 medium / large / XL-sized (32 heads so that TP=2 splits them)
    "tiny": (4, 256, 8),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 32),
}


def synthesize(path: str, shape: str) -> dict:
    import torch

    from formats.layout import Layout
    from interop.convert_megatron import canonical_shape, args_namespace
    from interop.families.base import ModelConfig, get_family
    from interop.optimizer_state import FP32, OptimizerMeta, write_torch_dist_streams

    layers, hidden, heads = SHAPES[shape]
    cfg = ModelConfig(family="gpt2", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      ffn_hidden_size=4 * hidden, vocab_size=50257, max_position_embeddings=1024)
    layout = Layout(tp=2, pp=2, dp=1)
    names = [n for n, _ in get_family(cfg.family).canonical_names(cfg)]
    gen = torch.Generator().manual_seed(0)

    def rand(name, dtype):
        return torch.randn(canonical_shape(name, cfg), generator=gen).to(dtype)

    weights = ((n, rand(n, torch.bfloat16)) for n in names)
    states = ((n, {"param": rand(n, torch.float32), "exp_avg": rand(n, torch.float32) * 1e-3,
                   "exp_avg_sq": rand(n, torch.float32).abs() * 1e-6}) for n in names)
    groups = [{"lr": 1e-4, "weight_decay": wd, "betas": (0.9, 0.95), "eps": 1e-8, "step": 100.0} for wd in (0.1, 0.0)]
    meta = OptimizerMeta("dp_reshardable", groups, (torch.bfloat16, torch.float32), None,
                         {"num_steps": 100}, 100, None)
    args = args_namespace(cfg, layout, torch.bfloat16, data_parallel_size=1, ckpt_format="torch_dist",
                          use_distributed_optimizer=True, iteration=100, consumed_train_samples=0)
    write_torch_dist_streams(weights, states, cfg, meta, path, layout, args=args, dtype=torch.bfloat16, force=True)
    params = sum(math.prod(canonical_shape(n, cfg)) for n in names)
    largest = max(math.prod(canonical_shape(n, cfg)) for n in names)
    return {"parameters": params, "largest_fp32_bytes": largest * 4}


def timed(cmd: list[str]) -> dict:
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", out.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024
    return {"wall_s": round(secs, 2), "peak_rss_mb": round(rss / 2 ** 20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--workdir", default="/tmp/bench-optim")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    src = os.path.join(a.workdir, "src")
    report = {"shape": a.shape, **synthesize(src, a.shape)}
    du = lambda p: int(subprocess.run(["du", "-sb", p], capture_output=True, text=True).stdout.split()[0])  # noqa: E731
    report["source_bytes"] = du(src)
    base = [sys.executable, "-m", "interop", "reshape", src]
    subprocess.run(["sync"])
    report["weights_only"] = timed(base + [os.path.join(a.workdir, "w"), "--tp", "1", "--pp", "2", "--weights-only",
                                           "--no-progress"])
    subprocess.run(["sync"])
    report["with_optimizer"] = timed(base + [os.path.join(a.workdir, "o"), "--tp", "1", "--pp", "2", "--dp", "2",
                                             "--no-progress"])
    report["output_bytes"] = {"weights_only": du(os.path.join(a.workdir, "w")), "with_optimizer": du(os.path.join(a.workdir, "o"))}
    report["rss_over_largest_fp32"] = round(report["with_optimizer"]["peak_rss_mb"] * 2 ** 20 / report["largest_fp32_bytes"], 2)
    print(json.dumps(report, indent=2))
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
