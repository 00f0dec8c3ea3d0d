"""Torch's fused AdamW under Megatron-Core's optimizer wrappers when neither Transformer Engine nor apex is there.

Why: without TE/apex, Megatron-Core's ``get_megatron_optimizer`` falls back to ``torch.optim.AdamW`` in its default
multi-tensor ("foreach") mode: about seven passes over the fp32 main params, gradients and moments per step — on
one H100 ~35 ms of a ~200 ms step of a 1.3B GPT (profile in BENCHMARKS.md). ``fused=True`` makes the same update
one kernel pass. Same maths with a different rounding order, so loss curves agree to float tolerance, not bitwise.

Megatron-Core builds the torch optimizer itself, so :func:`use_fused_adam` switches the flags on its param groups
afterwards. The fused kernel reads each parameter's ``step`` counter as an fp32 tensor on the parameter's device,
whereas foreach mode keeps it on the CPU; counters are moved there (call it again after loading a checkpoint
saved without it).
"""
from __future__ import annotations

from typing import Iterator

import torch


def torch_adams(optimizer) -> Iterator[torch.optim.Adam]:
    """The ``torch.optim.Adam``/``AdamW`` instances inside Megatron-Core's wrappers (chained, mixed precision,
    distributed)."""
    stack, seen = [optimizer], set()
    while stack:
        opt = stack.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Adam):
            yield opt
            continue
        stack.extend(getattr(opt, "chained_optimizers", None) or [])
        stack.append(getattr(opt, "optimizer", None))


def use_fused_adam(optimizer) -> int:
    """Switch every torch Adam(W) inside ``optimizer`` to its fused kernel; returns how many were switched."""
    count = 0
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            group["foreach"] = False
            group["fused"] = True
        for param, state in adam.state.items():
            step = state.get("step")
            if step is None:
                continue
            if not torch.is_tensor(step) or step.device != param.device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device)
        count += 1
    return count
