"""AdamW as one Triton pass per parameter that applies the clip scale as it reads the gradient and writes the
model's 16-bit copy of the parameter it has just updated.

Why: after the gradient norm, Megatron-Core's mixed-precision optimizer (no TE, no apex) scales every fp32 gradient
in place when it clips (a read and a write of all gradients), runs torch's fused AdamW over the fp32 main parameters,
then copies each main parameter into the model's bf16 one (another read of all main parameters). On a 1×H100 profile
of the Llama 1.2B step (seq 2048, micro-batch 16, 2026-12-07) the scaling took 3.7 ms, the copies 3.2 ms and AdamW
13.5 ms. Here one kernel reads the parameter, its gradient and the two moments and writes the parameter, the moments
and the bf16 copy: the gradients are scaled in registers and never written back, and the main parameters are not
read a second time.

How: :func:`install` replaces ``step_with_ready_grads`` of each part of Megatron-Core's optimizer that is a
``Float16OptimizerWithFloat16Params`` or an ``FP32Optimizer`` over torch's AdamW (no AMSGrad, not maximising, not
distributed), and Megatron-Core's clip function (the name its ``step`` calls) records the clip factor on the part
that owns the parameters instead of scaling, when every parameter belongs to one installed part (anything else is
clipped by Megatron-Core's own function). The optimizer state stays torch's own (``exp_avg``, ``exp_avg_sq``, a
``step`` tensor per parameter, advanced here by one multi-tensor add), so checkpoints are those of torch's AdamW; the
step count used for the bias corrections is read once per step tensor and then counted on the host. Same maths as
torch's AdamW (decoupled weight decay, bias corrections), in a different rounding order: curves agree to float
tolerance, not bitwise. Largest tensors are launched first, so the GPU has queued work while the host launches the
many small ones (norm weights, biases).
"""
from __future__ import annotations

import math
import types
import weakref

import torch

#: attribute of an fp32 main parameter: a weak reference to the installed optimizer part that steps it
_OWNER = "_interop_adamw_owner"
#: attribute of an installed part: the clip factor for its next step (set by :func:`_clip_by_total_norm`)
_SCALE = "_interop_adamw_grad_scale"
BLOCK = 2048


