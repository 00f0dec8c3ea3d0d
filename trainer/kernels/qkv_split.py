"""The QKV bias gradient summed while the query, key and value gradients are packed back together.

Why: Megatron-Core's self-attention splits the packed output of its QKV linear into query, key and value
(``torch.split``: views, no copy); in the backward pass autograd concatenates their gradients into the packed
gradient (a read and a write of it), and the QKV linear then sums that packed gradient over the tokens for its
bias (a third pass, ``grad_output.sum(0)``). On a 1×H100 profile of the GPT-2 1.3B step (seq 2048, micro-batch
16, bf16, 2026-12-07) the concatenations took 6.7 ms and the bias-gradient column sums of all linears 11.8 ms, the
QKV ones ≈ 3 ms of it by bytes. Here the backward of the split is one Triton kernel that writes the packed gradient
and, in the same pass, each program's partial column sums; the QKV linear takes their total as its bias gradient
instead of summing again.

How: Megatron-Core calls the module-level ``SplitAlongDim`` of ``megatron.core.transformer.attention`` when it is
set (Transformer Engine's split; None without it), so :func:`install` points that name at :func:`split_along_dim`.
The sums are made only for a split whose input comes straight (through views) from a QKV linear that takes them —
:class:`trainer.kernels.bias_epilogue.LinearWithBiasEpilogue` with a weight :func:`install` marked — and handed
over through :func:`trainer.kernels.bias_epilogue.take_column_sums`, which gives them only for the very gradient
tensor they were summed from (unchanged since). Everything else (other splits, a device the kernel does not run on,
gradients of another layout) is ``torch.split``'s own backward, a concatenation.
"""
from __future__ import annotations

import torch


def _wants_column_sums(mixed: torch.Tensor) -> bool:
    """Whether ``mixed`` is (a view of) the output of a linear that takes its bias gradient from here."""
    fn = mixed.grad_fn
    while fn is not None and type(fn).__name__.startswith(("View", "Reshape", "Unsafe")):
        fn = fn.next_functions[0][0]
    return bool(getattr(fn, "takes_column_sums", False))


def _bands(device: torch.device, groups: int) -> int:
    """Row bands: the norm backward's programs (two per SM) spread over the groups, so the partial sums stay few."""
    from trainer.kernels.norm import backward_programs

    return max(1, backward_programs(device.index or 0) // groups) if device.type == "cuda" else 2


def concat_with_column_sums(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[s, b, g, Q]``, ``[s, b, g, D]`` x 2 (unit column stride) -> the packed ``[s, b, g, Q + 2·D]`` (contiguous)
    and its column sums over the ``s·b`` tokens (fp32, ``[g·(Q + 2·D)]``)."""
    import triton

    from trainer.kernels.norm import row_bands
    from trainer.kernels.training_triton import qkv_concat_bwd

    s, b, groups, q_width = dq.shape
    d = dk.shape[-1]
    n = s * b
    dx = torch.empty(s, b, groups, q_width + 2 * d, dtype=dq.dtype, device=dq.device)
    qb = triton.next_power_of_2(q_width)
    rows = max(1, 2048 // qb)
    bands, per_band = row_bands(n, _bands(dq.device, groups), rows)
    partial = torch.empty(bands, groups * (q_width + 2 * d), dtype=torch.float32, device=dq.device)
    qkv_concat_bwd[(bands, groups)](dq, dk, dv, dx, partial, n, b, dq.stride(0), dq.stride(1), dq.stride(2),
                                    dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                                    ROWS_PER_PROGRAM=per_band, Q=q_width, QB=qb, D=d, DB=triton.next_power_of_2(d),
                                    GROUPS=groups, ROWS=rows, num_warps=4)
    return dx, partial.sum(0)


class _QKVSplit(torch.autograd.Function):
    """``torch.split(mixed, sizes, dim=3)`` (views); backward: :func:`concat_with_column_sums`, the sums handed to
    the QKV linear."""

    @staticmethod
    def forward(ctx, mixed, sizes):
        parts = torch.split(mixed, sizes, dim=3)
        ctx.shapes, ctx.dtype, ctx.device = [p.shape for p in parts], mixed.dtype, mixed.device
        return parts

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from trainer.kernels.bias_epilogue import hand_over_column_sums
        from trainer.kernels.triton_dispatch import triton_runs

        grads = [torch.zeros(shape, dtype=ctx.dtype, device=ctx.device) if g is None else g
                 for g, shape in zip((dq, dk, dv), ctx.shapes)]
        if not (triton_runs(grads[0]) and all(g.stride(-1) == 1 and g.dtype == grads[0].dtype for g in grads)):
            return torch.cat(grads, dim=3), None
        dx, sums = concat_with_column_sums(*grads)
        hand_over_column_sums(dx, sums)
        return dx, None


def split_along_dim(mixed: torch.Tensor, dim: int, sizes: list[int]):
    """Megatron-Core's ``SplitAlongDim(mixed_qkv, 3, split_arg_list)`` hook: :class:`_QKVSplit` for the packed QKV
    output of a linear that takes its bias gradient from here, ``torch.split`` otherwise."""
    if dim != 3 or len(sizes) != 3 or mixed.dim() != 4 or not _wants_column_sums(mixed):
        return torch.split(mixed, sizes, dim=dim)
    return _QKVSplit.apply(mixed, list(sizes))


def install(chunk: torch.nn.Module) -> int:
    """Mark the QKV linears of this chunk that add their bias in the GEMM epilogue (``bias_epilogue``) to take
    their bias gradient from the split's backward, and point Megatron-Core's ``SplitAlongDim`` at
    :func:`split_along_dim` (process-wide; unmarked linears keep ``torch.split``). Returns how many were marked."""
    from megatron.core.transformer import attention

    from trainer.kernels.bias_epilogue import SPLIT_SUMS, is_marked

    count = 0
    for module in chunk.modules():
        linear = getattr(module, "linear_qkv", None) if isinstance(module, attention.SelfAttention) else None
        if linear is not None and is_marked(linear.weight):
            setattr(linear.weight, SPLIT_SUMS, True)
            count += 1
    if count:
        attention.SplitAlongDim = split_along_dim
    return count


def is_installed(chunk: torch.nn.Module) -> bool:
    from trainer.kernels.bias_epilogue import SPLIT_SUMS

    return any(getattr(p, SPLIT_SUMS, False) for p in chunk.parameters())
