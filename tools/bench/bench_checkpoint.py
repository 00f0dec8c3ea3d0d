"""Checkpoint artifact benchmark: listing, tensor-by-tensor reading and streaming writing of a >= 1 GB checkpoint.

Each measurement runs in a fresh interpreter (peak RSS = that process's VmHWM), ours and a baseline in the same
job, so ratios are comparable on a shared machine:
* inspect (HF sparse safetensors, Megatron torch rank file): wall and peak RSS vs. ``python -c 'import torch'``;
* read every tensor: ours (one tensor resident) vs. ``torch.load(weights_only=False)`` of the whole rank file;
* write 1 GB per-rank torch file: ``MegatronTorchWriter`` (record by record) vs. ``torch.save`` of the full dict;
* write 1 GB torch_dist: ``TorchDistWriter`` (chunk by chunk) vs. ``torch.distributed.checkpoint.save(no_dist=True)``.

Usage: .venv/bin/python tools/bench/bench_checkpoint.py [--gib 1.0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS, COLS = 4096, 2048  # 32 MiB float32 tensors


def measure(code: str) -> dict:
    wrapped = code + (
        "\nprint('PEAK', 1024 * int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(next(l for l in proc.stdout.splitlines() if l.startswith("PEAK")).split()[1])
    return {"wall_s": round(wall, 2), "peak_mib": round(peak / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--json")
    opts = ap.parse_args()
    count = max(1, round(opts.gib * 2**30 / (ROWS * COLS * 4)))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    gen = (f"import torch\nT = [torch.full(({ROWS}, {COLS}), float(i)) for i in range(0)]\n"
           f"def tensors():\n    for i in range({count}):\n        yield f'decoder.layers.{{i}}.mlp.linear_fc1.weight', "
           f"torch.full(({ROWS}, {COLS}), float(i))\n")
    res = {"tensors": count, "gib": round(count * ROWS * COLS * 4 / 2**30, 2)}
    try:
        res["baseline_import_torch"] = measure("import torch")
        res["write_ours_torch"] = measure(gen + (
            "from formats.checkpoint import MegatronTorchWriter\nfrom formats.layout import Layout\n"
            f"with MegatronTorchWriter({str(tmp / 'ours')!r}, Layout(), iteration=1, args={{'num_layers': {count}}}) as w:\n"
            "    for n, t in tensors():\n        w.add(n, t)\n    w.finalize()\n"))
        res["write_baseline_torch_save"] = measure(gen + (
            f"import os\nos.makedirs({str(tmp / 'base')!r})\n"
            f"torch.save({{'model': dict(tensors()), 'iteration': 1}}, {str(tmp / 'base' / 'model_optim_rng.pt')!r})\n"))
        rank_file = tmp / "ours" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
        res["inspect_megatron"] = measure(
            f"from interop.cli import main\ntry:\n    main(['inspect', {str(tmp / 'ours')!r}, '--json'])\nexcept SystemExit:\n    pass\n")
        res["read_all_ours"] = measure(
            f"from formats.checkpoint import open_checkpoint\nc = open_checkpoint({str(tmp / 'ours')!r})\n"
            "s = sum(float(c.load_rank_tensor(i.name, 0, 0)[0, 0]) for i in c.rank_tensors(0, 0))\n")
        res["read_all_baseline_torch_load"] = measure(
            f"import torch\nd = torch.load({str(rank_file)!r}, weights_only=False)['model']\n"
            "s = sum(float(t[0, 0]) for t in d.values())\n")
        res["write_ours_torch_dist"] = measure(gen + (
            "from formats.checkpoint import TorchDistWriter\n"
            f"with TorchDistWriter({str(tmp / 'dist_ours')!r}, iteration=1) as w:\n"
            f"    for i, (n, t) in enumerate(tensors()):\n"
            f"        w.add('decoder.layers.mlp.linear_fc1.weight', t[None], ({count}, {ROWS}, {COLS}), (i, 0, 0))\n"
            "    w.finalize()\n"))
        res["write_baseline_dcp_save"] = measure(gen + (
            "import torch.distributed.checkpoint as dcp, warnings\nwarnings.simplefilter('ignore')\n"
            "sd = {'decoder.layers.mlp.linear_fc1.weight': torch.stack([t for _, t in tensors()])}\n"
            f"dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(tmp / 'dist_base')!r}), no_dist=True)\n"))
        res["read_layer_ours_torch_dist"] = measure(
            f"from formats.checkpoint import open_checkpoint\nc = open_checkpoint({str(tmp / 'dist_ours')!r})\n"
            f"t = c.load('decoder.layers.mlp.linear_fc1.weight', (slice({count // 2}, {count // 2 + 1}),))\n")
        (tmp / "hf").mkdir()
        sys.path.insert(0, str(ROOT))
        from tests import ckpt_big

        ckpt_big.write_sparse_safetensors(tmp / "hf" / "m")
        res["inspect_hf_sparse_1gb"] = measure(
            f"from interop.cli import main\ntry:\n    main(['inspect', {str(tmp / 'hf' / 'm')!r}, '--json'])\nexcept SystemExit:\n    pass\n")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text)
    if opts.json:
        Path(opts.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
