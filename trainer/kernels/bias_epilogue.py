"""Linear biases added inside the GEMM (cuBLASLt's bias epilogue) instead of by a broadcast add after it.

Why: Megatron-Core's tensor-parallel linear computes ``matmul(input, weightᵀ)`` and then ``output + bias`` — a
separate pass over the whole output. A broadcast add does not take PyTorch's vectorised elementwise path, so on a
1×H100 profile of the GPT-2 1.3B shape (seq 2048, micro-batch 8, bf16, 2026-12-07) the QKV bias adds ran at about
half the memory bandwidth. ``torch.addmm(bias, input, weightᵀ)`` with a 1-D bias is one cuBLASLt GEMM whose
epilogue adds the bias while the output tile is still in registers: the pass disappears.

:class:`LinearWithBiasEpilogue` is Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication`` with only
the forward GEMM changed: the backward pass (data and weight gradients, gradient-accumulation fusion, the bias
gradient as a column sum, the tensor-parallel collectives) is Megatron-Core's own, so the forward must leave the
same fields on ``ctx`` that Megatron-Core's forward leaves. (One exception, ``qkv_split``: a QKV linear
whose weight it marked takes its bias gradient from the split's backward, :func:`take_column_sums`, instead of the
column sum.) Layers opt in per weight (:func:`install` marks the
weights of the column-parallel linears that add their bias themselves: GPT-2's and BERT's QKV); sequence
parallelism (an all-gather before the GEMM), non-contiguous inputs and unmarked weights take Megatron-Core's
forward unchanged.
"""
from __future__ import annotations

import weakref

import torch

_MARK = "_interop_bias_epilogue"
#: attribute of a marked QKV weight whose bias gradient is summed in the split's backward (``qkv_split``)
SPLIT_SUMS = "_interop_qkv_split_sums"
#: (weak reference to a packed gradient, its version then, its column sums) until the QKV linear takes them
_column_sums: tuple | None = None


def hand_over_column_sums(grad: torch.Tensor, sums: torch.Tensor) -> None:
    """Leaves ``grad``'s column sums for the QKV linear's backward (:func:`take_column_sums`), which comes next."""
    global _column_sums
    _column_sums = (weakref.ref(grad), grad._version, sums)


def take_column_sums(grad_output: torch.Tensor) -> torch.Tensor | None:
    """The column sums handed over for the gradient ``grad_output`` is (a view of), once; None for any other tensor
    or if it changed since."""
    global _column_sums
    if _column_sums is None:
        return None
    ref, version, sums = _column_sums
    _column_sums = None
    packed = ref()
    if packed is None or not (grad_output is packed or grad_output._base is packed) \
            or grad_output.numel() != packed.numel() or packed._version != version:
        return None
    return sums


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
            # the QKV bias gradient summed in the split's backward (``qkv_split``), for marked weights
            ctx.takes_column_sums = getattr(weight, SPLIT_SUMS, False)
            flat = input.view(-1, input.shape[-1])
            return torch.addmm(bias, flat, weight.t()).view(*input.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad_output):
            sums = take_column_sums(grad_output) if getattr(ctx, "takes_column_sums", False) else None
            if sums is None:
                return base.backward(ctx, grad_output)
            ctx.use_bias = False  # Megatron-Core's backward skips its column sum; the split's sums stand in
            try:
                grads = base.backward(ctx, grad_output)
            finally:
                ctx.use_bias = True  # a second backward through a retained graph sums again
            return (grads[0], grads[1], sums.to(grad_output.dtype), *grads[3:])

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


def is_marked(weight: torch.Tensor) -> bool:
    """Whether this linear weight's bias is added in the GEMM's epilogue."""
    return bool(getattr(weight, _MARK, False))


def is_installed(chunk: torch.nn.Module) -> bool:
    return any(is_marked(p) for p in chunk.parameters())
