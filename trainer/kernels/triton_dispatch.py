"""Where the trainer's Triton kernels (:mod:`trainer.kernels.training_triton`) run: one test shared by the modules
that call them (:mod:`trainer.kernels.qkv_rope`, :mod:`trainer.kernels.swiglu`, :mod:`trainer.kernels.norm`)
and by their tests. A leaf module: those modules are imported by :mod:`trainer.kernels` itself."""
from __future__ import annotations

import os

import torch


def triton_runs(tensor: torch.Tensor) -> bool:
    """Whether the trainer's Triton kernels (:mod:`trainer.kernels.training_triton`) take this tensor: CUDA and
    16-bit, or a CPU tensor under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return tensor.device.type == "cpu"
    return tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16)
