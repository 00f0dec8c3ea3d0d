"""BLOOM (Transformers ``BloomForCausalLM``): ALiBi instead of position embeddings, a LayerNorm right after the
word embedding, per-head fused QKV, tanh GELU, biases everywhere, tied embeddings, FFN = 4 × hidden.

Megatron side: Megatron-Core's ``GPTModel`` with no position embedding, the ALiBi core attention of
:mod:`interop.alibi` in the local layer spec, and the word-embedding LayerNorm as
``embedding.word_embeddings_layernorm`` (the embedding module gains it; Megatron-Core has none). BLOOM's fused
``query_key_value`` rows are per head ``[q, k, v]`` (``view(b, s, heads, 3, d)``), which is exactly Megatron's
grouped ``linear_qkv`` layout with one group per head, so they need no reordering.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from interop.errors import ConversionError
from interop.families.base import (
    Family,
    ModelConfig,
    Plain,
    Replicated,
    TensorRule,
    VocabParallel,
    linear_with_bias,
    register,
)
from interop.families.gpt2 import gpt2_head_rules
from interop.families.provider import GPTProvider

_HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id")
#: BLOOM has no position limit (ALiBi extrapolates); Megatron needs a sequence length: BLOOM's training one
_DEFAULT_SEQ = 2048
_EMBED_NORM = "embedding.word_embeddings_layernorm."


def _with_embedding_norm(embedding, config):
    """Give a Megatron-Core ``LanguageModelEmbedding`` BLOOM's LayerNorm (``word_embeddings_layernorm``)."""
    norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
    for p in norm.parameters():  # replicated over TP: Megatron all-reduces its grads under sequence parallel
        setattr(p, "sequence_parallel", config.sequence_parallel)
    embedding.word_embeddings_layernorm = norm
    embedding.__class__ = _normed_class(type(embedding))
    return embedding


@functools.cache
def _normed_class(base: type) -> type:
    """``base`` (``LanguageModelEmbedding``) whose output goes through the LayerNorm before the embedding
    dropout (Transformers has no dropout there; with dropout off the two agree exactly)."""

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        dropout, self.embedding_dropout = self.embedding_dropout, torch.nn.Identity()
        try:
            out = base.forward(self, input_ids, position_ids, tokentype_ids)
        finally:
            self.embedding_dropout = dropout
        out = self.word_embeddings_layernorm(out)
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return dropout(out)
        return dropout(out)

    return type(f"Normed{base.__name__}", (base,), {"forward": forward, "__doc__": _normed_class.__doc__})


class AlibiGPTProvider(GPTProvider):
    """``GPTModel`` without position embeddings, ALiBi core attention, and the word-embedding LayerNorm."""

    def default_spec(self, cfg):
        from interop.alibi import alibi_layer_spec

        return alibi_layer_spec(cfg.normalization)

    def core_attention(self):
        from interop.alibi import AlibiSDPAttention

        return AlibiSDPAttention

    def build(self, cfg, config, **where):
        from megatron.core.models.gpt import GPTModel

        kwargs = self.common_kwargs(cfg, config, **where)
        kwargs["position_embedding_type"] = "none"
        model = GPTModel(**kwargs)
        if model.pre_process:
            _with_embedding_norm(model.embedding, config)
        return model


@register
class Bloom(Family):
    name = "bloom"
    hf_model_types = ("bloom",)
    hf_architecture = "BloomForCausalLM"
    kind = "decoder"
    provider = AlibiGPTProvider()
    capabilities = frozenset({"generate", "train"})
    arch_defaults = {"position_embedding_type": "alibi", "max_position_embeddings": _DEFAULT_SEQ,
                     "hf": {"model_type": "bloom"}}

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "transformer.h.{i}."
        L = "decoder.layers.{i}."
        vec = lambda c: (c.hidden_size,)  # noqa: E731
        rules = [
            TensorRule("embedding.word_embeddings.weight", Plain("transformer.word_embeddings.weight"),
                       VocabParallel()),
        ]
        for x in ("weight", "bias"):
            rules.append(TensorRule(_EMBED_NORM + x, Plain(f"transformer.word_embeddings_layernorm.{x}"),
                                    Replicated(), vec))
        for ours, theirs, split in (("input_layernorm", "input_layernorm", "norm"),
                                    ("self_attention.linear_qkv", "self_attention.query_key_value", "qkv"),
                                    ("self_attention.linear_proj", "self_attention.dense", "row"),
                                    ("pre_mlp_layernorm", "post_attention_layernorm", "norm"),
                                    ("mlp.linear_fc1", "mlp.dense_h_to_4h", "column"),
                                    ("mlp.linear_fc2", "mlp.dense_4h_to_h", "row")):
            rules += linear_with_bias(L + ours, h + theirs, split)
        return rules + gpt2_head_rules(cfg)

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ConversionError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
        hidden = hf.get("hidden_size") or hf["n_embed"]
        heads = hf["n_head"]
        return ModelConfig(
            family=self.name,
            num_layers=hf["n_layer"],
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=4 * hidden,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=int(hf.get("seq_length") or _DEFAULT_SEQ),
            position_embedding_type="alibi",
            normalization="LayerNorm",
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            add_bias_linear=True,
            add_qkv_bias=True,
            activation="gelu_tanh",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hf={"model_type": "bloom", **{k: hf[k] for k in _HF_KEEP if hf.get(k) is not None}},
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        checks = [
            (cfg.position_embedding_type != "alibi", f"{cfg.position_embedding_type} positions"),
            (cfg.num_query_groups != cfg.num_attention_heads, "grouped-query attention"),
            (cfg.normalization != "LayerNorm", cfg.normalization),
            (not cfg.add_bias_linear, "linear layers without bias"),
            (cfg.gated_linear_unit or cfg.activation != "gelu_tanh", "an MLP other than tanh GELU"),
            (cfg.ffn_hidden_size != 4 * cfg.hidden_size, f"FFN size {cfg.ffn_hidden_size} != 4 x hidden"),
            (cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size, "kv_channels != hidden/heads"),
        ]
        why = [w for bad, w in checks if bad]
        if why:
            raise ConversionError("BLOOM cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        out = {
            "architectures": [self.hf_architecture],
            "model_type": "bloom",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads,
            "layer_norm_epsilon": cfg.norm_epsilon,
            "apply_residual_connection_post_layernorm": False,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "slow_but_exact": False,
            "seq_length": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        out.update({k: v for k, v in cfg.hf.items() if k in _HF_KEEP})
        return out

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        cfg = super().config_from_megatron_args(get, vocab_size, names)
        return cfg.replace(hf={"model_type": "bloom", **cfg.hf})
