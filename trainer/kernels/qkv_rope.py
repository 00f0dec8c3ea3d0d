"""Rotary embedding applied to the packed QKV projection: one kernel forward, one backward, no split and no concat.

Why: Megatron-Core splits the QKV GEMM's output ``[s, b, ng, (np/ng + 2)·hn]`` into query, key and value views,
rotates the query and the key separately, and in the backward pass concatenates the three gradients back into the
packed layout. On a 1×H100 profile of the Llama 1.2B step (seq 2048, micro-batch 16, bf16, 2026-12-07) the
compiled RoPE (``rope_fusion``: one kernel per tensor and direction, cos/sin recomputed in each) and the gradient
concatenation took about 12 ms of a 497 ms step, about three times what their bytes need. Megatron-Core already has
the hook for a fused version (``TransformerConfig.fused_single_qkv_rope``, which hands the unsplit tensor to
Transformer Engine's ``apply_fused_qkv_rotary_pos_emb``); without Transformer Engine this module fills it: the
forward kernel reads each token's packed heads once, writes the rotated query and key and the value (contiguous,
the layout SDPA reads), and the backward kernel writes the packed gradient directly, un-rotating as it goes.

Math (rotate-half RoPE, ``rotary_interleaved=False``): with ``c = cos(f)``, ``s = sin(f)`` rounded to the
activation dtype as Megatron-Core does, the low half ``x₁`` and the high half ``x₂`` of a head become
``x₁·c₁ − x₂·s₁`` and ``x₂·c₂ + x₁·s₂``; the backward pass applies the transpose (``g₁·c₁ + g₂·s₂``,
``g₂·c₂ − g₁·s₁``). fp32 inside, one rounding on the store. Scope (:func:`applies`): full-width rotation
(``rotary_percent`` 1), no interleaving, no YaRN/MRoPE scaling, no context parallelism, no q/k norms, no output
gate, at least one query group per tensor-parallel rank, training and evaluation calls (Megatron-Core refuses
packed sequences and inference contexts once the flag is set; the trainer passes neither). The kernels run on
CUDA 16-bit tensors (or under Triton's interpreter, for the CPU tests); elsewhere :func:`reference_qkv_rope`
(split + Megatron-Core's own sbhd RoPE) computes the same.
"""
from __future__ import annotations

import torch

from trainer.kernels.triton_dispatch import triton_runs

ROWS_PER_PROGRAM = 64  # (token, head) rows per program


