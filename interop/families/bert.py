"""Megatron-BERT: Transformers ``MegatronBertForPreTraining`` / ``MegatronBertForMaskedLM`` (``megatron-bert``)
<-> Megatron-Core ``BertModel`` (docs/checkpoint-formats.md §2.3, §3.4, §5.3, §10.2).

Encoder-only, pre-LN, learned absolute positions, token-type embeddings, LM head = dense + GELU + LayerNorm +
output bias over the (tied) word embeddings; with the binary head also the pooler (dense + tanh on token 0) and
the next-sentence classifier. GELU (docs/checkpoint-formats.md trap T7): Megatron's LM head always applies erf GELU, its MLP the
activation of the run (tanh with Megatron-LM's default ``bias_gelu_fusion``); Transformers applies one
``hidden_act`` to both, so only erf-GELU models (``hidden_act="gelu"``) match exactly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from interop.errors import ConversionError
from interop.families.base import (
    Column,
    Family,
    FusedQKV,
    ModelConfig,
    Output,
    Plain,
    QKVSeparate,
    Replicated,
    Row,
    TensorRule,
    VocabParallel,
    classic_limits,
    megatron_args_common,
    register,
)
from interop.families.provider import Provider

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_PRETRAINING, _MASKED_LM = "MegatronBertForPreTraining", "MegatronBertForMaskedLM"


class PlainWithZeroTokenTypes(Plain):
    """Position embeddings of a Megatron BERT without a token-type table (Megatron-LM without the binary head):
    the HF model always has one, so a zero ``[2, H]`` table is written beside it (adding zeros changes
    nothing) and ignored on the way back."""

    def __init__(self, hf: str, token_types: str):
        super().__init__(hf)
        self.hf_names = (hf, token_types)

    def to_canonical(self, parts, cfg):
        return parts[0]

    def to_hf(self, tensor, cfg):
        return [tensor, tensor.new_zeros((2, tensor.shape[1]))]


class BertProvider(Provider):
    """Megatron-Core ``BertModel`` (encoder-only, padding mask), local spec ``bert_layer_local_spec``; returns
    masked-LM logits and, with a binary head, the next-sentence logits."""

    model_class = "megatron.core.models.bert.bert_model.BertModel"

    def default_spec(self, cfg):
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec

        return bert_layer_local_spec

    def build(self, cfg, config, **where):
        from megatron.core.models.bert.bert_model import BertModel

        return BertModel(**self.common_kwargs(cfg, config, **where), num_tokentypes=cfg.num_tokentypes,
                         add_binary_head=cfg.add_binary_head)

    def forward(self, model, sample):
        types = sample.get("tokentype_ids")
        has_types = getattr(getattr(model, "embedding", None), "tokentype_embeddings", None) is not None
        return model(sample["tokens"], sample["attention_mask"], tokentype_ids=types if has_types else None)

    def named_outputs(self, output):
        logits, binary = output
        out = {"logits": logits}
        if binary is not None:
            out["binary_logits"] = binary
        return out


def _hh(c: ModelConfig) -> tuple[int, int]:
    return (c.hidden_size, c.hidden_size)


def _h(c: ModelConfig) -> tuple[int]:
    return (c.hidden_size,)


@register
class Bert(Family):
    name = "bert"
    kind = "encoder"
    provider = BertProvider()
    capabilities: frozenset[str] = frozenset({"train"})  # besides convert, reshape, verify
    hf_model_types = ("megatron-bert",)
    hf_architecture = _PRETRAINING
    hf_ignored = ("cls.predictions.decoder.bias", "cls.predictions.decoder.weight")
    megatron_markers = tuple(re.compile(p) for p in (
        r"^lm_head\.dense\.", r"^binary_head\.", r"tokentype_embeddings", r"^(language_model\.)?pooler\."))
    legacy_format = True
    legacy_names = {
        "pooler.dense.weight": ("language_model.pooler.dense.weight",),
        "pooler.dense.bias": ("language_model.pooler.dense.bias",),
        "lm_head.dense.weight": ("lm_head.dense.weight",),
        "lm_head.dense.bias": ("lm_head.dense.bias",),
        "lm_head.layer_norm.weight": ("lm_head.norm.weight", "lm_head.layernorm.weight"),
        "lm_head.layer_norm.bias": ("lm_head.norm.bias", "lm_head.layernorm.bias"),
        "output_layer.bias": ("lm_head.bias",),
        "binary_head.weight": ("binary_head.weight",),
        "binary_head.bias": ("binary_head.bias",),
    }
    dist_head_extra_states = ("output_layer",)
    arch_defaults = dict(activation="gelu", num_tokentypes=2, add_binary_head=True,
                         hf={"model_type": "megatron-bert"})

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        h = "bert.encoder.layer.{i}."
        L = "encoder.layers.{i}."
        pos = "bert.embeddings.position_embeddings.weight"
        types = "bert.embeddings.token_type_embeddings.weight"
        rules = [
            TensorRule("embedding.word_embeddings.weight", Plain("bert.embeddings.word_embeddings.weight"),
                       VocabParallel()),
            TensorRule("embedding.position_embeddings.weight",
                       Plain(pos) if cfg.num_tokentypes else PlainWithZeroTokenTypes(pos, types), Replicated()),
        ]
        if cfg.num_tokentypes:
            rules.append(TensorRule("embedding.tokentype_embeddings.weight", Plain(types), Replicated()))
        for ours, theirs in (("input_layernorm", "attention.ln"), ("pre_mlp_layernorm", "ln")):
            for x in ("weight", "bias"):
                rules.append(TensorRule(f"{L}{ours}.{x}", Plain(f"{h}{theirs}.{x}"), Replicated()))
        for x in ("weight", "bias"):
            rules.append(TensorRule(f"{L}self_attention.linear_qkv.{x}",
                                    QKVSeparate(*(f"{h}attention.self.{p}.{x}" for p in ("query", "key", "value"))),
                                    FusedQKV()))
        rules += [
            TensorRule(L + "self_attention.linear_proj.weight", Plain(h + "attention.output.dense.weight"), Row()),
            TensorRule(L + "self_attention.linear_proj.bias", Plain(h + "attention.output.dense.bias"), Replicated()),
            TensorRule(L + "mlp.linear_fc1.weight", Plain(h + "intermediate.dense.weight"), Column()),
            TensorRule(L + "mlp.linear_fc1.bias", Plain(h + "intermediate.dense.bias"), Column()),
            TensorRule(L + "mlp.linear_fc2.weight", Plain(h + "output.dense.weight"), Row()),
            TensorRule(L + "mlp.linear_fc2.bias", Plain(h + "output.dense.bias"), Replicated()),
            TensorRule("encoder.final_layernorm.weight", Plain("bert.encoder.ln.weight"), Replicated()),
            TensorRule("encoder.final_layernorm.bias", Plain("bert.encoder.ln.bias"), Replicated()),
            TensorRule("lm_head.dense.weight", Plain("cls.predictions.transform.dense.weight"), Replicated(), _hh),
            TensorRule("lm_head.dense.bias", Plain("cls.predictions.transform.dense.bias"), Replicated(), _h),
            TensorRule("lm_head.layer_norm.weight", Plain("cls.predictions.transform.LayerNorm.weight"),
                       Replicated(), _h),
            TensorRule("lm_head.layer_norm.bias", Plain("cls.predictions.transform.LayerNorm.bias"), Replicated(), _h),
            TensorRule("output_layer.bias", Plain("cls.predictions.bias"), VocabParallel()),
        ]
        if not cfg.tie_word_embeddings:
            rules.append(TensorRule("output_layer.weight", Plain("cls.predictions.decoder.weight"), VocabParallel()))
        if cfg.add_binary_head:
            rules += [
                TensorRule("pooler.dense.weight", Plain("bert.pooler.dense.weight"), Replicated(), _hh),
                TensorRule("pooler.dense.bias", Plain("bert.pooler.dense.bias"), Replicated(), _h),
                TensorRule("binary_head.weight", Plain("cls.seq_relationship.weight"), Replicated(),
                           lambda c: (2, c.hidden_size)),
                TensorRule("binary_head.bias", Plain("cls.seq_relationship.bias"), Replicated(), lambda c: (2,)),
            ]
        return rules

    # ---- what --verify compares, inspect names
    def hf_class(self, cfg: ModelConfig) -> str:
        return _PRETRAINING if cfg.add_binary_head else _MASKED_LM

    def outputs(self, cfg: ModelConfig) -> tuple[Output, ...]:
        if cfg.add_binary_head:
            return (Output("logits", "prediction_logits"),
                    Output("binary_logits", "seq_relationship_logits", per_token=False, vocab=False))
        return (Output("logits", "logits"),)

    def heads(self, cfg: ModelConfig) -> tuple[str, ...]:
        return ("lm_head", "pooler", "binary_head") if cfg.add_binary_head else ("lm_head",)

    # ---- config mapping
    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        archs = list(hf.get("architectures") or [_PRETRAINING])
        if archs[0] not in (_PRETRAINING, _MASKED_LM):
            raise ConversionError(f"{archs[0]} is not supported for megatron-bert (use {_PRETRAINING} or "
                                  f"{_MASKED_LM}: Megatron's BertModel always has an LM head)")
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACT:
            raise ConversionError(f"megatron-bert hidden_act {act!r} has no Megatron equivalent")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("megatron-bert with relative position embeddings is not supported")
        if hf.get("is_decoder"):
            raise ConversionError("megatron-bert with is_decoder=true is not an encoder; not supported")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        keep = {k: hf[k] for k in ("pad_token_id",) if hf.get(k) is not None}
        return ModelConfig(
            family=self.name,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=hf.get("intermediate_size") or 4 * hidden,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)),  # learned positions, LayerNorm, biases: defaults
            activation=_HF_ACT[act],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            num_tokentypes=int(hf.get("type_vocab_size", 2)),
            add_binary_head=archs[0] == _PRETRAINING,
            hf={"model_type": "megatron-bert", **keep},
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        why = classic_limits(cfg)
        if why:
            raise ConversionError("megatron-bert cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        return {
            "architectures": [self.hf_class(cfg)],
            "model_type": "megatron-bert",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.ffn_hidden_size,
            # tanh is exact for the MLP only (Megatron's LM head is erf): docs/checkpoint-formats.md §5.3 picks gelu_new for such models
            "hidden_act": "gelu" if cfg.activation == "gelu" else "gelu_new",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.num_tokentypes or 2,
            "layer_norm_eps": cfg.norm_epsilon,  # docs/checkpoint-formats.md trap T9: HF's default is 1e-12
            "position_embedding_type": "absolute",
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "pad_token_id": cfg.hf.get("pad_token_id", 0),
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def megatron_args(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"bert_binary_head": cfg.add_binary_head, "num_tokentypes": cfg.num_tokentypes}

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        common = megatron_args_common(get, vocab_size)
        if names:
            types = 2 if any("tokentype_embeddings" in n for n in names) else 0
            binary = any(n.startswith("binary_head.") for n in names)
        else:
            binary = bool(get("bert_binary_head", True))
            types = 2 if binary else 0
        if get("num_tokentypes") is not None:
            types = int(get("num_tokentypes"))
        return ModelConfig(family=self.name, **{**common, "num_tokentypes": types, "add_binary_head": binary,
                                                "hf": {"model_type": "megatron-bert", **common["hf"]}})
