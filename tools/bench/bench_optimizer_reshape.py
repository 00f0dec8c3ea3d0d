"""Benchmark: reshape a torch_dist checkpoint *with* its distributed-optimizer state (fp32 main params, Adam
moments; ``dp_reshardable``) next to the weights-only reshape of the same checkpoint.

The source is synthesized on disk without training: a GPT-2-shaped model at TP2xPP2 with random bf16 weights and
random fp32 optimizer state at Megatron-Core's exact bucket layout (``interop.optimizer_state`` writes it). Each
reshape (to ``--tp``x``--pp``, default TP1xPP1: weights only, then with the optimizer at DP2 in each ``--formats``
entry: torch_dist ``dp_reshardable`` and/or per-rank torch with ``distrib_optim.pt``) runs as its own process
under ``/usr/bin/time -v`` (wall time, peak RSS), each output deleted before the next (a 1.5B output is ~20 GB);
the report gives peak RSS as multiples of the largest fp32 tensor and of 3x it (param + both moments), raw and
above the interpreter-with-torch floor (``floor_mb``, measured in the same job).

    .venv/bin/python tools/bench/bench_optimizer_reshape.py [--shape medium|large|xl] [--workdir /tmp/bench-optim]
        [--tp 1 --pp 1] [--formats torch_dist,torch]
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


def model_config(shape: str):
    from interop.families.base import ModelConfig

    layers, hidden, heads = SHAPES[shape]
    return ModelConfig(family="gpt2", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       ffn_hidden_size=4 * hidden, vocab_size=50257, max_position_embeddings=1024)


def sizes(shape: str) -> dict:
    from interop.convert_megatron import canonical_shape
    from interop.families.base import get_family

    cfg = model_config(shape)
    shapes = [canonical_shape(n, cfg) for n, _ in get_family(cfg.family).canonical_names(cfg)]
    return {"parameters": sum(math.prod(s) for s in shapes), "largest_fp32_bytes": max(math.prod(s) for s in shapes) * 4}


def synthesize(path: str, shape: str) -> dict:
    import torch

    from formats.layout import Layout
    from interop.convert_megatron import canonical_shape, args_namespace
    from interop.families.base import get_family
    from interop.optimizer_state import OptimizerMeta, write_torch_dist_streams

    cfg = model_config(shape)
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
    return sizes(shape)


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
    ap.add_argument("--keep", action="store_true", help="keep the source (outputs are always deleted)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--formats", default="torch_dist,torch", help="target formats of the optimizer reshapes")
    ap.add_argument("--source", help="reuse this synthesized source (its shape must be --shape)")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    src = a.source or os.path.join(a.workdir, "src")
    if a.source:
        report = {"shape": a.shape, **sizes(a.shape)}
    else:
        shutil.rmtree(src, ignore_errors=True)
        report = {"shape": a.shape, **synthesize(src, a.shape)}
    du = lambda p: int(subprocess.run(["du", "-sb", p], capture_output=True, text=True).stdout.split()[0])  # noqa: E731
    report["source_bytes"] = du(src)
    base = [sys.executable, "-m", "interop", "reshape", src]
    subprocess.run(["sync"])
    layout = ["--tp", str(a.tp), "--pp", str(a.pp), "--no-progress"]
    report["floor_mb"] = timed([sys.executable, "-c", "import torch, interop.optimizer_state"])["peak_rss_mb"]
    cases = [("weights_only", ["--weights-only"])] + [(f"optimizer_{f}", ["--dp", "2", "--format", f])
                                                      for f in a.formats.split(",")]
    largest = report["largest_fp32_bytes"] / 2 ** 20
    for case, extra in cases:
        out = os.path.join(a.workdir, case)
        subprocess.run(["sync"])
        report[case] = timed(base + [out] + layout + extra)
        report[case]["output_bytes"] = du(out)
        rss = report[case]["peak_rss_mb"]
        report[case].update(over_largest=round(rss / largest, 2), over_3x_largest=round(rss / (3 * largest), 2),
                            above_floor_over_largest=round((rss - report["floor_mb"]) / largest, 2))
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({case: report[case]}), flush=True)
    print(json.dumps(report, indent=2))
    if not a.keep and not a.source:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
