"""Llama family: Llama 2/3, Mistral, Qwen2 — RoPE (rotate-half), RMSNorm, SwiGLU, GQA/MQA, tied or untied,
optional QKV bias (Qwen2) (docs/checkpoint-formats.md §5.2)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from interop.errors import ConversionError
from interop.families.base import (
    Family,
    FusedQKV,
    GatedFc1,
    GatedPair,
    ModelConfig,
    Plain,
    QKVSeparate,
    Replicated,
    Row,
    TensorRule,
    VocabParallel,
    register,
)
from interop.families.provider import GPTProvider

_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "use_sliding_window", "max_window_layers")
# Megatron-Core hard-codes these Llama-3 scaling constants (rotary_pos_embedding._apply_scaling)
_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@register
class Llama(Family):
    name = "llama"
    hf_model_types = tuple(_ARCH)
    hf_architecture = "LlamaForCausalLM"
    kind = "decoder"
    provider = GPTProvider()
    capabilities = frozenset({"generate", "train"})
    arch_defaults = dict(position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False,
                         add_qkv_bias=False, gated_linear_unit=True, activation="silu", hf={"model_type": "llama"})
    hf_ignored = ("rotary_emb.inv_freq",)

    def default_ffn_hidden_size(self, hidden_size: int) -> int:
        return (int(8 * hidden_size / 3) + 63) // 64 * 64

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "model.layers.{i}."
        L = "decoder.layers.{i}."
        rules = [
            TensorRule("embedding.word_embeddings.weight", Plain("model.embed_tokens.weight"), VocabParallel()),
            TensorRule(L + "input_layernorm.weight", Plain(h + "input_layernorm.weight"), Replicated()),
            TensorRule(
                L + "self_attention.linear_qkv.weight",
                QKVSeparate(*(f"{h}self_attn.{p}_proj.weight" for p in "qkv")),
                FusedQKV(),
            ),
        ]
        if cfg.add_qkv_bias:
            rules.append(TensorRule(
                L + "self_attention.linear_qkv.bias",
                QKVSeparate(*(f"{h}self_attn.{p}_proj.bias" for p in "qkv")),
                FusedQKV(),
            ))
        rules += [
            TensorRule(L + "self_attention.linear_proj.weight", Plain(h + "self_attn.o_proj.weight"), Row()),
            TensorRule(L + "pre_mlp_layernorm.weight", Plain(h + "post_attention_layernorm.weight"), Replicated()),
            TensorRule(
                L + "mlp.linear_fc1.weight",
                GatedPair(h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                GatedFc1(),
            ),
            TensorRule(L + "mlp.linear_fc2.weight", Plain(h + "mlp.down_proj.weight"), Row()),
            TensorRule("decoder.final_layernorm.weight", Plain("model.norm.weight"), Replicated()),
        ]
        if not cfg.tie_word_embeddings:
            rules.append(TensorRule("output_layer.weight", Plain("lm_head.weight"), VocabParallel()))
        return rules

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{model_type} hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
        if model_type in ("llama", "mistral") and hf.get("attention_bias"):
            raise ConversionError(f"{model_type} with attention_bias=true (q/k/v/o biases) is not supported")
        if hf.get("mlp_bias"):
            raise ConversionError(f"{model_type} with mlp_bias=true is not supported")
        if model_type == "mistral" and hf.get("sliding_window") not in (None, 0) and \
                hf.get("sliding_window") < hf.get("max_position_embeddings", 0):
            raise ConversionError("Mistral with a sliding window shorter than the context is not supported")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConversionError("Qwen2 with use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        factor = None
        if rope_type == "llama3":
            if any(float(rope.get(k, v)) != float(v) for k, v in _LLAMA3.items()):
                raise ConversionError(f"llama3 rope scaling {rope} differs from Megatron-Core's fixed constants")
            factor = float(rope.get("factor", 8.0))
        elif rope_type not in ("default", None):
            raise ConversionError(f"rope type {rope_type!r} is not supported")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        qkv_bias = bool(hf.get("attention_bias", False)) or model_type == "qwen2"
        keep = {k: hf[k] for k in _HF_KEEP if k in hf}
        return ModelConfig(
            family=self.name,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hidden // heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            position_embedding_type="rope",
            normalization="RMSNorm",
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            add_bias_linear=False,
            add_qkv_bias=qkv_bias,
            gated_linear_unit=True,
            activation="silu",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rotary_base=float(theta),
            rope_scaling_factor=factor,
            hf={"model_type": model_type, **keep},
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        why = []
        if cfg.position_embedding_type != "rope":
            why.append(f"{cfg.position_embedding_type} positions")
        if cfg.normalization != "RMSNorm":
            why.append(cfg.normalization)
        if cfg.add_bias_linear:
            why.append("linear biases")
        if not cfg.gated_linear_unit or cfg.activation != "silu":
            why.append("a non-SwiGLU MLP")
        if why:
            raise ConversionError("the Llama family cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        model_type = cfg.hf.get("model_type", "qwen2" if cfg.add_qkv_bias else "llama")
        out: dict[str, Any] = {
            "architectures": [_ARCH[model_type]],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups,
            "head_dim": cfg.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.norm_epsilon,
            "rope_theta": cfg.rotary_base,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if cfg.rope_scaling_factor is not None:
            out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **_LLAMA3}
        if model_type == "llama":
            if cfg.add_qkv_bias:
                raise ConversionError("Llama cannot express a QKV bias without an output bias; use Qwen2")
            out.update(attention_bias=False, mlp_bias=False)
        elif model_type == "qwen2":
            if not cfg.add_qkv_bias:
                raise ConversionError("Qwen2 always has a QKV bias; this model has none")
            out.update(use_sliding_window=False, sliding_window=None)
        elif model_type == "mistral":
            if cfg.add_qkv_bias:
                raise ConversionError("Mistral cannot express a QKV bias")
            out["sliding_window"] = None  # docs/checkpoint-formats.md trap T20: HF's default 4096 would change the model
        out.update({k: v for k, v in cfg.hf.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        return out

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        cfg = super().config_from_megatron_args(get, vocab_size, names)
        if "model_type" not in cfg.hf:
            cfg = cfg.replace(hf={"model_type": "qwen2" if cfg.add_qkv_bias else "llama", **cfg.hf})
        return cfg