def reference_qkv_rope(qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, split: list[int]):
    """Megatron-Core's unfused path: split the packed tensor, rotate query and key with its own (sbhd) RoPE."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    query, key, value = torch.split(qkv, split, dim=3)
    s, hn = qkv.shape[0], split[1]
    query = query.reshape(query.size(0), query.size(1), -1, hn)
    return _apply_rotary_pos_emb_bshd(query, q_freqs[:s]), _apply_rotary_pos_emb_bshd(key, k_freqs[:s]), value


class _PackedRoPE(torch.autograd.Function):
    """``qkv [s, b, ng, (qpg + 2)·hn]`` -> query ``[s, b, ng·qpg, hn]``, key and value ``[s, b, ng, hn]``."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, qpg, hn):
        s, b, ng, _ = qkv.shape
        if qkv.stride(3) != 1 or qkv.stride(2) != (qpg + 2) * hn:
            qkv = qkv.contiguous()
        query = qkv.new_empty(s, b, ng * qpg, hn)
        key = qkv.new_empty(s, b, ng, hn)
        value = qkv.new_empty(s, b, ng, hn)
        heads = ng * (qpg + 2)
        import triton

        from trainer.kernels.training_triton import packed_rope_fwd

        packed_rope_fwd[(-(-s * b * heads // ROWS_PER_PROGRAM),)](
            qkv, cos, sin, query, key, value, b, s * b, qkv.stride(0), qkv.stride(1), query.stride(0),
            query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), HEADS=heads,
            PER_GROUP=qpg + 2, QPG=qpg, HALF=hn // 2, BLOCK=ROWS_PER_PROGRAM, COLS=triton.next_power_of_2(hn // 2), num_warps=4)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.qpg, ctx.hn = qkv.shape, qpg, hn
        return query, key, value

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        s, b, ng, width = ctx.shape
        qpg, hn = ctx.qpg, ctx.hn
        grads = []
        for grad, heads in ((dq, ng * qpg), (dk, ng), (dv, ng)):
            grad = torch.zeros(s, b, heads, hn, dtype=cos.dtype, device=cos.device) if grad is None else grad
            grads.append(grad if grad.stride(3) == 1 else grad.contiguous())
        dq, dk, dv = grads
        dx = torch.empty(s, b, ng, width, dtype=dq.dtype, device=dq.device)
        heads = ng * (qpg + 2)
        import triton

        from trainer.kernels.training_triton import packed_rope_bwd

        packed_rope_bwd[(-(-s * b * heads // ROWS_PER_PROGRAM),)](
            dq, dk, dv, cos, sin, dx, b, s * b, dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0),
            dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), dx.stride(0), dx.stride(1),
            HEADS=heads, PER_GROUP=qpg + 2, QPG=qpg, HALF=hn // 2, BLOCK=ROWS_PER_PROGRAM, COLS=triton.next_power_of_2(hn // 2),
            num_warps=4)
        return dx, None, None, None, None


def packed_qkv_rope(qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, split: list[int]):
    """RoPE on the packed QKV tensor (``split`` = ``[qpg·hn, hn, hn]``): the Triton kernels where they run and the
    frequencies are the usual ``[s, 1, 1, hn]`` (one table for query and key), the unfused path otherwise."""
    hn = split[1]
    qpg = split[0] // hn
    s = qkv.shape[0]
    same = q_freqs is k_freqs  # Megatron-Core passes one table twice for self-attention
    table = q_freqs.dim() == 4 and q_freqs.shape[1:3] == (1, 1) and q_freqs.shape[-1] == hn and q_freqs.shape[0] >= s
    if not (triton_runs(qkv) and same and table and hn % 2 == 0):
        return reference_qkv_rope(qkv, q_freqs, k_freqs, split)
    freqs = q_freqs[:s, 0, 0].float()
    cos, sin = torch.cos(freqs).to(qkv.dtype).contiguous(), torch.sin(freqs).to(qkv.dtype).contiguous()
    return _PackedRoPE.apply(qkv, cos, sin, qpg, hn)


def megatron_hook(qkv, q_freqs, k_freqs, qkv_split_arg_list, *args, **kwargs):
    """Stands in for Transformer Engine's ``apply_fused_qkv_rotary_pos_emb`` in Megatron-Core's attention (only
    configs marked by :func:`install` reach it: they alone set ``fused_single_qkv_rope``)."""
    return packed_qkv_rope(qkv, q_freqs, k_freqs, list(qkv_split_arg_list))


def applies(chunk: torch.nn.Module, tp_size: int) -> bool:
    """Whether this (unwrapped) model chunk's self-attention can take the packed RoPE (see the module docstring)."""
    config = getattr(chunk, "config", None)
    if getattr(chunk, "position_embedding_type", None) != "rope" or config is None:
        return False
    groups = config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    unsupported = (config.rotary_interleaved, config.multi_latent_attention, config.attention_output_gate,
                   config.qk_layernorm, getattr(config, "context_parallel_size", 1) > 1, config.flash_decode,
                   config.test_mode, getattr(config, "apply_rope_fusion", False),
                   getattr(config, "yarn_rotary_scaling_factor", None) is not None, head_dim % 2)
    rotary = getattr(chunk, "rotary_pos_emb", None)  # Megatron-Core's RotaryEmbedding: inv_freq has rot_dim / 2
    full = rotary is not None and 2 * rotary.inv_freq.numel() == head_dim
    return full and groups >= tp_size and not any(bool(u) for u in unsupported)


def install(config) -> None:
    """Point Megatron-Core's fused-QKV-RoPE hook at :func:`megatron_hook` (process-wide, idempotent) and switch the
    hook on for this config alone (``fused_single_qkv_rope``)."""
    from megatron.core.transformer import attention

    attention.apply_fused_qkv_rotary_pos_emb = megatron_hook
    attention.HAVE_FUSED_QKV_ROPE = True
    config.fused_single_qkv_rope = True


def is_installed(config) -> bool:
    """Whether ``config`` takes the packed path (without Transformer Engine only :func:`install` sets the flag)."""
    return bool(getattr(config, "fused_single_qkv_rope", False))