def _adam(part):
    """The torch AdamW of a part this module can step, else None."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    adam = getattr(part, "optimizer", None)
    if type(part) not in (Float16OptimizerWithFloat16Params, FP32Optimizer) or getattr(part, "is_stub_optimizer", 0) \
            or not isinstance(adam, torch.optim.Adam):
        return None
    for group in adam.param_groups:
        decoupled = group.get("decoupled_weight_decay", isinstance(adam, torch.optim.AdamW))
        if group.get("amsgrad") or group.get("maximize") or (group["weight_decay"] and not decoupled) \
                or torch.is_tensor(group["lr"]):
            return None
    return adam


def applies(part) -> bool:
    """Whether :func:`install` can step this optimizer part: torch's AdamW inside Megatron-Core's mixed-precision or
    fp32 wrapper, over parameters the Triton kernel takes (CUDA, or CPU under Triton's interpreter)."""
    from trainer.kernels.triton_dispatch import triton_runs

    adam = _adam(part)
    if adam is None:
        return False
    params = [p for group in adam.param_groups for p in group["params"]]
    # the kernel runs on a GPU (or on the CPU under Triton's interpreter): asked as for a 16-bit tensor there
    devices = {p.device for p in params}
    return bool(params) and all(p.dtype == torch.float32 and p.is_contiguous() for p in params) \
        and all(triton_runs(torch.empty(0, dtype=torch.bfloat16, device=d)) for d in devices)


def install(optimizer) -> int:
    """Step every part of ``optimizer`` (Megatron-Core's, possibly chained) that :func:`applies` with the kernel;
    returns how many parts. Idempotent."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    count = 0
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if hasattr(part, "_interop_copies"):
            count += 1
            continue
        if not applies(part):
            continue
        copies = {}
        for model_group, main_group in zip(getattr(part, "float16_groups", []),
                                           getattr(part, "fp32_from_float16_groups", [])):
            copies.update({id(main): model for model, main in zip(model_group, main_group)})
        part._interop_copies = copies
        part._interop_steps = {}
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                setattr(param, _OWNER, weakref.ref(part))
        part.step_with_ready_grads = types.MethodType(_step_with_ready_grads, part)
        count += 1
    if count and not hasattr(megatron_optimizer, "_interop_unfused_clip"):  # process-wide; others pass through
        megatron_optimizer._interop_unfused_clip = megatron_optimizer.clip_grad_by_total_norm_fp32
        megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm
    return count


def is_installed(optimizer) -> bool:
    """Whether any part of ``optimizer`` steps with the kernel (for benchmark reports and tests)."""
    return any(hasattr(part, "_interop_copies") for part in getattr(optimizer, "chained_optimizers", None)
               or [optimizer])


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron-Core's ``clip_grad_by_total_norm_fp32``: for parameters that all belong to one installed part, the
    factor ``max_norm / (norm + 1e-6)`` (when below 1) is left for that part's kernel; otherwise Megatron-Core's."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    parameters = list(parameters) if not torch.is_tensor(parameters) else [parameters]
    owners = {getattr(p, _OWNER, lambda: None)() for p in parameters}
    owner = next(iter(owners)) if len(owners) == 1 else None
    if owner is None or use_decoupled_grad or torch.is_tensor(total_norm):
        return megatron_optimizer._interop_unfused_clip(parameters, max_norm, total_norm, use_decoupled_grad)
    coeff = max_norm / (total_norm + 1.0e-6)
    setattr(owner, _SCALE, coeff if coeff < 1.0 else 1.0)
    return None


def _step_count(part, step: torch.Tensor) -> int:
    """The step count before this update, read from the state's tensor once and counted on the host after.

    Keyed by ``id`` with a weak reference to check it: a ``WeakKeyDictionary`` compares a tensor key with ``==``,
    which for a CUDA tensor is an elementwise kernel and a host sync per parameter.
    """
    known = part._interop_steps.get(id(step))
    count = known[1] if known is not None and known[0]() is step else int(step.item())
    _count_from(part, step, count + 1)
    return count


def _count_from(part, step: torch.Tensor, count: int) -> None:
    """Remembers ``count`` as the value of the step tensor ``step`` (no read of it until it is replaced)."""
    part._interop_steps[id(step)] = (weakref.ref(step), count)


def _step_with_ready_grads(self) -> bool:
    """``step_with_ready_grads`` of an installed part: the AdamW update, the clip factor and the copy to the model's
    16-bit parameters in one kernel per parameter (no separate ``_copy_main_params_to_model_params``)."""
    from trainer.kernels.training_triton import adamw_step

    scale = float(self.__dict__.pop(_SCALE, 1.0))
    adam = self.optimizer
    launches, steps = [], []
    for group in adam.param_groups:
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = adam.state[param]
            if not state:  # torch's lazy initialisation, as its fused AdamW does it
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                _count_from(self, state["step"], 0)  # known: no read of the new counter
            t = _step_count(self, state["step"]) + 1
            steps.append(state["step"])
            model = self._interop_copies.get(id(param))
            launches.append((param.numel(), param, state, model, group, beta1, beta2,
                             group["lr"] / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t)))
    if steps:
        torch._foreach_add_(steps, 1.0)
    for n, param, state, model, group, beta1, beta2, step_size, bc2_sqrt in sorted(launches, key=lambda x: -x[0]):
        grad = param.grad if param.grad.is_contiguous() else param.grad.contiguous()
        out = model.data if model is not None else param
        adamw_step[(-(-n // BLOCK),)](param, grad, state["exp_avg"], state["exp_avg_sq"], out, n, scale,
                                      1.0 - group["lr"] * group["weight_decay"], beta1, beta2, step_size, bc2_sqrt,
                                      group["eps"], HAS_OUT=model is not None, BLOCK=BLOCK, num_warps=8)
    return True
