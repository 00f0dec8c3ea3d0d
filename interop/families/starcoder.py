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
    ModelConfig,
    TensorRule,
    classic_limits,
    linear_with_bias,
    register,
)
from interop.families.gpt2 import GPT2, gpt2_embedding_rules, gpt2_head_rules


@register
class StarCoder(GPT2):
    """GPT-2's config mapping (same ``n_*`` keys, activations and tied head) with ``multi_query`` and
    ``nn.Linear`` rules; not writable in the legacy layout (which predates grouped-query attention)."""

    name = "starcoder"
    hf_model_types = ("gpt_bigcode",)
    hf_architecture = "GPTBigCodeForCausalLM"
    legacy_format = False
    arch_defaults = {"num_query_groups": 1, "hf": {"model_type": "gpt_bigcode"}}

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "transformer.h.{i}."
        L = "decoder.layers.{i}."
        rules = gpt2_embedding_rules()
        for ours, theirs, split in (("input_layernorm", "ln_1", "norm"),
                                    ("self_attention.linear_qkv", "attn.c_attn", "qkv"),
                                    ("self_attention.linear_proj", "attn.c_proj", "row"),
                                    ("pre_mlp_layernorm", "ln_2", "norm"), ("mlp.linear_fc1", "mlp.c_fc", "column"),
                                    ("mlp.linear_fc2", "mlp.c_proj", "row")):
            rules += linear_with_bias(L + ours, h + theirs, split)
        return rules + gpt2_head_rules(cfg)

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        cfg = super().config_from_hf(hf)
        groups = 1 if hf.get("multi_query", True) else cfg.num_attention_heads
        return cfg.replace(num_query_groups=groups, hf={**cfg.hf, "model_type": "gpt_bigcode"})

    def check_representable(self, cfg: ModelConfig) -> None:
        why = [w for w in classic_limits(cfg) if w != "grouped-query attention"]
        if cfg.num_query_groups not in (1, cfg.num_attention_heads):
            why.append(f"{cfg.num_query_groups} query groups (only multi-query or multi-head)")
        if why:
            raise ConversionError("gpt_bigcode cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        out = super().hf_config(cfg, dtype)
        out.update(architectures=[self.hf_architecture], model_type="gpt_bigcode",
                   multi_query=cfg.num_query_groups == 1, attention_softmax_in_fp32=True,
                   activation_function="gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "gelu")
        return out

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        cfg = super().config_from_megatron_args(get, vocab_size, names)
        return cfg.replace(hf={**cfg.hf, "model_type": "gpt_bigcode"})
