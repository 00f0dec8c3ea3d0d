"""Run a Megatron-Core ``T5Model`` the way Transformers runs a T5: HF-style 0/1 masks in, full-vocab logits out."""
from __future__ import annotations

import torch

from interop.t5.config import T5Config


def megatron_masks(attention_mask: torch.Tensor, decoder_attention_mask: torch.Tensor | None = None):
    """HF masks (1 = real token, ``[b, s]``) -> T5Model's boolean masks (True = masked out):
    encoder self-attention and encoder-decoder ``[b, 1, 1, s_enc]`` (key padding), decoder self-attention
    ``[b, 1, 1, s_dec]`` key padding or None (the causal triangle comes from the layer's mask type)."""
    enc = (attention_mask == 0)[:, None, None, :]
    dec = None if decoder_attention_mask is None else (decoder_attention_mask == 0)[:, None, None, :]
    return enc, dec, enc


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocabulary-parallel logits ``[..., Vp/TP]`` -> the true vocabulary ``[..., V]`` in fp32 on every TP rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()


def t5_logits(model, cfg: T5Config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[b, s_dec, V]`` fp32 logits of the whole encoder-decoder (Megatron-Core's own ``T5Model.forward``)."""
    enc, dec, cross = megatron_masks(attention_mask, decoder_attention_mask)
    with torch.no_grad():
        logits = model(input_ids, decoder_input_ids, enc, dec, cross)  # [b, s, Vp/TP] (parallel output)
    return gather_vocab(logits, cfg.vocab_size)
