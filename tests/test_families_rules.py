"""Family declarations and split rules, checked against Transformers' own configs/models (no ranks needed)."""
from __future__ import annotations

import pytest
import torch

from formats.layout import Layout
from interop.convert_stream import canonical_to_hf, check_hf_names
from interop.errors import ConversionError, LayoutError
from interop.families import ModelConfig, family_for_hf, get_family
from interop.families.base import FusedQKV, GatedFc1, VocabParallel
from tests.test_convert_megatron_model import canonical_of, tiny_hf

KINDS = ["gpt2", "llama", "mistral-mqa", "qwen2"]


@pytest.mark.parametrize("kind,tie", [(k, False) for k in KINDS] + [("llama", True), ("qwen2", True)])
def test_hf_canonical_hf_is_identity(kind, tie):
    model = tiny_hf(kind, tie=tie)
    cfg, canonical = canonical_of(model)
    family = get_family(cfg.family)
    state = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        assert "output_layer.weight" not in canonical
        state.pop("lm_head.weight", None)
    back = dict(canonical_to_hf(family, cfg, canonical.items()))
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_grouped_qkv_layout_matches_spec_for_gqa():
    """docs/checkpoint-formats.md §4.3: rows of group g = [q heads of g | k(g) | v(g)] — check against HF's separate projections."""
    model = tiny_hf("llama")  # 4 heads, 2 groups, head dim 16
    cfg, canonical = canonical_of(model)
    qkv = canonical["decoder.layers.1.self_attention.linear_qkv.weight"]
    attn = model.model.layers[1].self_attn
    d = 16
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    for g in range(2):
        rows = qkv[g * 4 * d:(g + 1) * 4 * d]
        assert torch.equal(rows[: 2 * d], q[g * 2 * d:(g + 1) * 2 * d])
        assert torch.equal(rows[2 * d: 3 * d], k[g * d:(g + 1) * d])
        assert torch.equal(rows[3 * d:], v[g * d:(g + 1) * d])


def test_gated_fc1_shards_are_gate_t_up_t_not_plain_chunks():
    cfg = ModelConfig("llama", 2, 8, 2, 6, 10, 16, gated_linear_unit=True, activation="silu")
    full = torch.arange(12.0).unsqueeze(1)  # gate = 0..5, up = 6..11
    shards = GatedFc1().split(full, 2, cfg)
    assert shards[0].flatten().tolist() == [0, 1, 2, 6, 7, 8]
    assert shards[1].flatten().tolist() == [3, 4, 5, 9, 10, 11]
    assert torch.equal(GatedFc1().merge(shards, cfg), full)


def test_vocab_parallel_pads_per_tp_and_cuts_back():
    cfg = ModelConfig("gpt2", 2, 8, 2, 32, vocab_size=101, max_position_embeddings=16,
                      make_vocab_size_divisible_by=8)
    assert cfg.padded_vocab_size(1) == 104 and cfg.padded_vocab_size(2) == 112  # docs/checkpoint-formats.md §4.2 example
    full = torch.randn(101, 8)
    shards = VocabParallel().split(full, 2, cfg)
    assert [s.shape[0] for s in shards] == [56, 56]
    assert torch.equal(shards[1][-1], full[-1])  # pad rows replicate the last real row (Megatron's saver)
    assert torch.equal(VocabParallel().merge(shards, cfg), full)
    with pytest.raises(ConversionError):
        VocabParallel().merge([full[:50]], cfg)


def test_tp_must_divide_query_groups_or_be_a_multiple_of_them():
    """One KV head at TP2 is fine (Megatron-Core all-gathers the QKV rows; tests/test_starcoder_convert.py runs
    it), 3 groups at TP2 are not."""
    model = tiny_hf("mistral-mqa")  # one KV head
    cfg, canonical = canonical_of(model)
    cfg.check_layout(2)
    qkv = canonical["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(torch.cat(FusedQKV().split(qkv, 2, cfg)), qkv)
    bad = cfg.replace(num_attention_heads=6, num_query_groups=3)
    with pytest.raises(LayoutError, match="query groups"):
        bad.check_layout(2)
    with pytest.raises(LayoutError):
        FusedQKV().shard(qkv, 2, 0, bad)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_config_round_trip_through_transformers(kind):
    """ModelConfig -> our HF config -> Transformers' config class -> ModelConfig is lossless."""
    import transformers

    model = tiny_hf(kind)
    cfg, _ = canonical_of(model)
    family = get_family(cfg.family)
    hf = family.hf_config(cfg)
    conf = transformers.AutoConfig.for_model(**hf)
    assert type(conf) is type(model.config)
    again = family_for_hf(conf.to_dict()).config_from_hf(conf.to_dict())
    assert again == cfg


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_args_round_trip(kind):
    cfg, _ = canonical_of(tiny_hf(kind))
    args = cfg.to_megatron_args(Layout(tp=2, pp=2))
    assert args["padded_vocab_size"] == cfg.padded_vocab_size(2)
    assert args["group_query_attention"] == (cfg.num_query_groups != cfg.num_attention_heads)
    assert ModelConfig.from_megatron_args(args) == cfg


def test_megatron_lm_args_without_our_fields_guess_family_and_activation():
    """A Megatron-LM GPT run (defaults: fused tanh GELU, docs/checkpoint-formats.md trap T7) and a Llama-like run (--swiglu, RMSNorm)."""
    gpt = dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
               padded_vocab_size=128, add_bias_linear=True)
    cfg = ModelConfig.from_megatron_args(gpt, vocab_size=100)
    assert (cfg.family, cfg.activation, cfg.vocab_size, cfg.ffn_hidden_size) == ("gpt2", "gelu_tanh", 100, 256)
    assert ModelConfig.from_megatron_args({**gpt, "bias_gelu_fusion": False}).activation == "gelu"
    llama = dict(num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
                 num_query_groups=2, ffn_hidden_size=96, swiglu=True, normalization="RMSNorm",
                 position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True,
                 norm_epsilon=1e-6, max_position_embeddings=32, padded_vocab_size=128)
    cfg = ModelConfig.from_megatron_args(llama)
    assert (cfg.family, cfg.num_query_groups, cfg.norm_epsilon, cfg.tie_word_embeddings) == ("llama", 2, 1e-6, False)
    assert family_for_hf({"model_type": "llama"}).hf_config(cfg)["architectures"] == ["LlamaForCausalLM"]


def test_unsupported_inputs_are_one_line_errors():
    with pytest.raises(ConversionError, match="unsupported HF model_type 'bert'"):
        family_for_hf({"model_type": "bert"})
    with pytest.raises(ConversionError, match="unknown model family"):
        get_family("no-such-family")  # (t5 is a family now)
    model = tiny_hf("llama")
    cfg, _ = canonical_of(model)
    names = set(model.state_dict())
    with pytest.raises(ConversionError, match="missing 1 tensor"):
        check_hf_names(get_family("llama"), cfg, names - {"model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(ConversionError, match="unexpected"):
        check_hf_names(get_family("llama"), cfg, names | {"model.layers.9.mlp.up_proj.weight"})
    with pytest.raises(ConversionError, match="no Megatron equivalent"):
        get_family("gpt2").config_from_hf({**model.config.to_dict(), "model_type": "gpt2", "n_embd": 8,
                                           "n_layer": 1, "n_head": 2, "n_positions": 8,
                                           "activation_function": "relu"})
    with pytest.raises(ConversionError, match="GPT-2 cannot express"):
        get_family("gpt2").hf_config(cfg)
