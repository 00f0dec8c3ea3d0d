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

Candidate ``adamw_multi_tensor`` (``install(..., multi_tensor=True)``; off until a GPU run shows it faster): each large
parameter is launched as soon as its scalars are known, in an order sorted once, instead of after a loop over all of
them (the GPU idles from Megatron-Core's read of the gradient norm to the first launch), and the parameters of at most
:data:`SMALL` elements are stepped by one launch per group of like ones (same hyperparameters, step count and copy
dtype) through tables of their addresses. Why: such a kernel takes a few microseconds on the GPU, less than the host
takes to launch it, so ~200 of them (GPT-2 1.3B's biases and norm weights; Llama 1.2B has ~35) can leave the GPU
waiting on the host at the end of the step, and the loop before the first launch leaves it idle at the start.
"""
from __future__ import annotations

import itertools
import math
import types
import weakref

import torch

#: attribute of an fp32 main parameter: a weak reference to the installed optimizer part that steps it
_OWNER = "_interop_adamw_owner"
#: attribute of an installed part: the clip factor for its next step (set by :func:`_clip_by_total_norm`)
_SCALE = "_interop_adamw_grad_scale"
#: attribute of an installed part: whether it steps with the ``adamw_multi_tensor`` candidate
_MULTI = "_interop_adamw_multi_tensor"
BLOCK = 2048
#: parameters of at most this many elements share multi-tensor launches (``adamw_multi_tensor``); GPT-2 1.3B's and
#: Llama 1.2B's are all 8,192 or fewer, its matrices 4M or more
SMALL = 1 << 20
_OUT_KIND = {None: 0, torch.bfloat16: 1, torch.float16: 2}


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


def install(optimizer, multi_tensor: bool = False) -> int:
    """Step every part of ``optimizer`` (Megatron-Core's, possibly chained) that :func:`applies` with the kernel
    (``multi_tensor``: the ``adamw_multi_tensor`` candidate's launches); returns how many parts. Idempotent."""
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
        setattr(part, _MULTI, multi_tensor)
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                setattr(param, _OWNER, weakref.ref(part))
        part.step_with_ready_grads = types.MethodType(_step_with_ready_grads, part)
        count += 1
    if count and not hasattr(megatron_optimizer, "_interop_unfused_clip"):  # process-wide; others pass through
        megatron_optimizer._interop_unfused_clip = megatron_optimizer.clip_grad_by_total_norm_fp32
        megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm
    return count


def is_multi_tensor(optimizer) -> bool:
    """Whether any part of ``optimizer`` steps with the ``adamw_multi_tensor`` candidate's launches."""
    return any(getattr(part, _MULTI, False) for part in getattr(optimizer, "chained_optimizers", None) or [optimizer])


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


def _state(part, param) -> tuple[dict, int]:
    """``param``'s AdamW state (initialised as torch's fused AdamW does it, on first use) and the step number of the
    update about to be made."""
    state = part.optimizer.state[param]
    if not state:  # torch's lazy initialisation, as its fused AdamW does it
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        _count_from(part, state["step"], 0)  # known: no read of the new counter
    return state, _step_count(part, state["step"]) + 1


def _scalars(group: dict, t: int) -> tuple:
    """The kernel's per-group scalars at step ``t``: decay factor, betas, step size, √(bias correction 2), eps."""
    beta1, beta2 = group["betas"]
    return (1.0 - group["lr"] * group["weight_decay"], beta1, beta2, group["lr"] / (1.0 - beta1 ** t),
            math.sqrt(1.0 - beta2 ** t), group["eps"])


def _launch(param, state, model, scalars: tuple, scale: float) -> None:
    from trainer.kernels.training_triton import adamw_step

    n = param.numel()
    grad = param.grad if param.grad.is_contiguous() else param.grad.contiguous()
    adamw_step[(-(-n // BLOCK),)](param, grad, state["exp_avg"], state["exp_avg_sq"],
                                  model.data if model is not None else param, n, scale, *scalars,
                                  HAS_OUT=model is not None, BLOCK=BLOCK, num_warps=8)


def _step_with_ready_grads(self) -> bool:
    """``step_with_ready_grads`` of an installed part: the AdamW update, the clip factor and the copy to the model's
    16-bit parameters in one kernel per parameter (no separate ``_copy_main_params_to_model_params``)."""
    if getattr(self, _MULTI, False):
        return _step_multi_tensor(self)
    scale = float(self.__dict__.pop(_SCALE, 1.0))
    launches, steps = [], []
    for group in self.optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            state, t = _state(self, param)
            steps.append(state["step"])
            launches.append((param.numel(), param, state, self._interop_copies.get(id(param)), _scalars(group, t)))
    if steps:
        torch._foreach_add_(steps, 1.0)
    for _, param, state, model, scalars in sorted(launches, key=lambda x: -x[0]):
        _launch(param, state, model, scalars, scale)
    return True


def _largest_first(part) -> list[tuple[torch.Tensor, dict]]:
    """(parameter, group) of every parameter of ``part``, largest first; sorted once per set of parameters."""
    groups = part.optimizer.param_groups
    key = tuple(id(p) for group in groups for p in group["params"])
    cached = getattr(part, "_interop_order", None)
    if cached is None or cached[0] != key:
        order = sorted(((p, group) for group in groups for p in group["params"]), key=lambda x: -x[0].numel())
        cached = part._interop_order = (key, order)
    return cached[1]


def _step_multi_tensor(self) -> bool:
    """The ``adamw_multi_tensor`` step: large parameters launched as they come (largest first), the small ones
    (:data:`SMALL`) batched into one :func:`adamw_step_multi` launch per group of like ones."""
    scale = float(self.__dict__.pop(_SCALE, 1.0))
    steps, small = [], {}
    for param, group in _largest_first(self):
        if param.grad is None:
            continue
        state, t = _state(self, param)
        steps.append(state["step"])
        model = self._interop_copies.get(id(param))
        if param.numel() > SMALL or param.grad.dtype != torch.float32 or not param.grad.is_contiguous() \
                or (model is not None and model.dtype not in _OUT_KIND):
            _launch(param, state, model, _scalars(group, t), scale)
            continue
        like = (id(group), t, None if model is None else model.dtype, param.device)
        small.setdefault(like, (group, t, []))[2].append((param, state, model))
    for like, (group, t, members) in small.items():
        if len(members) == 1:
            param, state, model = members[0]
            _launch(param, state, model, _scalars(group, t), scale)
        else:
            _launch_many(self, like, members, _scalars(group, t), scale)
    if steps:
        torch._foreach_add_(steps, 1.0)
    return True


def _launch_many(part, like: tuple, members: list, scalars: tuple, scale: float) -> None:
    """One :func:`adamw_step_multi` launch over ``members`` ((parameter, state, 16-bit copy or None), all alike);
    the address tables are built once and rebuilt only when an address changes."""
    from trainer.kernels.training_triton import adamw_step_multi

    addresses = tuple(a for param, state, model in members
                      for a in (param.data_ptr(), param.grad.data_ptr(), state["exp_avg"].data_ptr(),
                                state["exp_avg_sq"].data_ptr(), 0 if model is None else model.data_ptr(),
                                param.numel()))
    group_id, _, out_dtype, device = like
    key = (group_id, out_dtype, device)  # not the step count: the tables outlive a step
    tables = part.__dict__.setdefault("_interop_tables", {})
    cached = tables.get(key)
    if cached is None or cached[0] != addresses:
        numels = [param.numel() for param, _, _ in members]
        blocks = [-(-n // BLOCK) for n in numels]
        firsts = [0, *itertools.accumulate(blocks)][:-1]
        table = torch.tensor(addresses, dtype=torch.int64).reshape(-1, 6)[:, :5].contiguous()
        cached = (addresses, table.to(device), torch.tensor(numels, dtype=torch.int64).to(device),
                  torch.tensor(firsts, dtype=torch.int32).to(device),
                  torch.tensor([i for i, b in enumerate(blocks) for _ in range(b)], dtype=torch.int32).to(device))
        tables[key] = cached
    _, table, numels, firsts, owner = cached
    adamw_step_multi[(owner.numel(),)](table, numels, firsts, owner, scale, *scalars, OUT_KIND=_OUT_KIND[out_dtype],
                                       BLOCK=BLOCK, num_warps=8)
