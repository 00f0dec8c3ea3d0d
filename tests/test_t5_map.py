"""The HF <-> Megatron-Core T5 tensor map and config round trip (no model run), and the bias-taking core
attention against the softmax written out by hand."""
import pytest
import torch

from interop.errors import ConversionError, LayoutError
from interop.t5.config import T5Config
from interop.t5.tensor_map import hf_to_megatron, megatron_to_hf, tensor_rules
from tests.t5_helpers import hf_state, tiny_t5


def _cfg(model, version):
    return T5Config.from_hf(model.config, untied_lm_head=version != "1.0")


@pytest.mark.parametrize("version", ["1.0", "1.1", "mt5"])
def test_hf_megatron_hf_round_trip_is_exact(version):
    model = tiny_t5(version)
    cfg = _cfg(model, version)
    state = hf_state(model)
    back = megatron_to_hf(hf_to_megatron(state, cfg), cfg)
    assert sorted(back) == sorted(state)
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_folds_are_megatron_semantics():
    """q carries HF's missing 1/sqrt(d) (Megatron scales scores), the v1.0 decoder-output scaling sits in the
    decoder's final norm, cross-attention kv is per head [k_h; v_h], and a tied model has a zero head bias."""
    model = tiny_t5("1.0")
    cfg = _cfg(model, "1.0")
    state = hf_state(model)
    meg = hf_to_megatron(state, cfg)
    d, heads = cfg.kv_channels, cfg.num_attention_heads
    qkv = meg["encoder.layers.1.self_attention.linear_qkv.weight"].view(heads, 3, d, -1)
    q = state["encoder.block.1.layer.0.SelfAttention.q.weight"].view(heads, d, -1)
    assert torch.equal(qkv[:, 0], q * d ** 0.5)
    kv = meg["decoder.layers.2.cross_attention.linear_kv.weight"].view(heads, 2, d, -1)
    assert torch.equal(kv[:, 1], state["decoder.block.2.layer.1.EncDecAttention.v.weight"].view(heads, d, -1))
    assert torch.equal(meg["decoder.final_layernorm.weight"],
                       state["decoder.final_layer_norm.weight"] * cfg.hidden_size ** -0.5)
    assert not meg["lm_head.output_layer.bias"].any()
    meg["lm_head.output_layer.bias"][3] = 1.0
    with pytest.raises(ConversionError, match="no output bias"):
        megatron_to_hf(meg, cfg)


def test_megatron_tied_without_scaling_writes_an_explicit_head():
    """A Megatron T5 ties its output without HF v1.0's scaling: HF gets tie_word_embeddings=false (no
    scaling) and lm_head.weight = shared.weight (docs/checkpoint-formats.md §5.4)."""
    model = tiny_t5("1.0")
    cfg = _cfg(model, "1.0").replace(scale_decoder_outputs=False)
    out = megatron_to_hf(hf_to_megatron(hf_state(model), cfg), cfg)
    assert torch.equal(out["lm_head.weight"], out["shared.weight"])
    hf_cfg = cfg.hf_config_object()
    assert hf_cfg.scale_decoder_outputs is False


@pytest.mark.parametrize("version", ["1.0", "1.1", "mt5"])
def test_config_round_trip(version):
    import transformers

    model = tiny_t5(version)
    cfg = _cfg(model, version)
    again = cfg.hf_config_object()
    assert type(again) is type(model.config)
    keys = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "vocab_size",
            "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
            "feed_forward_proj", "dense_act_fn", "is_gated_act", "pad_token_id", "eos_token_id",
            "decoder_start_token_id")
    assert {k: getattr(again, k) for k in keys} == {k: getattr(model.config, k) for k in keys}
    assert getattr(again, "scale_decoder_outputs", False) == getattr(model.config, "scale_decoder_outputs", False)
    assert T5Config.from_hf(again.to_dict(), untied_lm_head=cfg.tie_word_embeddings is False) == cfg
    assert isinstance(again, transformers.MT5Config) == (version == "mt5")


def test_rules_cover_each_layer_once():
    cfg = _cfg(tiny_t5("1.1"), "1.1")
    names = [r.name for r in tensor_rules(cfg)]
    assert len(names) == len(set(names))
    assert sum(n.endswith("linear_fc1.weight") for n in names) == cfg.num_layers + cfg.num_decoder_layers
    assert sum("cross_attention.linear_q." in n for n in names) == cfg.num_decoder_layers == 3


def test_bad_configs_are_refused():
    base = tiny_t5("1.0").config.to_dict()
    with pytest.raises(ConversionError, match="feed_forward_proj"):
        T5Config.from_hf({**base, "feed_forward_proj": "fancy-relu"})
    cfg = T5Config.from_hf(base)
    with pytest.raises(LayoutError, match="PP=2"):
        cfg.check_layout(1, 2)
    with pytest.raises(LayoutError, match="TP=3"):
        cfg.check_layout(3)
    with pytest.raises(ConversionError, match="mT5"):
        cfg.replace(model_type="mt5").to_hf()


def test_biased_attention_equals_written_out_softmax():
    from interop.attention import biased_attention, combine_masks

    torch.manual_seed(0)
    b, h, sq, sk, d = 2, 3, 4, 6, 8
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
    bias = torch.randn(1, h, sq, sk)
    pad = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    pad[1, ..., :2] = True
    mask = combine_masks(pad, True, sq, sk, q.device)  # query i sees keys <= i + (sk - sq)
    scores = q @ k.transpose(-1, -2) * 0.5 + bias
    scores = scores.masked_fill(mask, float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(biased_attention(q, k, v, bias, mask, 0.5), expected, rtol=1e-6, atol=1e-6)
    # a fully masked row attends uniformly (Transformers' rule), never NaN
    full = torch.ones(1, 1, sq, sk, dtype=torch.bool)
    out = biased_attention(q, k, v, bias, full, 0.5)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out), rtol=1e-5, atol=1e-5)
