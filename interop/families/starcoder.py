"""StarCoder / SantaCoder (Transformers ``gpt_bigcode``): GPT-2's architecture with multi-query attention
(one K/V head, ``multi_query=true``) or multi-head attention, ``nn.Linear`` (not Conv1D) weights, learned
positions, LayerNorm with bias, tanh or erf GELU, tied embeddings.

Multi-query attention is Megatron-Core's ``num_query_groups=1``. HF's fused ``c_attn`` needs no reordering in
either mode: multi-query rows are ``[q (all heads); k; v]`` and multi-head rows are per head ``[q, k, v]``
(``view(b, s, heads, 3·d)``), which are exactly Megatron's grouped ``linear_qkv`` layouts for one group and
for one group per head. At TP>1 with one K/V head Megatron-Core splits those rows plainly and all-gathers them,
so every rank computes with the replicated K/V head (:func:`interop.families.base.groups_split_over`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from interop.errors import ConversionError
from interop.families.base import (
    Column,
    Family,
    FusedQKV,
    ModelConfig,
    Plain,
    Replicated,
    Row,
    TensorRule,
    VocabParallel,
    classic_limits,
    register,
)
from interop.families.provider import GPTProvider

_HF_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id")


@register
class StarCoder(Family):
    name = "starcoder"
    hf_model_types = ("gpt_bigcode",)
    hf_architecture = "GPTBigCodeForCausalLM"
    kind = "decoder"
    provider = GPTProvider()
    capabilities = frozenset({"generate", "train"})
    arch_defaults = {"num_query_groups": 1, "hf": {"model_type": "gpt_bigcode"}}
    hf_ignored = ("attn.bias", "attn.masked_bias")

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "transformer.h.{i}."
        L = "decoder.layers.{i}."
        rules = [
            TensorRule("embedding.word_embeddings.weight", Plain("transformer.wte.weight"), VocabParallel()),
            TensorRule("embedding.position_embeddings.weight", Plain("transformer.wpe.weight"), Replicated()),
        ]
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for x in ("weight", "bias"):
                rules.append(TensorRule(f"{L}{ours}.{x}", Plain(f"{h}{theirs}.{x}"), Replicated()))
        for x in ("weight", "bias"):
            rules += [
                TensorRule(f"{L}self_attention.linear_qkv.{x}", Plain(f"{h}attn.c_attn.{x}"), FusedQKV()),
                TensorRule(f"{L}self_attention.linear_proj.{x}", Plain(f"{h}attn.c_proj.{x}"),
                           Row() if x == "weight" else Replicated()),
                TensorRule(f"{L}mlp.linear_fc1.{x}", Plain(f"{h}mlp.c_fc.{x}"), Column()),
                TensorRule(f"{L}mlp.linear_fc2.{x}", Plain(f"{h}mlp.c_proj.{x}"),
                           Row() if x == "weight" else Replicated()),
                TensorRule(f"decoder.final_layernorm.{x}", Plain(f"transformer.ln_f.{x}"), Replicated()),
            ]
        if not cfg.tie_word_embeddings:
            rules.append(TensorRule("output_layer.weight", Plain("lm_head.weight"), VocabParallel()))
        return rules

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        act = hf.get("activation_function", "gelu_pytorch_tanh")
        if act not in _HF_ACT:
            raise ConversionError(f"gpt_bigcode activation_function {act!r} has no Megatron equivalent")
        if hf.get("scale_attn_weights") is False:
            raise ConversionError("gpt_bigcode with scale_attn_weights=false has no Megatron equivalent")
        hidden, heads = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            family=self.name,
            num_layers=hf["n_layer"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=1 if hf.get("multi_query", True) else heads,
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["n_positions"],
            position_embedding_type="learned_absolute",
            normalization="LayerNorm",
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            add_bias_linear=True,
            add_qkv_bias=True,
            activation=_HF_ACT[act],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hf={"model_type": "gpt_bigcode", **{k: hf[k] for k in _HF_KEEP if hf.get(k) is not None}},
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        why = [w for w in classic_limits(cfg) if w != "grouped-query attention"]
        if cfg.num_query_groups not in (1, cfg.num_attention_heads):
            why.append(f"{cfg.num_query_groups} query groups (only multi-query or multi-head)")
        if why:
            raise ConversionError("gpt_bigcode cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        out = {
            "architectures": [self.hf_architecture],
            "model_type": "gpt_bigcode",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_position_embeddings,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads,
            "n_inner": cfg.ffn_hidden_size,
            "multi_query": cfg.num_query_groups == 1,
            "activation_function": "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_epsilon,
            "scale_attn_weights": True,
            "attention_softmax_in_fp32": True,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        out.update({k: v for k, v in cfg.hf.items() if k in _HF_KEEP})
        return out

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        cfg = super().config_from_megatron_args(get, vocab_size, names)
        return cfg.replace(hf={"model_type": "gpt_bigcode", **cfg.hf})
