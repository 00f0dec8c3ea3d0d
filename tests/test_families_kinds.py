"""The family layer for every model kind: stacks, heads, shapes, placement and config mappings are declarations
that the converter, reshaper, verifier and trainer read; checked on GPT-2, Llama and BERT without ranks."""
from __future__ import annotations

import argparse

import pytest
import torch

from formats.layout import Layout
from interop.convert_megatron import canonical_shape, extra_state_names, local_names, stage_of
from interop.convert_stream import canonical_to_hf, check_hf_names, hf_to_canonical
from interop.errors import ConversionError
from interop.families import ModelConfig, family_for_hf, get_family
from interop.families.base import layer_of, stack_of
from tests.bert_tiny import tiny_bert


def bert_cfg(binary_head: bool = True, tie: bool = True) -> ModelConfig:
    model = tiny_bert(binary_head=binary_head, layers=2, tie=tie)
    hf = {**model.config.to_dict(), "architectures": [type(model).__name__]}  # as save_pretrained writes it
    return family_for_hf(hf).config_from_hf(hf), model


def test_layer_names_of_every_stack():
    assert layer_of("encoder.layers.3.mlp.linear_fc1.bias") == (3, "encoder.layers.{i}.mlp.linear_fc1.bias")
    assert layer_of("decoder.layers.12.input_layernorm.weight") == (12, "decoder.layers.{i}.input_layernorm.weight")
    assert layer_of("language_model.encoder.layers.1.x") == (None, "language_model.encoder.layers.1.x")
    assert stack_of("encoder.layers.{i}.mlp.linear_fc1.bias") == "encoder"
    assert stack_of("encoder.final_layernorm.weight") is None


@pytest.mark.parametrize("binary_head,tie", [(True, True), (False, True), (True, False)])
def test_bert_hf_canonical_hf_is_identity_and_declares_kind_heads_outputs(binary_head, tie):
    cfg, model = bert_cfg(binary_head, tie)
    assert cfg.tie_word_embeddings == tie
    family = get_family(cfg.family)
    assert (family.kind, [s.name for s in family.stacks(cfg)]) == ("encoder", ["encoder"])
    assert family.heads(cfg) == (("lm_head", "pooler", "binary_head") if binary_head else ("lm_head",))
    assert family.hf_class(cfg) == type(model).__name__
    tied = ("cls.predictions.decoder.bias",) + (("cls.predictions.decoder.weight",) if tie else ())
    state = {k: v for k, v in model.state_dict().items() if k not in tied}  # what save_pretrained writes
    check_hf_names(family, cfg, model.state_dict())
    canonical = dict(hf_to_canonical(family, cfg, state.__getitem__))
    assert all(tuple(t.shape) == canonical_shape(n, cfg) for n, t in canonical.items())
    assert canonical["output_layer.bias"].shape == (cfg.vocab_size,)
    assert ("output_layer.weight" in canonical) == (not tie)
    back = dict(canonical_to_hf(family, cfg, canonical.items()))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[n], t) for n, t in state.items())


def test_an_undeclared_tensor_has_no_shape():
    cfg, _ = bert_cfg()
    with pytest.raises(ConversionError, match="not part of a bert model"):
        canonical_shape("encoder.layers.0.self_attention.q_layernorm.weight", cfg)
    with pytest.raises(ConversionError, match="declares no shape"):
        get_family("bert").shape("pooler.extra.weight", cfg)


def test_pipeline_placement_and_legacy_names_come_from_the_family():
    cfg, _ = bert_cfg()
    layout = Layout(tp=2, pp=2)
    assert stage_of("embedding.tokentype_embeddings.weight", cfg, layout) == (0, 0, "embedding.tokentype_embeddings.weight")
    assert stage_of("encoder.layers.1.mlp.linear_fc2.bias", cfg, layout) == (1, 0, "encoder.layers.0.mlp.linear_fc2.bias")
    for name in ("pooler.dense.weight", "binary_head.bias", "lm_head.layer_norm.weight", "output_layer.bias"):
        assert stage_of(name, cfg, layout)[0] == 1
    fam = get_family("bert")
    assert local_names("lm_head.layer_norm.bias", "legacy", family=fam) == ["lm_head.norm.bias", "lm_head.layernorm.bias"]
    assert local_names("output_layer.bias", "legacy", family=fam) == ["lm_head.bias"]
    assert local_names("encoder.layers.0.pre_mlp_layernorm.weight", "legacy", family=fam)[:2] == [
        "language_model.encoder.layers.0.post_attention_norm.weight",
        "language_model.encoder.layers.0.post_attention_layernorm.weight"]
    assert local_names("encoder.final_layernorm.weight", "legacy", family=fam)[0] == "language_model.encoder.final_norm.weight"
    extra = extra_state_names(cfg, layout, "mcore")
    assert "encoder.layers.0.mlp.linear_fc1._extra_state" in extra[(0, 0)]
    assert "output_layer._extra_state" in extra[(1, 0)] and "output_layer._extra_state" not in extra[(0, 0)]


def test_bert_config_round_trips_through_transformers_and_megatron_args():
    import transformers

    cfg, _ = bert_cfg()
    hf = get_family("bert").hf_config(cfg)
    assert (hf["hidden_act"], hf["layer_norm_eps"], hf["type_vocab_size"]) == ("gelu", 1e-5, 2)
    assert family_for_hf(hf).config_from_hf(transformers.MegatronBertConfig(**hf).to_dict()) == cfg
    args = cfg.to_megatron_args(Layout(tp=2))
    assert args["bias_gelu_fusion"] is False and args["bert_binary_head"] is True  # erf GELU in Megatron-LM
    assert ModelConfig.from_megatron_args(args) == cfg


def test_megatron_lm_bert_is_recognised_by_its_tensor_names():
    """Megatron-LM writes ``bert_binary_head`` into every run's args, GPT ones included: the names decide."""
    args = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                              max_position_embeddings=32, bert_binary_head=True)  # bias_gelu_fusion default: tanh
    gpt = ModelConfig.from_megatron_args(args, names=["language_model.encoder.layers.0.input_norm.weight",
                                                      "language_model.embedding.word_embeddings.weight"])
    assert gpt.family == "gpt2"
    bert = ModelConfig.from_megatron_args(args, names=["lm_head.dense.weight", "encoder.layers.0.mlp.linear_fc1.bias"])
    assert (bert.family, bert.add_binary_head, bert.num_tokentypes, bert.activation) == ("bert", False, 0, "gelu_tanh")
    assert get_family("bert").hf_config(bert)["hidden_act"] == "gelu_new"  # docs/checkpoint-formats.md §5.3: closest HF can get


def test_unsupported_bert_inputs_are_one_line_errors():
    cfg, model = bert_cfg()
    fam = get_family("bert")
    with pytest.raises(ConversionError, match="MegatronBertModel is not supported"):
        fam.config_from_hf({**model.config.to_dict(), "architectures": ["MegatronBertModel"]})
    with pytest.raises(ConversionError, match="relative position"):
        fam.config_from_hf({**model.config.to_dict(), "position_embedding_type": "relative_key"})
    with pytest.raises(ConversionError, match="generate needs a decoder model; bert is encoder-only"):
        fam.require("generate")
    with pytest.raises(ConversionError, match="cannot express grouped-query attention"):
        fam.hf_config(cfg.replace(num_query_groups=2))
