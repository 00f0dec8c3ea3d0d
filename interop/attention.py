"""The project's one SDPA core attention: Megatron-Core's ``DotProductAttention`` interface over PyTorch's
``scaled_dot_product_attention``, with an optional additive bias.

Why one core: the trainer's layer spec (``trainer.attention.SDPAttention``: fused attention without Transformer
Engine), T5's relative-position bias (:mod:`interop.t5`) and BLOOM's ALiBi (:mod:`interop.alibi`) all need the same
thing — Megatron-Core's local ``DotProductAttention`` materialises a ``[b·heads, s, s]`` score tensor and refuses
``attention_bias``. It lives in ``interop`` because verification builds T5/BLOOM models without the trainer; the
trainer subclasses it only to choose SDPA's kernels (:meth:`SDPACoreAttention.kernel_context`).

The maths is Megatron's: scores scaled by ``softmax_scale`` (``config.softmax_scale``, else ``1/sqrt(kv_channels)``;
query-key layer scaling cancels inside the fp32 softmax), softmax accumulated in fp32 (SDPA's 16-bit kernels do),
dropout on the probabilities from Megatron's CUDA RNG tracker (same seeding across TP ranks, not the same random
numbers as the local attention). Masks follow Megatron's convention (True = masked out); a causal layer adds the
bottom-right aligned triangle (a query block at the end of a longer key sequence, as in cached inference) to a
given mask too — a padding mask plus the layer's causality, what T5's decoder passes (Transformer Engine's
``padding_causal``) — unless :attr:`SDPACoreAttention.causal_with_mask` is off (Megatron-Core's local
``DotProductAttention`` uses a given mask as it is). With no mask and no bias, ``sq == sk`` uses SDPA's causal
kernels. With a bias, masked positions get the dtype's most
negative value (``masked_fill``, never an addition, so a bias plus two masks cannot overflow to ``-inf``) — the
Transformers rule: a fully masked query row attends uniformly instead of producing NaN. The bias is
``[1 or b, heads on this rank, sq, sk]`` (Megatron-Core's ``T5Model`` already scatters it by heads over TP).
"""
from __future__ import annotations

import contextlib
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
                     mask: torch.Tensor | None, scale: float, dropout: float = 0.0,
                     is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA over ``[b, heads, s, d]`` tensors with an additive ``bias`` and a boolean ``mask`` (True = masked);
    ``enable_gqa``: keys and values may have fewer heads, each serving a contiguous group of query heads."""
    if bias is None:
        attn_mask = None if mask is None else ~mask
    else:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


class SDPACoreAttention(MegatronModule):
    """Drop-in for ``megatron.core.transformer.dot_product_attention.DotProductAttention`` (same constructor and
    ``forward``) that also takes ``attention_bias``: inputs ``[s, b, heads, d]`` (keys/values
    ``[s, b, groups, d]``), output ``[sq, b, heads·d]``; multi-head or grouped-query attention."""

    causal_with_mask = True  # a causal layer's triangle is added to a given mask (see the module docstring)

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,  # noqa: ARG002
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):  # noqa: ARG002 - Megatron-Core passes these
        super().__init__(config=config)
        name = type(self).__name__
        if config.context_parallel_size != 1:
            raise ValueError(f"{name}: context parallelism needs Transformer Engine's attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"{name}: softmax_type {config.softmax_type!r} is not supported")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"{name}: sliding-window attention is not supported")
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        tp = tp_group.size() if tp_group is not None else parallel_state.get_tensor_model_parallel_world_size()
        groups = config.num_query_groups or config.num_attention_heads
        if config.num_attention_heads % tp or groups % tp:
            raise ValueError(f"{name}: heads {config.num_attention_heads} / groups {groups} do not divide over "
                             f"tensor parallel size {tp}")
        self.heads = config.num_attention_heads // tp
        self.groups = groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def kernel_context(self, q: torch.Tensor) -> contextlib.AbstractContextManager:
        """Which SDPA kernels to allow (PyTorch's choice here; the trainer prefers cuDNN's on GPUs)."""
        return contextlib.nullcontext()

    def native_gqa(self, q: torch.Tensor) -> bool:  # noqa: ARG002 - the trainer's subclass decides per input
        """Whether SDPA takes grouped keys/values as they are (``enable_gqa``) instead of repeated per head."""
        return False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError(f"{type(self).__name__}: packed sequences need Transformer Engine's attention")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d] (views: SDPA takes strided inputs with a contiguous last dimension)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        is_causal = causal and sq == sk and attention_mask is None and attention_bias is None
        add_causal = causal and (attention_mask is None or self.causal_with_mask)
        mask = None if is_causal else combine_masks(attention_mask, add_causal, sq, sk, q.device)
        # grouped keys/values as they are only without a mask or bias: with one, SDPA's flash and memory-efficient
        # kernels decline grouped inputs and a cuDNN refusal would leave the unfused math kernel
        gqa = k.shape[1] != q.shape[1] and mask is None and attention_bias is None and self.native_gqa(q)
        if k.shape[1] != q.shape[1] and not gqa:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0.0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with self.kernel_context(q), rng:
            out = biased_attention(q, k, v, attention_bias, mask, self.softmax_scale, dropout, is_causal, gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, q.shape[1] * self.head_dim)  # [b, n, sq, d] -> [sq, b, n·d]
