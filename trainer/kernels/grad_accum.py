"""Gradient-accumulation fusion without apex: weight-gradient GEMMs that accumulate straight into ``main_grad``.

Why: Megatron-Core's linear layers compute ``grad_weight = grad_outputᵀ · input`` as a fresh bf16 tensor, and
its DDP hook then adds it into the fp32 ``param.main_grad`` buffer — a bf16 rounding of every weight gradient,
a parameter-sized temporary per GEMM and an extra read-modify-write pass over the fp32 gradients. With
``config.gradient_accumulation_fusion`` Megatron-Core instead calls apex's ``fused_weight_gradient_mlp_cuda``
(``wgrad_gemm_accum_fp32``: one cuBLAS GEMM with ``beta = 1`` into the fp32 buffer) and marks the parameter
``grad_added_to_main_grad`` so the hook skips the add. apex is not available to us; PyTorch ≥ 2.8 exposes the
same cuBLAS mixed-precision GEMM as ``torch.addmm(..., out_dtype=torch.float32)``. :class:`WgradGemmAccum` has
apex's interface and :func:`install` hands it to Megatron-Core's tensor-parallel layers.

The CPU path (and any dtype pair the CUDA kernel does not take) accumulates in ``main_grad``'s dtype with a plain
``addmm_``: the same sum, so the fusion can be tested on CPU ranks against the unfused layers.

Alignment: ``main_grad`` is a view into Megatron-Core's flat gradient buffer, which packs parameters back to back
(it pads them to 64 elements only for the distributed optimizer). One odd-sized parameter shifts every later view:
BERT's two-element binary-head bias leaves each layer's ``main_grad`` 8 bytes off a 16-byte boundary, and cuBLAS
then runs the fused GEMM on its 4-byte-aligned fallback kernels — 2.6× slower on an H100 (BERT-large, 2026-12-07:
72 weight-gradient GEMMs took 32.6 of a 130 ms step; 103 ms without the fusion). For such a view the product is
formed in fp32 by a separate GEMM (``mm(..., out_dtype=float32)``, aligned output) and added: ~10 % slower than the
aligned fused GEMM, the same fp32 precision.
"""
from __future__ import annotations

import torch

from trainer.kernels.wgrad_first_write import overwrites


def accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output[N, out]ᵀ · total_input[N, in]`` in ``main_grad``'s precision (``=`` for the first
    GEMM of a step into a range the zeroing left alone: :mod:`trainer.kernels.wgrad_first_write`)."""
    if total_input.dim() != 2:  # Megatron-Core flattens [s, b, h] to [s·b, h]; be safe for other callers
        total_input = total_input.reshape(-1, total_input.shape[-1])
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
    first = overwrites(main_grad)
    if (main_grad.is_cuda and total_input.dtype in (torch.bfloat16, torch.float16)
            and main_grad.dtype != total_input.dtype):
        if cublas_aligned(main_grad, total_input, grad_output):
            # cuBLAS bf16/fp16 operands, fp32 accumulate and fp32 C with beta = 1 (apex's wgrad_gemm_accum_fp32),
            # or straight into C for a first write
            if first:
                torch.mm(grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
            else:
                torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
        else:  # an unaligned C sends cuBLAS to its slow kernels: form the product aligned, then add (see above)
            product = torch.mm(grad_output.t(), total_input, out_dtype=main_grad.dtype)
            if first:
                main_grad.copy_(product)
            else:
                main_grad.add_(product)
        return
    if total_input.dtype != main_grad.dtype:
        total_input, grad_output = total_input.to(main_grad.dtype), grad_output.to(main_grad.dtype)
    if first:
        torch.mm(grad_output.t(), total_input, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t(), total_input)


def cublas_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor starts on a 16-byte boundary (what cuBLAS's fast GEMM kernels need)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


class WgradGemmAccum:
    """Stand-in for apex's ``fused_weight_gradient_mlp_cuda`` module (the two functions Megatron-Core calls)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        accumulate(total_input, grad_output, main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        accumulate(total_input, grad_output, main_grad)


def cuda_kernel_available() -> bool:
    """Whether this torch has the mixed-precision ``addmm(out_dtype=...)`` on CUDA (PyTorch ≥ 2.8)."""
    return torch.cuda.is_available() and hasattr(torch.ops.aten.addmm, "dtype_out")


def install() -> bool:
    """Point Megatron-Core's tensor-parallel layers at :class:`WgradGemmAccum` unless apex's module is there.
    Must run before the layers are built (they check availability in ``__init__``). Idempotent; returns whether
    gradient-accumulation fusion can now be switched on."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = WgradGemmAccum
        layers._grad_accum_fusion_available = True
    return True
