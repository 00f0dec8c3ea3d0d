"""ALiBi (Press et al., "Train Short, Test Long") for Megatron-Core's GPT layer spec, without Transformer Engine.

Megatron-Core has no ALiBi. BLOOM (and the Megatron-LM fork our users came from, ``position_embedding_type:
alibi``) adds ``slope_h · (j − i)`` to the attention score of query ``i`` and key ``j`` in head ``h``; there are no
position embeddings. :class:`AlibiSDPAttention` is the bias-taking core of :mod:`interop.attention` (same
constructor and ``forward`` as Megatron-Core's ``DotProductAttention``) with that bias built per call from this
rank's slopes: heads are split over TP in contiguous blocks, so rank ``r`` owns slopes ``[r·h/tp, (r+1)·h/tp)``.

The bias is ``[1, heads on this rank, sq, sk]`` (broadcast over the batch by SDPA, never ``[b, h, s, s]``) and goes
to SDPA as a float ``attn_mask`` with the causal triangle folded in. It uses relative distances ``j − i`` (0 on the
diagonal); Transformers' BLOOM adds ``slope·j``, which differs by a per-row constant that softmax cancels — the
relative form stays small at long sequences, so bf16 keeps its precision.
"""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from interop.attention import SDPACoreAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (fp32) for any head count: for a power of two ``n``, ``2^(-8k/n)``, k = 1..n;
    otherwise those of the nearest lower power of two followed by every other slope of the next power of two
    (the reference implementation's rule, and Transformers' ``_get_alibi_slopes``)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    # fp32 powers of an fp32 base, as Transformers computes them (a float64 power rounds differently)
    slopes = torch.pow(torch.tensor(2.0 ** (-8.0 / closest)), torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2.0 ** (-4.0 / closest))  # the base of 2·closest heads
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 2 * (num_heads - closest), 2,
                                                                  dtype=torch.int32))])
    return slopes


def rank_slopes(num_heads: int, tp: int, rank: int) -> torch.Tensor:
    """The slopes of TP rank ``rank``'s heads (Megatron-Core gives each rank a contiguous block of heads)."""
    per = num_heads // tp
    return alibi_slopes(num_heads)[rank * per:(rank + 1) * per]


def alibi_bias(slopes: torch.Tensor, sq: int, sk: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[1, heads, sq, sk]`` additive bias ``slope · (j − i)`` with queries aligned to the last ``sq`` keys (a
    decode step's query ``i`` sits at position ``sk − sq + i``)."""
    keys = torch.arange(sk, device=device, dtype=torch.float32)
    queries = torch.arange(sk - sq, sk, device=device, dtype=torch.float32)
    distance = keys[None, :] - queries[:, None]
    return (slopes.to(device)[:, None, None] * distance).unsqueeze(0).to(dtype)


class AlibiSDPAttention(SDPACoreAttention):
    """``DotProductAttention`` drop-in adding this rank's ALiBi bias (plus any ``attention_bias`` passed in)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection)
        tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        tp = tp_group.size() if tp_group is not None else parallel_state.get_tensor_model_parallel_world_size()
        rank = tp_group.rank() if tp_group is not None else parallel_state.get_tensor_model_parallel_rank()
        self.slopes = rank_slopes(config.num_attention_heads, tp, rank)  # not a parameter: never checkpointed

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        bias = alibi_bias(self.slopes, query.shape[0], key.shape[0], query.dtype, query.device)
        if attention_bias is not None:
            bias = bias + attention_bias
        return super().forward(query, key, value, attention_mask, attn_mask_type, bias, packed_seq_params)


def alibi_layer_spec(normalization: str = "LayerNorm"):
    """Megatron-Core's local GPT layer spec with :class:`AlibiSDPAttention` as the core attention."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = AlibiSDPAttention
    return spec
