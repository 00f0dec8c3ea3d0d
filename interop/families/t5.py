"""T5: Transformers ``T5ForConditionalGeneration`` (v1.0, v1.1, Flan-T5) and ``MT5ForConditionalGeneration``
<-> Megatron-Core ``T5Model`` (docs/checkpoint-formats.md §2.4, §3.5, §5.4, §10.3).

Encoder-decoder with two stacks (``encoder.layers.*``, ``decoder.layers.*``, possibly of different depths),
relative position bias tables per stack, RMSNorm without biases, ReLU or gated tanh-GELU MLPs. The tensor map,
its folds (query scaling, v1.0's decoder-output scaling, the zero output bias) and the TP split rules are
:mod:`interop.t5.tensor_map`'s, and the Megatron-Core model is built with :mod:`interop.t5.spec` (HF-exact
without Transformer Engine); this file only declares them to the family layer. The T5-only settings (bucket
count and distance, output scaling, the exact activation) travel in ``ModelConfig.hf`` as the HF config they
came from, so :func:`t5_config` rebuilds the exact :class:`~interop.t5.config.T5Config`.

Megatron-LM's legacy (pre-Core) T5 — ``language_model.{embedding,encoder,decoder}``, ``inter_attention.*``,
``final_norm`` in both stacks, ``lm_head.bias`` (docs/checkpoint-formats.md §2.4) — reads and writes through the
local rules plus the two final norms; as a Transformers T5 it is refused like any learned-position T5.

Megatron-Core 0.16.1's ``T5Model`` runs at PP=1 only (see :mod:`interop.t5`): a PP>1 layout is a one-line error.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch

from interop.errors import ConversionError, LayoutError

from interop.families.base import (
    Column,
    Family,
    FusedQKV,
    HFMap,
    ModelConfig,
    Output,
    Plain,
    Replicated,
    Row,
    TensorRule,
    VocabParallel,
    megatron_args_common,
    register,
)
from interop.families.provider import Provider
from interop.t5.config import T5_ACTIVATIONS, T5Config
from interop.t5.tensor_map import KINDS as MAP_KINDS
from interop.t5.tensor_map import map_rows

#: T5 activation (``T5_ACTIVATIONS`` key) -> the family layer's name for the same function
_ACTIVATION = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_HF_TYPES = ("t5", "mt5")


def t5_config(cfg: ModelConfig) -> T5Config:
    """The exact :class:`T5Config` of a T5-family ``ModelConfig`` (its HF config in ``cfg.hf`` plus the sizes
    the family layer may have changed: true vocabulary, vocabulary padding, output-layer tying)."""
    if cfg.hf.get("model_type") not in _HF_TYPES:
        raise ConversionError("this T5 has no Transformers config (a Megatron-LM T5 with learned positions)")
    return T5Config.from_hf(cfg.hf, untied_lm_head=not cfg.tie_word_embeddings).replace(
        vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)


class _Bound(HFMap):
    """A :mod:`interop.t5.tensor_map` HF map called with the model's :class:`T5Config` (the maps read T5-only
    fields such as ``scale_decoder_outputs``) instead of the family layer's ``ModelConfig``."""

    def __init__(self, inner: HFMap, t5: T5Config):
        self.inner, self.t5 = inner, t5
        self.hf_names = inner.hf_names

    def to_canonical(self, parts, cfg):
        return self.inner.to_canonical(parts, self.t5)

    def to_hf(self, tensor, cfg):
        if tensor.is_meta and not self.hf_names:
            return []  # shape planning: the zero-bias check needs values
        return self.inner.to_hf(tensor, self.t5)


