"""Fused training kernels for the trainer's Megatron-Core models, chosen automatically.

Each kernel is switched on only where it applies (a CUDA device, 16-bit mixed precision, the layout it
supports, its package importable); everywhere else the unfused Megatron-Core path runs, with nothing for the
user to set. ``disabled`` (benchmark ablations) switches a kernel off by name; ``forced`` (CPU tests) switches
one on where it would not apply by itself, so its wiring can be tested against the unfused path on CPU ranks.

- ``grad_accum_fusion``: weight-gradient GEMMs accumulate straight into the fp32 ``main_grad``
  (:mod:`trainer.kernels.grad_accum`; Megatron-Core's ``gradient_accumulation_fusion`` without apex).
- ``linear_cross_entropy``: output layer + cross entropy in chunks, no logits tensor
  (:mod:`trainer.kernels.linear_cross_entropy`, Liger's kernel; TP 1 and bf16 only).
- ``swiglu_fusion``: Megatron-Core's own fused SwiGLU (``bias_activation_fusion`` for gated SiLU MLPs).
- ``cudnn_attention``: PyTorch's SDPA tries cuDNN's fused attention first (Hopper-tuned; PyTorch's default order
  puts its FlashAttention-2 kernel first), falling back to flash / memory-efficient / math for inputs cuDNN
  does not take (:func:`sdpa_backends`, used by :class:`trainer.attention.SDPAttention`).
"""
from __future__ import annotations

import torch

KERNELS = ("grad_accum_fusion", "linear_cross_entropy", "swiglu_fusion", "cudnn_attention")
disabled: set[str] = set()
forced: set[str] = set()


def _on(name: str, natural: bool) -> bool:
    return name not in disabled and (natural or name in forced)


def _gpu_16bit(cfg) -> bool:
    return torch.cuda.is_available() and cfg.mixed_precision in ("bf16", "fp16")


def config_overrides(cfg, model_config=None) -> dict:
    """TransformerConfig fields for the kernels that Megatron-Core switches itself (set before layers are built)."""
    from trainer.kernels import grad_accum

    out = {}
    if _on("grad_accum_fusion", _gpu_16bit(cfg) and grad_accum.cuda_kernel_available()):
        grad_accum.install()
        out["gradient_accumulation_fusion"] = True
    gated_silu = model_config is not None and getattr(model_config, "gated_linear_unit", False) \
        and getattr(model_config, "activation", None) == "silu"
    if gated_silu and _on("swiglu_fusion", _gpu_16bit(cfg)):
        # Megatron-Core recognises SwiGLU by identity (``activation_func is F.silu``); ours is the same function
        out.update(bias_activation_fusion=True, activation_func=torch.nn.functional.silu)
    return out


def install(chunks: list, cfg, vocab_size: int, tp_size: int) -> list[str]:
    """Per-model kernels on freshly built chunks; returns the names installed (for logs and tests)."""
    from trainer.kernels import linear_cross_entropy as lce

    names = []
    # bf16 only: Liger forms the gradients in the forward pass, before fp16's loss scale could protect them
    natural = torch.cuda.is_available() and cfg.mixed_precision == "bf16" and lce.liger_function() is not None
    if _on("linear_cross_entropy", natural) and all(lce.applies(c, tp_size) for c in chunks):
        for chunk in chunks:
            lce.install(chunk, vocab_size)
        names.append("linear_cross_entropy")
    return names


def sdpa_backends(tensor: torch.Tensor):
    """SDPA backends in priority order for this input, or None for PyTorch's own choice (CPU, 32-bit, disabled)."""
    if not (tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16) and _on("cudnn_attention", True)):
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
