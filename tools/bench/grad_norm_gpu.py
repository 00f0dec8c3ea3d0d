"""Gradient norm + clipping scale for one step: Megatron-Core's per-tensor fallbacks vs ``trainer.optim``'s
multi-tensor ones, on fp32 gradients shaped like a 24-layer GPT-2 (default hidden 2048: 1.3B parameters).

Times what ``clip_grad_norm`` costs per step without TE/apex: the L2 norm over every gradient (plus the one
``.item()`` the caller makes) and the in-place scale by the clip coefficient.

    CUDA_VISIBLE_DEVICES=0 python3 tools/bench/grad_norm_gpu.py [--hidden 2048] [--layers 24]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def grads(hidden: int, layers: int, vocab: int, device) -> list[torch.Tensor]:
    shapes = [(vocab, hidden), (2048, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,),
                   (hidden,), (hidden,), (4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=gen, device=device) for s in shapes]


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50304)
    args = ap.parse_args()
    from megatron.core import utils

    from trainer.optim import foreach_l2_norm, foreach_scale

    g = grads(args.hidden, args.layers, args.vocab, torch.device("cuda"))
    n = sum(t.numel() for t in g)
    rows = {
        "norm, Megatron-Core fallback": lambda: float(utils.local_multi_tensor_l2_norm(2048, None, [g], False)[0]),
        "norm, multi-tensor (ours)": lambda: float(foreach_l2_norm(2048, None, [g], False)[0]),
        "scale, Megatron-Core fallback": lambda: utils.local_multi_tensor_scale(2048, None, [g, g], 0.999),
        "scale, multi-tensor (ours)": lambda: foreach_scale(2048, None, [g, g], 0.999),
    }
    a = float(utils.local_multi_tensor_l2_norm(2048, None, [g], False)[0])
    b = float(foreach_l2_norm(2048, None, [g], False)[0])
    print(f"{torch.cuda.get_device_name()}: {len(g)} gradients, {n / 1e9:.2f} B elements; norms {a:.3f} / {b:.3f}")
    print("| step | ms |")
    print("|---|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {timed(fn):.2f} |")


if __name__ == "__main__":
    main()
