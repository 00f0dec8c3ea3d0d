"""Core attention for the trainer's layer spec: Megatron-Core's ``DotProductAttention`` interface over PyTorch's
``scaled_dot_product_attention`` (cuDNN / flash / memory-efficient kernels on GPU; cuDNN first, see
:func:`trainer.kernels.sdpa_backends`).

Why: without Transformer Engine, Megatron-Core's local spec computes attention unfused — a ``[b·heads, s, s]``
score tensor per layer (``baddbmm``), a softmax and a dropout over it, all kept for the backward pass. At
sequence 2048 that is most of a step's memory traffic and activation memory (the brief's 1.3B run ran out of
memory without recompute). SDPA never materialises the scores. The maths is the same: scores scaled by
``softmax_scale`` (query-key layer scaling divides the scores by the layer number and multiplies them back inside
the fp32 softmax, so it cancels), causal masking, softmax accumulated in fp32 (SDPA's 16-bit kernels do), dropout
on the probabilities.

Masks follow Megatron's convention (True = masked out). With no mask and a causal layer, ``sq == sk`` (training)
uses SDPA's causal kernels; ``sq < sk`` (a query block at the end of a longer key sequence, as in cached
inference) masks bottom-right aligned. Dropout draws from Megatron's CUDA RNG tracker like the local attention
(same seeding across TP ranks' model-parallel streams), but not the same random numbers: runs with attention
dropout are statistically, not bitwise, equal to the local spec.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from trainer.kernels import sdpa_backends


class SDPAttention(MegatronModule):
    """Drop-in for ``megatron.core.transformer.dot_product_attention.DotProductAttention`` (same constructor and
    ``forward``): inputs ``[s, b, heads, d]`` (keys/values ``[s, b, groups, d]``), output ``[s, b, heads·d]``."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,  # noqa: ARG002
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):  # noqa: ARG002 - Megatron-Core passes these
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine's attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type {config.softmax_type!r} is not supported")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention: sliding-window attention is not supported")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(f"SDPAttention: heads {config.num_attention_heads} / groups {config.num_query_groups} "
                             f"do not divide over tensor parallel size {tp}")
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias need Transformer Engine's attention")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d] (views: SDPA takes strided inputs with a contiguous last dimension)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads != self.groups:
            repeat = self.heads // self.groups
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.to(torch.bool)  # SDPA: True = attend
        elif causal and sq == sk:
            is_causal = True
        elif causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        dropout = self.dropout_p if self.training else 0.0
        backends = sdpa_backends(q)  # cuDNN's attention first on a GPU in 16 bit (trainer/kernels)
        with sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext():
            if dropout > 0.0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                         is_causal=is_causal, scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=is_causal, scale=self.softmax_scale)
        # [b, n, sq, d] -> [sq, b, n·d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)
