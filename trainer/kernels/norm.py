"""LayerNorm and RMSNorm as Triton kernels whose backward reads the input and the output gradient once.

Why: torch's norm backward is two passes over the activations — one kernel for the input gradient and a second that
reads the input and the output gradient again for the weight (and bias) gradient. On a 1×H100 profile of the
GPT-2 1.3B step (seq 2048, micro-batch 16, bf16, 2026-12-07) the 49 LayerNorms took 22.5 ms of a 530 ms step,
about twice what their bytes need (Llama 1.2B's 33 RMSNorms: 12.7 ms). Liger's norms do the backward in one kernel
but walk a row at a time per program and measured no faster end to end (docs/experiments.md).
Here the forward normalises a few whole rows per program and keeps each row's mean and rstd (fp32); the backward
takes a contiguous band of rows per program, a few rows per step, computes their input gradient and adds
``dy·x̂`` (and ``dy``) into fp32 partial sums held in registers, written once per program and summed by torch.

The modules subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (same parameters and state-dict names, so
checkpoints and ``param.sequence_parallel`` work unchanged). The kernels take CUDA 16-bit inputs (or CPU tensors
under Triton's interpreter, for the CPU tests) with an affine weight and a row of at most 16,384; everything else
runs torch's own forward. RMSNorm computes ``x·rstd·w`` in fp32 and rounds once (torch rounds ``x·rstd`` before
the weight: the two differ by at most a rounding in 16 bits, and not at all in fp32).
"""
from __future__ import annotations

import functools

import torch

from trainer.kernels.triton_dispatch import triton_runs

MAX_WIDTH = 16384


@functools.cache
def available() -> bool:
    """Whether Triton imports (the kernels' module compiles its decorators)."""
    try:
        import trainer.kernels.training_triton  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or Triton failing to find a backend
        return False
    return True


@functools.cache
def _programs(device_index: int) -> int:
    """Backward programs: two per SM, so every SM holds a band of rows and the partial sums stay few."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _shape(width: int) -> tuple[int, int, int]:
    """(columns block, forward rows per program, backward rows per step) for rows of ``width``."""
    import triton

    block = triton.next_power_of_2(width)
    return block, max(1, 8192 // block), max(1, 4096 // block)


class _Norm(torch.autograd.Function):
    """``x [N, H]`` (unit column stride) -> LayerNorm / RMSNorm of each row with weight ``w`` and optional bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rms: bool):
        from trainer.kernels.training_triton import norm_fwd

        n, width = x.shape
        block, rows, _ = _shape(width)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        norm_fwd[(-(-n // rows),)](x, weight, bias if bias is not None else weight, y, mean, rstd, n, width,
                                   x.stride(0), y.stride(0), eps, RMS=rms, HAS_BIAS=bias is not None, ROWS=rows,
                                   BLOCK=block, num_warps=8 if block >= 2048 else 4)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from trainer.kernels.training_triton import norm_bwd

        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        n, width = x.shape
        block, _, rows = _shape(width)
        programs = _programs(x.device.index or 0) if x.is_cuda else 4
        per_program = -(-n // programs)
        per_program = -(-per_program // rows) * rows  # whole steps of ``rows``
        programs = -(-n // per_program)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dw = torch.empty(programs, width, dtype=torch.float32, device=x.device)
        db = torch.empty(programs, width, dtype=torch.float32, device=x.device) if ctx.has_bias else dw
        norm_bwd[(programs,)](dy, x, weight, mean, rstd, dx, dw, db, n, width, dy.stride(0), x.stride(0),
                              dx.stride(0), ROWS_PER_PROGRAM=per_program, RMS=ctx.rms, HAS_BIAS=ctx.has_bias,
                              ROWS=rows, BLOCK=block, num_warps=8 if block >= 2048 else 4)
        grad_bias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, dw.sum(0).to(weight.dtype), grad_bias, None, None


def _takes(x: torch.Tensor, weight) -> bool:
    return weight is not None and 0 < x.shape[-1] <= MAX_WIDTH and x.numel() > 0 and triton_runs(x)


def _apply(x: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _Norm.apply(rows, weight, bias, eps, rms).view(x.shape)


class TritonLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dimension whose 16-bit CUDA path is this module's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _takes(x, self.weight):
            return super().forward(x)
        return _apply(x, self.weight, self.bias, self.eps, rms=False)


class TritonRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dimension whose 16-bit CUDA path is this module's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _takes(x, self.weight):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _apply(x, self.weight, None, eps, rms=True)