def _shape(name: str):
    """Full shapes of the T5 tensors outside the family layer's ``COMMON_SHAPES``."""
    shapes = {
        "relative_attention_bias.weight": lambda c: (c.hf["relative_attention_num_buckets"], c.num_attention_heads),
        "pre_cross_attn_layernorm.weight": lambda c: (c.hidden_size,),
        "cross_attention.linear_q.weight": lambda c: (c.num_attention_heads * c.kv_channels, c.hidden_size),
        "cross_attention.linear_kv.weight": lambda c: (2 * c.num_attention_heads * c.kv_channels, c.hidden_size),
        "cross_attention.linear_proj.weight": lambda c: (c.hidden_size, c.num_attention_heads * c.kv_channels),
        "pre_cross_attn_layernorm.bias": lambda c: (c.hidden_size,),
        "cross_attention.linear_q.bias": lambda c: (c.num_attention_heads * c.kv_channels,),
        "cross_attention.linear_kv.bias": lambda c: (2 * c.num_attention_heads * c.kv_channels,),
        "cross_attention.linear_proj.bias": lambda c: (c.hidden_size,),
        "output_layer.bias": lambda c: (c.vocab_size,),
        "output_layer.weight": lambda c: (c.vocab_size, c.hidden_size),
    }
    for suffix, shape in shapes.items():
        if name.endswith(suffix) and (name.startswith("lm_head.") or not suffix.startswith("output_layer")):
            return shape
    return None


