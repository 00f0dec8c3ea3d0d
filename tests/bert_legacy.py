"""A legacy (pre-Megatron-Core) Megatron-BERT checkpoint written by hand from an HF ``MegatronBertForPreTraining``
(docs/checkpoint-formats.md §2.1, §2.3): nested ``language_model.{embedding,encoder,pooler}``, ``lm_head``, ``binary_head``; per-TP
shards with QKV in the per-head ``[q; k; v]`` order of checkpoint_version 3.0, vocab rows padded to 128·TP by
repeating the last row; the 2021–2023 names (``input_layernorm``, ``post_attention_layernorm``,
``final_layernorm``, ``lm_head.layernorm``). Independent of interop's writers."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def write_legacy_bert(root: Path, model, tp: int) -> None:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = model.config
    h, nh = c.hidden_size, c.num_attention_heads
    d = h // nh
    padded = -(-c.vocab_size // (128 * tp)) * 128 * tp
    args = argparse.Namespace(
        num_layers=c.num_hidden_layers, hidden_size=h, num_attention_heads=nh, ffn_hidden_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, padded_vocab_size=padded, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, layernorm_epsilon=c.layer_norm_eps, bias_gelu_fusion=False,
        bert_binary_head=True, use_legacy_models=True, make_vocab_size_divisible_by=128,
    )
    it = root / "iter_0000009"
    for t in range(tp):
        def col(x):
            return x.chunk(tp, 0)[t]

        def row(x):
            return x.chunk(tp, 1)[t]

        enc = {}
        for i in range(c.num_hidden_layers):
            p = f"bert.encoder.layer.{i}."
            q, k, v = (sd[f"{p}attention.self.{n}.weight"] for n in ("query", "key", "value"))
            qb, kb, vb = (sd[f"{p}attention.self.{n}.bias"] for n in ("query", "key", "value"))
            qkv = torch.stack([q.view(nh, d, h), k.view(nh, d, h), v.view(nh, d, h)], 1).reshape(3 * h, h)
            qkv_b = torch.stack([qb.view(nh, d), kb.view(nh, d), vb.view(nh, d)], 1).reshape(3 * h)
            L = f"layers.{i}."
            enc.update({
                L + "input_layernorm.weight": sd[p + "attention.ln.weight"],
                L + "input_layernorm.bias": sd[p + "attention.ln.bias"],
                L + "self_attention.query_key_value.weight": col(qkv),
                L + "self_attention.query_key_value.bias": col(qkv_b),
                L + "self_attention.dense.weight": row(sd[p + "attention.output.dense.weight"]),
                L + "self_attention.dense.bias": sd[p + "attention.output.dense.bias"],
                L + "post_attention_layernorm.weight": sd[p + "ln.weight"],
                L + "post_attention_layernorm.bias": sd[p + "ln.bias"],
                L + "mlp.dense_h_to_4h.weight": col(sd[p + "intermediate.dense.weight"]),
                L + "mlp.dense_h_to_4h.bias": col(sd[p + "intermediate.dense.bias"]),
                L + "mlp.dense_4h_to_h.weight": row(sd[p + "output.dense.weight"]),
                L + "mlp.dense_4h_to_h.bias": sd[p + "output.dense.bias"],
            })
        enc["final_layernorm.weight"] = sd["bert.encoder.ln.weight"]
        enc["final_layernorm.bias"] = sd["bert.encoder.ln.bias"]
        lm = {
            "embedding": {
                "word_embeddings": {"weight": col(_pad(sd["bert.embeddings.word_embeddings.weight"], padded))},
                "position_embeddings": {"weight": sd["bert.embeddings.position_embeddings.weight"]},
                "tokentype_embeddings": {"weight": sd["bert.embeddings.token_type_embeddings.weight"]},
            },
            "encoder": enc,
            "pooler": {"dense.weight": sd["bert.pooler.dense.weight"], "dense.bias": sd["bert.pooler.dense.bias"]},
        }
        lm_head = {
            "bias": col(_pad(sd["cls.predictions.bias"], padded)),
            "dense.weight": sd["cls.predictions.transform.dense.weight"],
            "dense.bias": sd["cls.predictions.transform.dense.bias"],
            "layernorm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
            "layernorm.bias": sd["cls.predictions.transform.LayerNorm.bias"],
        }
        binary = {"weight": sd["cls.seq_relationship.weight"], "bias": sd["cls.seq_relationship.bias"]}
        rank = it / f"mp_rank_{t:02d}"
        rank.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 9,
                    "model": {"language_model": lm, "lm_head": lm_head, "binary_head": binary}},
                   rank / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("9")
