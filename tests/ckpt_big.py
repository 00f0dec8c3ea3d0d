"""Large synthetic checkpoints (>= 1 GB) for the memory/time bounds of listing and single-tensor reads.

The HF one is written sparsely (safetensors header + a truncated-up data section: no data bytes hit the
disk); the Megatron one goes through our streaming rank-file writer from one reused zero tensor, so neither
needs the tensors in memory."""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS, COLS = 4096, 2048  # one float32 tensor = 32 MiB
COUNT = 34  # 34 * 32 MiB = 1.06 GiB (>= 1 GB)


def write_sparse_safetensors(dst: Path) -> int:
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": ROWS}))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    nbytes = ROWS * COLS * 4
    for i in range(COUNT):
        header[f"model.layers.{i}.mlp.up_proj.weight"] = {"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def write_megatron(dst: Path) -> int:
    from formats.checkpoint import MegatronTorchWriter
    from formats.layout import Layout

    zeros = torch.zeros(ROWS, COLS)
    with MegatronTorchWriter(dst, Layout(), iteration=1, args={"num_layers": COUNT, "hidden_size": COLS}) as w:
        for i in range(COUNT):
            w.add(f"decoder.layers.{i}.mlp.linear_fc1.weight", zeros)
        w.add("decoder.final_layernorm.weight", torch.arange(COLS, dtype=torch.float32))
        w.finalize()
    return COUNT * zeros.numel() * 4


def run_measured(code: str) -> tuple[float, int, str]:
    """Run ``code`` in a fresh interpreter; return (wall seconds, children's peak RSS bytes, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over children so far
    return wall, peak, proc.stdout


def peak_rss_of(code: str) -> tuple[float, int, str]:
    """Like ``run_measured`` but the child reports its own peak RSS (unaffected by earlier children)."""
    # VmHWM belongs to this process image; ru_maxrss would carry the forking parent's peak across exec on Linux
    wrapped = code + (
        "\nprint('PEAK', 1024 * int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))\n"
    )
    wall, _, out = run_measured(wrapped)
    peak = int(next(line for line in out.splitlines() if line.startswith("PEAK")).split()[1])
    return wall, peak, out
