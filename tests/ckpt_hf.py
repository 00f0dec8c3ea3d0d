"""Tiny Hugging Face models saved by Transformers itself, for the checkpoint tests (no hub access)."""
from __future__ import annotations

import torch


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=32,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def stored_state(model) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes: the state dict minus tied duplicates (T18)."""
    sd = model.state_dict()
    seen, out = {}, {}
    for k, v in sd.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v.detach().clone()
    return out
