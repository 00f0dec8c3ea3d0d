"""GPT-2: learned absolute positions, LayerNorm with bias, tanh GELU, Conv1D (transposed) linears, MHA,
tied embeddings (docs/checkpoint-formats.md §5.1)."""
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
    QKVPacked,
    Replicated,
    Row,
    TensorRule,
    VocabParallel,
    classic_limits,
    linear_with_bias,
    register,
)
from interop.families.provider import GPTProvider

_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id")


def gpt2_embedding_rules() -> list[TensorRule]:
    """GPT-2-style word and learned position embeddings (``transformer.wte`` / ``transformer.wpe``)."""
    return [
        TensorRule("embedding.word_embeddings.weight", Plain("transformer.wte.weight"), VocabParallel()),
        TensorRule("embedding.position_embeddings.weight", Plain("transformer.wpe.weight"), Replicated()),
    ]


def gpt2_head_rules(cfg: ModelConfig) -> list[TensorRule]:
    """GPT-2-style tail: the final LayerNorm (``transformer.ln_f``) and, when untied, ``lm_head``."""
    rules = linear_with_bias("decoder.final_layernorm", "transformer.ln_f", "norm")
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("output_layer.weight", Plain("lm_head.weight"), VocabParallel()))
    return rules


@register
class GPT2(Family):
    name = "gpt2"
    hf_model_types = ("gpt2",)
    hf_architecture = "GPT2LMHeadModel"
    kind = "decoder"
    provider = GPTProvider()
    capabilities = frozenset({"generate", "train"})
    legacy_format = True
    arch_defaults = {"hf": {"model_type": "gpt2"}}
    hf_ignored = ("attn.bias", "attn.masked_bias")

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "transformer.h.{i}."
        L = "decoder.layers.{i}."
        rules = gpt2_embedding_rules()
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for x in ("weight", "bias"):
                rules.append(TensorRule(f"{L}{ours}.{x}", Plain(f"{h}{theirs}.{x}"), Replicated()))
        rules += [
            TensorRule(L + "self_attention.linear_qkv.weight", QKVPacked(h + "attn.c_attn.weight", True), FusedQKV()),
            TensorRule(L + "self_attention.linear_qkv.bias", QKVPacked(h + "attn.c_attn.bias", False), FusedQKV()),
            TensorRule(L + "self_attention.linear_proj.weight", Plain(h + "attn.c_proj.weight", True), Row()),
            TensorRule(L + "self_attention.linear_proj.bias", Plain(h + "attn.c_proj.bias"), Replicated()),
            TensorRule(L + "mlp.linear_fc1.weight", Plain(h + "mlp.c_fc.weight", True), Column()),
            TensorRule(L + "mlp.linear_fc1.bias", Plain(h + "mlp.c_fc.bias"), Column()),
            TensorRule(L + "mlp.linear_fc2.weight", Plain(h + "mlp.c_proj.weight", True), Row()),
            TensorRule(L + "mlp.linear_fc2.bias", Plain(h + "mlp.c_proj.bias"), Replicated()),
        ]
        return rules + gpt2_head_rules(cfg)

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in _HF_ACT:
            raise ConversionError(f"GPT-2 activation_function {act!r} has no Megatron equivalent")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ConversionError("GPT-2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        if hf.get("scale_attn_weights") is False:
            raise ConversionError("GPT-2 with scale_attn_weights=false has no Megatron equivalent")
        hidden = hf["n_embd"]
        return ModelConfig(
            family=self.name,
            num_layers=hf["n_layer"],
            hidden_size=hidden,
            num_attention_heads=hf["n_head"],
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
            hf={"model_type": "gpt2", **{k: hf[k] for k in _HF_KEEP if hf.get(k) is not None}},
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        why = classic_limits(cfg)
        if why:
            raise ConversionError("GPT-2 cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        out = {
            "architectures": [self.hf_architecture],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_position_embeddings,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads,
            "n_inner": cfg.ffn_hidden_size,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_epsilon,
            "scale_attn_weights": True,
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
        return cfg.replace(hf={"model_type": "gpt2", **cfg.hf})
