"""Liger's Triton LayerNorm / RMSNorm (forward + backward) as drop-in torch norm modules.

Why: without apex or Transformer Engine the trainer's norms are torch's (:class:`trainer.spec.SequenceParallelNorm`);
Liger (BSD-2) has one-pass Triton kernels for both norms whose backward computes the input gradient and the
per-block weight/bias partial sums in one kernel. Candidate of issue 22 (``liger_norm`` in :mod:`trainer.kernels`):
kept only if an H100 run measures it faster.

The modules subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (same parameters and state-dict names, so
checkpoints and ``param.sequence_parallel`` work unchanged) and call Liger only for 16-bit CUDA inputs with
Liger importable; everything else (CPU, fp32, no Triton) runs torch's own forward. RMSNorm uses Liger's "llama"
casting (normalise in fp32, cast back, then scale: torch's ``RMSNorm`` order) and never writes the incoming
gradient in place (Megatron-Core may still hold it).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _functions():
    """(LigerLayerNormFunction, LigerRMSNormFunction), or None when Liger/Triton is not importable."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:  # noqa: BLE001 - ImportError, or Triton failing to find a GPU backend
        return None
    return LigerLayerNormFunction, LigerRMSNormFunction


def available() -> bool:
    return _functions() is not None


def _liger_input(x: torch.Tensor):
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return None
    return _functions()


class LigerLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dimension whose CUDA 16-bit path is Liger's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fns = _liger_input(x)
        if fns is None or self.weight is None or self.bias is None:
            return super().forward(x)
        return fns[0].apply(x, self.weight, self.bias, self.eps)


class LigerRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dimension whose CUDA 16-bit path is Liger's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fns = _liger_input(x)
        if fns is None or self.weight is None:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        # X, W, eps, offset, casting_mode, in_place
        return fns[1].apply(x, self.weight, eps, 0.0, "llama", False)
