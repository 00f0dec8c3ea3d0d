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

import types
import weakref
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


# ------------------------------------------------------------------------------------------------------------
# gradient clipping without a host sync

#: attribute of an fp32 main parameter: a weak reference to the fused torch Adam(W) that steps it
_FUSED_OWNER = "_interop_fused_adam"


def use_device_grad_clip(optimizer) -> bool:
    """Clip gradients by their global norm without the host ever reading the norm before the update.

    Why: Megatron-Core computes the norm, reads it with ``.item()`` and decides on the host whether to scale the
    gradients. That sync drains the GPU at the end of the backward pass, and the GPU then idles while the host walks
    through the clipping and AdamW's Python before the first optimizer kernel arrives (a profile of the 1.3B GPT-2
    step on an H100 found the largest of its host gaps there, ``profile_train_gpu.py --gaps``). Here the norm stays a
    0-d device tensor: the scale ``max(1, (norm + 1e-6) / clip)`` is handed to torch's fused AdamW as its
    ``grad_scale``, which divides the gradients inside the update kernel — the separate scaling pass disappears
    too (the kernel then writes the scaled gradients back, as Megatron-Core's in-place scaling leaves them).
    Gradients of an optimizer that is not fused AdamW are scaled by a multi-tensor multiply instead. The caller
    reads the returned norm (a tensor) when it logs it, after the update has been queued.

    Applies to Megatron-Core's ``ChainedOptimizer`` whose parts share one gradient-statistics group, with no
    decoupled (precision-aware) gradients; returns whether it was installed (per optimizer; the module-level
    clipping function is wrapped once and keeps Megatron-Core's behaviour for a norm given as a float)."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    parts = getattr(optimizer, "chained_optimizers", None)
    if not parts or not optimizer.grads_states_parallel_group_is_shared() \
            or any(p.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 for p in parts):
        return False
    if not hasattr(megatron_optimizer, "_interop_host_clip"):
        megatron_optimizer._interop_host_clip = megatron_optimizer.clip_grad_by_total_norm_fp32
        megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm
    for adam in torch_adams(optimizer):
        if all(group.get("fused") for group in adam.param_groups):
            for group in adam.param_groups:
                for param in group["params"]:
                    setattr(param, _FUSED_OWNER, weakref.ref(adam))
    optimizer.get_grad_norm = types.MethodType(_device_grad_norm, optimizer)
    return True


def device_grad_clip_installed(optimizer) -> bool:
    """Whether :func:`use_device_grad_clip` is in place on this optimizer (benchmark reports, tests)."""
    return getattr(getattr(optimizer, "get_grad_norm", None), "__func__", None) is _device_grad_norm


def _device_grad_norm(self) -> torch.Tensor:
    """``ChainedOptimizer.get_grad_norm`` (L2 over every part's gradients, summed over the statistics group) as a
    0-d tensor on the gradients' device."""
    grads = [g for part in self.chained_optimizers for g in part.get_main_grads_for_grad_norm()]
    if any(type(g) is not torch.Tensor for g in grads):  # DTensor gradients (FSDP): Megatron-Core's own path
        return type(self).get_grad_norm(self)
    if grads:
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
    else:
        from trainer.model import current_device

        total = torch.zeros((), dtype=torch.float32, device=current_device())
    squared = total.square()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(squared, group=self.get_grad_stats_parallel_group())
    return squared.sqrt()


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron-Core's ``clip_grad_by_total_norm_fp32`` for a norm that is still a device tensor (a float goes to
    Megatron-Core's own function)."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    parameters = list(parameters)
    params = [p for p in parameters if p.grad is not None]
    owners = [getattr(p, _FUSED_OWNER, lambda: None)() for p in params]
    on_device = torch.is_tensor(total_norm) and not use_decoupled_grad
    scale = ((total_norm.float() + 1.0e-6) / max_norm).clamp(min=1.0).reshape(()) if on_device else None
    folded = on_device and bool(params) and None not in owners
    for adam in {id(a): a for a in owners if a is not None}.values():
        adam.grad_scale = scale if folded else None  # read by torch's Adam.step (as for AMP's unscaling)
    if folded:
        return None
    if on_device:
        if params:
            torch._foreach_div_([p.grad for p in params], scale)
        return None
    norm = float(total_norm) if torch.is_tensor(total_norm) else total_norm
    return megatron_optimizer._interop_host_clip(parameters, max_norm, norm, use_decoupled_grad)
