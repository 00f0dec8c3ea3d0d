"""T5's core attention: the project's SDPA core (:mod:`interop.attention`), which takes the relative-position bias.

Megatron-Core's local ``DotProductAttention`` asserts on ``attention_bias``, so without Transformer Engine a
``T5Model`` with ``position_embedding_type='relative'`` cannot run at all; :class:`BiasedSDPAttention` can.

Scaling: scores are multiplied by ``softmax_scale`` as in every Megatron attention. Transformers' T5 does not scale
its scores; the tensor map folds that into the query weights instead (HF ``q`` times ``sqrt(d_kv)``; exact for
``d_kv = 64``, a power of four). So checkpoints keep Megatron's meaning and load into a Transformer-Engine-built
``T5Model`` unchanged.
"""
from __future__ import annotations

from interop.attention import SDPACoreAttention, biased_attention, combine_masks

BiasedSDPAttention = SDPACoreAttention

__all__ = ["BiasedSDPAttention", "biased_attention", "combine_masks"]