def local_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The tensors of a ``T5Model`` built with Megatron-Core's own local specs (what Megatron-LM writes without
    Transformer Engine): learned absolute positions, LayerNorm with bias, linear biases, no final norms (the
    local block specs take ``TENorm``, None without TE). Transformers has no such T5: the HF names are
    placeholders that :meth:`T5.check_representable` never lets a writer reach. Megatron-LM's legacy T5 has the same
    tensors plus final LayerNorms in both stacks (:func:`has_final_norms`)."""
    def rule(name, split):
        return TensorRule(name, Plain(f"megatron-only:{name}"), split, _shape(name))

    rules = [rule("embedding.word_embeddings.weight", VocabParallel()),
             rule("embedding.position_embeddings.weight", Replicated())]
    for stack in ("encoder", "decoder"):
        L = f"{stack}.layers.{{i}}."
        norms = ["input_layernorm", "pre_mlp_layernorm"] + (["pre_cross_attn_layernorm"] if stack == "decoder" else [])
        rules += [rule(f"{L}{n}.{x}", Replicated()) for n in norms for x in ("weight", "bias")]
        linears = [("self_attention.linear_qkv", FusedQKV(), FusedQKV()),
                   ("self_attention.linear_proj", Row(), Replicated()),
                   ("mlp.linear_fc1", Column(), Column()), ("mlp.linear_fc2", Row(), Replicated())]
        if stack == "decoder":
            linears += [("cross_attention.linear_q", Column(), Column()),
                        ("cross_attention.linear_kv", Column(), Column()),
                        ("cross_attention.linear_proj", Row(), Replicated())]
        for module, weight, bias in linears:
            rules += [rule(f"{L}{module}.weight", weight), rule(f"{L}{module}.bias", bias)]
    if has_final_norms(cfg):
        rules += [rule(f"{stack}.final_layernorm.{x}", Replicated()) for stack in ("encoder", "decoder")
                  for x in ("weight", "bias")]
    head = "lm_head.output_layer.bias" if cfg.tie_word_embeddings else "lm_head.output_layer.weight"
    return rules + [rule(head, VocabParallel())]


#: ``ModelConfig.hf`` marker of a non-HF T5 whose stacks end in final LayerNorms (Megatron-LM's legacy T5 and a
#: Transformer-Engine-built one have them; Megatron-Core's local spec has none, docs/checkpoint-formats.md §10.3)
FINAL_NORMS = "megatron_final_norms"
_FINAL_NORM_NAME = re.compile(r"(^|\.)(encoder|decoder)\.(final_norm|final_layernorm)\.")


def has_final_norms(cfg: ModelConfig) -> bool:
    return bool(cfg.hf.get(FINAL_NORMS))


class T5Provider(Provider):
    """Megatron-Core ``T5Model`` with :mod:`interop.t5.spec` (relative bias through SDPA, final norms, no TE);
    a sample carries encoder ``tokens``/``attention_mask`` and ``decoder_tokens``/``decoder_attention_mask``."""

    model_class = "megatron.core.models.T5.T5Model"

    def default_spec(self, cfg):
        return None  # the specs depend on the stack depths: built in build()

    def build(self, cfg, config, *, vocab_size, pre_process, post_process, vp_stage, layer_spec):
        from megatron.core.models.T5 import T5Model

        from interop.t5.spec import decoder_block_spec, encoder_block_spec

        if cfg.position_embedding_type != "relative":  # a Megatron-LM T5 without TE: Megatron-Core's local specs
            from megatron.core.models.T5.t5_spec import (
                get_t5_decoder_with_local_block_spec,
                get_t5_encoder_with_local_block_spec,
            )

            layers = {s.name: s.num_layers for s in T5().stacks(cfg)}
            encoder_spec = get_t5_encoder_with_local_block_spec(layers["encoder"])
            decoder_spec = get_t5_decoder_with_local_block_spec(layers["decoder"])
            if has_final_norms(cfg):  # legacy Megatron-LM T5: the final norms its local block specs lose
                from megatron.core.transformer.torch_norm import WrappedTorchNorm

                encoder_spec = dataclasses.replace(encoder_spec, layer_norm=WrappedTorchNorm)
                decoder_spec = dataclasses.replace(decoder_spec, layer_norm=WrappedTorchNorm)
            return T5Model(
                config=dataclasses.replace(config, num_layers=layers["decoder"]),
                encoder_config=dataclasses.replace(config, num_layers=layers["encoder"]),
                transformer_encoder_layer_spec=encoder_spec,
                transformer_decoder_layer_spec=decoder_spec,
                vocab_size=vocab_size, max_sequence_length=cfg.max_position_embeddings,
                pre_process=pre_process, post_process=post_process,
                share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                position_embedding_type=cfg.position_embedding_type,
            )
        t5 = t5_config(cfg)
        act = T5_ACTIVATIONS[t5.activation]  # exactly Transformers' function (gelu_new != torch's tanh GELU)
        dec = dataclasses.replace(config, num_layers=t5.num_decoder_layers, activation_func=act)
        enc = dataclasses.replace(config, num_layers=t5.num_layers, activation_func=act)
        return T5Model(
            config=dec, encoder_config=enc,
            transformer_encoder_layer_spec=encoder_block_spec(t5.num_layers),
            transformer_decoder_layer_spec=decoder_block_spec(t5.num_decoder_layers),
            vocab_size=vocab_size, max_sequence_length=t5.max_sequence_length,
            pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=t5.tie_word_embeddings,
            position_embedding_type="relative",
            relative_attention_num_buckets=t5.relative_attention_num_buckets,
            relative_attention_max_distance=t5.relative_attention_max_distance,
        )

    def forward(self, model, sample):
        from interop.t5.forward import megatron_masks

        enc, dec, cross = megatron_masks(sample["attention_mask"], sample.get("decoder_attention_mask"))
        return model(sample["tokens"], sample["decoder_tokens"], enc, dec, cross)


@register
class T5(Family):
    name = "t5"
    kind = "encoder-decoder"
    provider = T5Provider()
    capabilities: frozenset[str] = frozenset({"generate"})  # encoder-decoder: trainer.generate_seq2seq
    hf_model_types = _HF_TYPES
    hf_architecture = "T5ForConditionalGeneration"
    hf_ignored = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    first_stage_prefixes = ("embedding.", "encoder_relative_pos_emb.", "decoder_relative_pos_emb.")
    layer_extra_states = {"decoder": ("cross_attention.linear_q", "cross_attention.linear_kv",
                                      "cross_attention.linear_proj")}
    head_extra_states = ("lm_head.output_layer", "output_layer")
    dist_head_extra_states = ("lm_head.output_layer", "output_layer")
    megatron_markers = tuple(re.compile(p) for p in (
        r"cross_attention\.linear_q\.", r"pre_cross_attn_layernorm", r"_relative_pos_emb\.", r"inter_attention\.query\."))
    legacy_format = True  # Megatron-LM's pre-Core T5 (docs/checkpoint-formats.md §2.4)
    legacy_names = {"lm_head.output_layer.bias": ("lm_head.bias",)}
    stored_aliases = {"embedding.position_embeddings.weight": ("position_embeddings.weight",),
                      "lm_head.output_layer.weight": ("output_layer.weight",),
                      "lm_head.output_layer.bias": ("output_layer.bias",)}

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        if cfg.position_embedding_type != "relative":
            return local_rules(cfg)
        t5 = t5_config(cfg)
        return [TensorRule(name, _Bound(MAP_KINDS[kind](hf_names), t5), split, _shape(name))
                for name, kind, hf_names, split in map_rows(t5)]

    def check_pipeline(self, cfg: ModelConfig, pp: int, vpp: int | None) -> None:
        if pp != 1 or (vpp or 1) != 1:
            raise LayoutError(f"PP={pp}: Megatron-Core's T5Model runs without pipeline parallelism (use PP=1)")

    # ---- what --verify compares, inspect names
    def hf_class(self, cfg: ModelConfig) -> str:
        return "MT5ForConditionalGeneration" if cfg.hf.get("model_type") == "mt5" else "T5ForConditionalGeneration"

    def outputs(self, cfg: ModelConfig) -> tuple[Output, ...]:
        return (Output("logits", "logits"),)

    def heads(self, cfg: ModelConfig) -> tuple[str, ...]:
        return ("lm_head",)

    # ---- config mapping
    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        t5 = T5Config.from_hf(hf)
        return self.from_t5(t5)

    def from_t5(self, t5: T5Config) -> ModelConfig:
        """The family layer's view of a :class:`T5Config` (its HF config kept whole in ``hf``)."""
        return ModelConfig(
            family=self.name, num_layers=t5.num_decoder_layers, encoder_num_layers=t5.num_layers,
            hidden_size=t5.hidden_size, num_attention_heads=t5.num_attention_heads, kv_channels=t5.kv_channels,
            ffn_hidden_size=t5.ffn_hidden_size, vocab_size=t5.vocab_size,
            max_position_embeddings=t5.max_sequence_length, position_embedding_type="relative",
            normalization="RMSNorm", norm_epsilon=t5.norm_epsilon, add_bias_linear=False, add_qkv_bias=False,
            gated_linear_unit=t5.gated, activation=_ACTIVATION[t5.activation],
            tie_word_embeddings=t5.tie_word_embeddings,
            make_vocab_size_divisible_by=t5.make_vocab_size_divisible_by, hf=t5.to_hf(),
        )

    def check_representable(self, cfg: ModelConfig) -> None:
        checks = [
            (cfg.position_embedding_type != "relative", f"{cfg.position_embedding_type} positions"),
            (cfg.add_bias_linear or cfg.add_qkv_bias, "linear layers with bias"),
            (cfg.normalization != "RMSNorm", f"{cfg.normalization} (T5 uses RMSNorm without bias)"),
            (cfg.hf.get("model_type") not in _HF_TYPES, "a model without a Transformers T5 config"),
        ]
        why = [w for bad, w in checks if bad]
        if why:
            raise ConversionError("a Transformers T5 cannot express " + ", ".join(why))

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        self.check_representable(cfg)
        return {**t5_config(cfg).to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}

    def megatron_args(self, cfg: ModelConfig) -> dict[str, Any]:
        args = {"encoder_num_layers": cfg.encoder_num_layers, "decoder_num_layers": cfg.num_layers}
        if cfg.position_embedding_type == "relative":
            args.update(relative_attention_num_buckets=cfg.hf["relative_attention_num_buckets"],
                        relative_attention_max_distance=cfg.hf["relative_attention_max_distance"])
        return args

    def config_from_megatron_args(self, get, vocab_size, names=frozenset()):
        common = megatron_args_common(get, vocab_size)
        if common["hf"].get("model_type") in _HF_TYPES:  # ours: the HF config rides along (exact activation)
            t5 = T5Config.from_hf(common["hf"], untied_lm_head=not common["tie_word_embeddings"])
            return self.from_t5(t5.replace(vocab_size=common["vocab_size"],
                                           make_vocab_size_divisible_by=common["make_vocab_size_divisible_by"]))
        if common["position_embedding_type"] == "relative":
            raise ConversionError("a T5 with relative positions but no Transformers config in its args (written "
                                  "by Megatron-LM with Transformer Engine) is not supported yet")
        decoder = get("decoder_num_layers") or common["num_layers"]
        encoder = get("encoder_num_layers") or common["num_layers"]
        hf = dict(common["hf"])
        if any(_FINAL_NORM_NAME.search(n) for n in names):
            hf[FINAL_NORMS] = True
        return ModelConfig(family=self.name, **{**common, "num_layers": decoder, "encoder_num_layers": encoder,
                                                "hf": hf})
