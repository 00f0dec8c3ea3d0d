"""Tiny Megatron-BERT models for the BERT tests: Transformers' own ``MegatronBert*`` with perturbed norms and
biases (so a wrong GELU variant or a dropped bias shows), a fixed batch with token types and padding, and
the producer's outputs on it."""
from __future__ import annotations

import torch

VOCAB = 100  # not a multiple of 128: vocab padding is exercised at every TP


def tiny_bert(binary_head: bool = True, seed: int = 0, layers: int = 4, act: str = "gelu", tie: bool = True):
    import transformers

    torch.manual_seed(seed)
    conf = transformers.MegatronBertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, type_vocab_size=2, hidden_act=act, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1, tie_word_embeddings=tie,
    )
    cls = transformers.MegatronBertForPreTraining if binary_head else transformers.MegatronBertForMaskedLM
    model = cls(conf)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        # large pre-activation biases move the MLP into the region where erf and tanh GELU differ most
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.bias.add_(1.5)
    return model.eval()


def batch(n: int = 2, seq: int = 12, seed: int = 5) -> dict[str, torch.Tensor]:
    """tokens, token types (two segments) and a padding mask (sample 1 ends in 4 pad tokens)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, seq), generator=gen)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1:, seq - 4:] = 0
    types = (torch.arange(seq) >= seq // 2).long().expand(n, seq).contiguous()
    return {"tokens": tokens, "attention_mask": mask, "tokentype_ids": types}


def hf_outputs(model, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers' own outputs, named like :func:`interop.megatron_model.forward_outputs`'."""
    with torch.no_grad():
        out = model(b["tokens"], attention_mask=b["attention_mask"], token_type_ids=b["tokentype_ids"])
    if hasattr(out, "seq_relationship_logits"):
        return {"logits": out.prediction_logits.float(), "binary_logits": out.seq_relationship_logits.float()}
    return {"logits": out.logits.float()}


def assert_outputs_close(got: dict, expected: dict, mask: torch.Tensor, atol: float = 1e-5, msg: str = "") -> None:
    """Per-token outputs compared at real positions (Megatron's padded query rows attend uniformly, HF's do
    not: both are garbage there by design), the binary logits everywhere."""
    assert set(got) == set(expected), (msg, set(got), set(expected))
    keep = mask.bool()
    torch.testing.assert_close(got["logits"][keep], expected["logits"][keep], atol=atol, rtol=0, msg=msg)
    if "binary_logits" in expected:
        torch.testing.assert_close(got["binary_logits"], expected["binary_logits"], atol=atol, rtol=0, msg=msg)
