"""Linear biases added inside the GEMM (cuBLASLt's bias epilogue) instead of by a broadcast add after it.

Why: Megatron-Core's tensor-parallel linear computes ``matmul(input, weightᵀ)`` and then ``output + bias`` — a
separate pass over the whole output. A broadcast add does not take PyTorch's vectorised elementwise path, so on a
1×H100 profile of the GPT-2 1.3B shape (seq 2048, micro-batch 8, bf16, 2026-12-07) the QKV bias adds ran at about
half the memory bandwidth. ``torch.addmm(bias, input, weightᵀ)`` with a 1-D bias is one cuBLASLt GEMM whose
epilogue adds the bias while the output tile is still in registers: the pass disappears.

:class:`LinearWithBiasEpilogue` is Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication`` with only
the forward GEMM changed: the backward pass (data and weight gradients, gradient-accumulation fusion, the bias
gradient as a column sum, the tensor-parallel collectives) is Megatron-Core's own, so the forward must leave the
same fields on ``ctx`` that Megatron-Core's forward leaves. Layers opt in per weight (:func:`install` marks the
weights of the column-parallel linears that add their bias themselves: GPT-2's and BERT's QKV); sequence
parallelism (an all-gather before the GEMM), non-contiguous inputs and unmarked weights take Megatron-Core's
forward unchanged.
"""
from __future__ import annotations

import torch

_MARK = "_interop_bias_epilogue"


def _epilogue_applies(input, weight, bias, sequence_parallel) -> bool:
    return (bias is not None and getattr(weight, _MARK, False) and not sequence_parallel and input.dim() >= 2
            and input.is_contiguous() and bias.dtype == input.dtype == weight.dtype)


def _make_class(base):
    """``base``'s subclass (Megatron-Core's own linear function, kept as ``layers._interop_base_linear_function``)."""
    from megatron.core.tensor_parallel.layers import custom_fwd

    class LinearWithBiasEpilogue(base):
        """Megatron-Core's linear autograd function; the forward adds the bias in the GEMM's epilogue."""

        @staticmethod
        @custom_fwd
        def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                    grad_output_buffer, wgrad_deferral_limit, tp_group):
            if not _epilogue_applies(input, weight, bias, sequence_parallel):
                return base.forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                    sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)
            # the fields Megatron-Core's forward sets for its backward (megatron/core/tensor_parallel/layers.py)
            ctx.save_for_backward(input, weight)
            ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") \
                else None
            ctx.use_bias = True
            ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
            ctx.allreduce_dgrad = allreduce_dgrad
            ctx.sequence_parallel = sequence_parallel
            ctx.wgrad_deferral_limit = wgrad_deferral_limit
            ctx.grad_output_buffer = grad_output_buffer
            ctx.tp_group = tp_group
            flat = input.view(-1, input.shape[-1])
            return torch.addmm(bias, flat, weight.t()).view(*input.shape[:-1], weight.shape[0])

    return LinearWithBiasEpilogue


def install(chunk: torch.nn.Module) -> int:
    """Mark the weights of this chunk's linears that add their own bias (idempotent) and point Megatron-Core's
    linear function at :class:`LinearWithBiasEpilogue` (process-wide; unmarked weights are unaffected). Returns
    how many linears were marked."""
    from megatron.core.tensor_parallel import layers

    if not hasattr(layers, "_interop_base_linear_function"):
        layers._interop_base_linear_function = layers.LinearWithGradAccumulationAndAsyncCommunication
        layers.LinearWithGradAccumulationAndAsyncCommunication = _make_class(layers._interop_base_linear_function)
    count = 0
    for module in chunk.modules():
        # a row-parallel linear adds its bias after the all-reduce, outside the GEMM's function
        # a linear without its own weight (BERT's output layer: the embedding's, passed at call time) stays unmarked
        if isinstance(module, layers.ColumnParallelLinear) and getattr(module, "bias", None) is not None \
                and getattr(module, "weight", None) is not None and not module.skip_bias_add:
            setattr(module.weight, _MARK, True)
            count += 1
    return count


def is_installed(chunk: torch.nn.Module) -> bool:
    return any(getattr(p, _MARK, False) for p in chunk.parameters())
