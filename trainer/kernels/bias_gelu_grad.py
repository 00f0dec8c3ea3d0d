"""The backward pass of Megatron-Core's fused bias + tanh-GELU with the bias gradient summed in the same kernel.

Why: Megatron-Core's ``GeLUFunction`` returns the input gradient as the bias gradient too and leaves autograd to
sum it over the tokens, a second pass over ``[N, 4h]``. On a 1×H100 profile of the GPT-2 1.3B step (seq 2048,
micro-batch 16, bf16, 2026-12-07) those column sums over the first MLP linear's output were about 4.5 ms of the 9 ms
of bias-gradient reductions in a 530 ms step. Here the backward kernel computes the GELU gradient (Megatron-Core's
``bias_gelu_back`` formula, fp32 inside), stores it, and adds the stored (rounded) values of its block of rows into
fp32 column partial sums; a small sum over the row blocks gives the bias gradient. The forward pass is Megatron-Core's
own compiled ``bias_gelu``.

Megatron-Core's MLP calls the module-level ``bias_gelu_impl``; :func:`trainer.kernels.install` points it at
:func:`fused_bias_gelu` (process-wide; the latest model built decides). CUDA 16-bit calls (or CPU calls under
Triton's interpreter, for the tests) take this path; every other call runs Megatron-Core's ``GeLUFunction``.
"""
from __future__ import annotations

import torch

from trainer.kernels.triton_dispatch import triton_runs

ROWS_PER_PROGRAM = 256
BLOCK_ROWS = 16
BLOCK_COLS = 256


class _BiasGeLU(torch.autograd.Function):
    """``gelu_tanh(y + bias)`` for ``y [N, F]`` (contiguous rows), ``bias [F]``."""

    @staticmethod
    def forward(ctx, y, bias):
        from megatron.core.fusions.fused_bias_gelu import bias_gelu

        ctx.save_for_backward(y, bias)
        return bias_gelu(bias, y)

    @staticmethod
    def backward(ctx, grad):
        y, bias = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        n, width = y.shape
        blocks = -(-n // ROWS_PER_PROGRAM)
        dx = torch.empty_like(y)
        partial = torch.empty(blocks, width, dtype=torch.float32, device=y.device)
        from trainer.kernels.training_triton import bias_gelu_bwd

        bias_gelu_bwd[(blocks, -(-width // BLOCK_COLS))](grad, y, bias, dx, partial, n, width, grad.stride(0),
                                                    y.stride(0), dx.stride(0), ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
                                                    BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=4)
        return dx, partial.sum(0).to(bias.dtype)


def fused_bias_gelu(input, bias):
    """Megatron-Core's ``bias_gelu_impl`` signature (``input [..., F]``, ``bias [F]``)."""
    from megatron.core.fusions.fused_bias_gelu import GeLUFunction

    if bias is None or not triton_runs(input) or bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        return GeLUFunction.apply(input, bias)
    shape = input.shape
    rows = input.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _BiasGeLU.apply(rows, bias).view(shape)
