"""A Megatron-Core core attention that takes an additive bias: PyTorch SDPA with a float ``attn_mask``.

Why: Megatron-Core's local ``DotProductAttention`` asserts on ``attention_bias``, so without Transformer Engine
a ``T5Model`` with ``position_embedding_type='relative'`` cannot run at all. This module has the same
constructor and ``forward`` as ``DotProductAttention`` and adds the bias (``[1 or b, heads on this rank, sq, sk]``,
Megatron-Core's ``T5Model`` already scatters it by heads over TP) to the scores, together with the boolean mask
(Megatron's convention: True = masked out) and, for a causal layer, the causal triangle.

Scaling: scores are multiplied by ``softmax_scale`` (``config.softmax_scale``, else ``1/sqrt(kv_channels)``),
as in every Megatron attention. Transformers' T5 does not scale its scores; the tensor map folds that into the
query weights instead (HF ``q`` times ``sqrt(d_kv)``; exact for ``d_kv = 64``, a power of four). So checkpoints
keep Megatron's meaning and load into a Transformer-Engine-built ``T5Model`` unchanged.

Masked positions get the dtype's most negative value (``masked_fill``, never an addition, so a bias plus two
masks cannot overflow to ``-inf``), which is Transformers' rule: a fully masked query row attends uniformly
instead of producing NaN. Without a bias the mask goes to SDPA as a boolean (its fused kernels apply).
Generic on purpose (any bias, any causal offset ``sq <= sk``), so a trainer attention core can delegate to it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def combine_masks(attention_mask: torch.Tensor | None, causal: bool, sq: int, sk: int,
                  device: torch.device) -> torch.Tensor | None:
    """One boolean mask (True = masked) from Megatron's mask and a bottom-right aligned causal triangle."""
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    if causal:
        future = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        mask = future if mask is None else mask | future
    return mask


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     mask: torch.Tensor | None, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """SDPA over ``[b, heads, s, d]`` tensors with an additive ``bias`` and a boolean ``mask`` (True = masked)."""
    if bias is None:
        attn_mask = None if mask is None else ~mask
    else:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)


class BiasedSDPAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` that accepts ``attention_bias``: inputs ``[s, b, heads, d]``,
    output ``[sq, b, heads·d]``; multi-head or grouped-query attention."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,  # noqa: ARG002
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):  # noqa: ARG002 - Megatron-Core passes these
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("BiasedSDPAttention: context parallelism needs Transformer Engine's attention")
        tp = pg_collection.tp.size() if pg_collection is not None and getattr(pg_collection, "tp", None) \
            else parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp:
            raise ValueError(f"BiasedSDPAttention: {config.num_attention_heads} heads do not divide over TP={tp}")
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("BiasedSDPAttention: packed sequences need Transformer Engine's attention")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask = combine_masks(attention_mask, causal, sq, sk, q.device)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = biased_attention(q, k, v, attention_bias, mask, self.softmax_scale, dropout)
        else:
            out = biased_attention(q, k, v, attention_bias, mask, self.softmax_scale, dropout)
        return out.permute(2, 0, 1, 3).reshape(sq, b, q.shape[1] * self.head_dim)
