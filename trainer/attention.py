"""Core attention for the trainer's layer spec: :class:`interop.attention.SDPACoreAttention` (Megatron-Core's
``DotProductAttention`` interface over PyTorch's ``scaled_dot_product_attention``) with cuDNN's kernel first on a
GPU (:func:`trainer.kernels.sdpa_backends`).

Why: without Transformer Engine, Megatron-Core's local spec computes attention unfused — a ``[b·heads, s, s]``
score tensor per layer (``baddbmm``), a softmax and a dropout over it, all kept for the backward pass. At
sequence 2048 that is most of a step's memory traffic and activation memory. SDPA never materialises the scores;
the maths (scaling, masks, fp32 softmax, dropout from Megatron's RNG tracker) is described in
:mod:`interop.attention`. Runs with attention dropout are statistically, not bitwise, equal to the local spec.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import sdpa_kernel

from interop.attention import SDPACoreAttention
from trainer.kernels import native_gqa, sdpa_backends


class SDPAttention(SDPACoreAttention):
    """Drop-in for ``DotProductAttention`` (same constructor and ``forward``); only the kernel choice is the
    trainer's, and a given mask is used as it is (as ``DotProductAttention`` does)."""

    causal_with_mask = False

    def kernel_context(self, q: torch.Tensor) -> contextlib.AbstractContextManager:
        backends = sdpa_backends(q)  # cuDNN's attention first on a GPU in 16 bit (trainer/kernels)
        return sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext()

    def native_gqa(self, q: torch.Tensor) -> bool:
        return native_gqa(q)  # grouped keys/values straight into SDPA on a GPU in 16 bit (trainer/kernels)
