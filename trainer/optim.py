"""Torch's fused AdamW under Megatron-Core's optimizer wrappers when neither Transformer Engine nor apex is there.

Why: without TE/apex, Megatron-Core's ``get_megatron_optimizer`` falls back to ``torch.optim.AdamW`` in its default
multi-tensor ("foreach") mode: about seven passes over the fp32 main params, gradients and moments per step — on
one H100 ~35 ms of a ~200 ms step of a 1.3B GPT (profile in BENCHMARKS.md). ``fused=True`` makes the same update
one kernel pass. Same maths with a different rounding order, so loss curves agree to float tolerance, not bitwise.

Megatron-Core builds the torch optimizer itself, so :func:`use_fused_adam` switches the flags on its param groups
afterwards. The fused kernel reads each parameter's ``step`` counter as an fp32 tensor on the parameter's device,
whereas foreach mode keeps it on the CPU; counters are moved there (call it again after loading a checkpoint
saved without it).

The same fallback computes the gradient norm for clipping with one host sync per parameter tensor and scales
gradients tensor by tensor; :func:`use_foreach_grad_ops` points those helpers at multi-tensor versions.
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


# ------------------------------------------------------------------------------------------------------------
# gradient norm and clipping without TE/apex


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (the global L2 norm of ``tensor_lists[0]`` as a 1-element fp32
    tensor on their device) from torch's multi-tensor ``_foreach_norm``.

    Megatron-Core's own fallback (``local_multi_tensor_l2_norm``) builds ``torch.tensor([...])`` from one 0-d norm
    per gradient: a device-to-host copy and a host sync per parameter tensor (~300 for a 24-layer GPT), every step.
    Here: a few multi-tensor kernels and no sync (the caller's one ``.item()`` stays)."""
    tensors = list(tensor_lists[0])
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not used by Megatron-Core's clipping")
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` over two lists, in multi-tensor kernels
    (Megatron-Core's fallback runs a multiply and a copy per tensor, with a temporary each)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_grad_ops() -> bool:
    """Point Megatron-Core's gradient-norm and clipping helpers at :func:`foreach_l2_norm` / :func:`foreach_scale`
    where they fell back to its per-tensor local versions (no TE, no apex); with either installed, theirs stay.
    Returns whether anything was replaced. Idempotent."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = False
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
        replaced = True
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
            replaced = True
    return replaced or clip_grads.l2_norm_impl is foreach_l2_norm
