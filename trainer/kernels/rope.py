"""Fused rotary position embedding: Megatron-Core's own RoPE function, compiled, for the models that ask for it.

Why: without Transformer Engine or apex, Megatron-Core applies RoPE unfused (``rope_utils``: cos and sin of the
frequencies, ``t · cos``, a rotate-half built from a split, a negation and a concatenation, ``· sin``, an add and
a final concatenation with the unrotated part), once for the queries and once for the keys of every layer, and
the same again in the backward pass. On a 1×H100 profile of the Llama 1.2B shape (seq 2048, micro-batch 8, bf16,
2026-12-07) those kernels — ``CatArrayBatchedCopy``, bf16 multiplies, negations and adds — took about 45 of a
542 ms step. Compiled, inductor emits one kernel per tensor for the forward pass and one for the backward pass
(1.057x the step in the same job).

Megatron-Core's attention calls the module-level ``apply_rotary_pos_emb``; :func:`install` points it at
:func:`fused_rope` once per process and marks the model's ``TransformerConfig``. Only marked configs, in
training calls (gradients on, no packed sequences, Megatron-Core's own fusion off) take the compiled path;
every other call, and every other model in the process, runs Megatron-Core's function unchanged. It compiles on
CPU too (inductor's C++ backend), which is how the CPU tests compare it with the unfused function.
"""
from __future__ import annotations

import torch

_MARK = "_interop_rope_fusion"


@torch.compile(dynamic=False)
def _compiled(t, freqs, config, mscale=1.0, cp_group=None):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return apply_rotary_pos_emb(t, freqs, config, mscale=mscale, cp_group=cp_group)


def fused_rope(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
    """Megatron-Core's ``apply_rotary_pos_emb``; compiled for marked configs in training calls."""
    from megatron.core.models.common.embeddings import rope_utils

    if (is_fused(config) and cu_seqlens is None and cp_group is not None and torch.is_grad_enabled()
            and not config.apply_rope_fusion):
        return _compiled(t, freqs, config, mscale=mscale, cp_group=cp_group)
    return rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)


def applies(chunk: torch.nn.Module) -> bool:
    """Whether this (unwrapped) model chunk applies RoPE through Megatron-Core's attention."""
    return getattr(chunk, "position_embedding_type", None) == "rope"


def install(config) -> None:
    """Route Megatron-Core's attention through :func:`fused_rope` (process-wide, idempotent) and mark ``config``."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = fused_rope
    setattr(config, _MARK, True)


def is_fused(config) -> bool:
    return bool(getattr(config, _MARK, False))
