"""Megatron-Core's T5Model with our spec (no Transformer Engine) and weights mapped from Transformers gives
Transformers' logits, at TP1 and TP2, for T5 v1.0 (ReLU, tied, output scaling), v1.1 (gated tanh GELU, untied
head) and mT5; the oracle is Transformers' own forward on the same weights, with padding in encoder (left or
right) and decoder inputs."""
import functools

import pytest
import torch

from tests.generate_helpers import ranks_or_fail
from tests.t5_helpers import hf_logits, hf_state, rank_logits, tiny_t5

VERSIONS = ("1.0", "1.1", "mt5")
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _run(tp: int):
    return ranks_or_fail(rank_logits, tp, tp, VERSIONS if tp == 1 else ("1.0", "1.1"))


@functools.lru_cache(maxsize=None)
def _hf(version: str):
    return tiny_t5(version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_tp1_logits_equal_transformers(version, side):
    got = _run(1)[0][version][0][side]
    ref = hf_logits(_hf(version), side)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_tp2_logits_equal_transformers(version):
    """TP2 sums the row-parallel products in another order, so the bound scales with the logits' size
    (as ``interop verify`` does); every rank holds the same gathered logits."""
    ranks = _run(2)
    for side in ("right", "left"):
        ref = hf_logits(_hf(version), side)
        bound = ATOL * max(1.0, ref.abs().max().item())
        for out in ranks:
            assert (out[version][0][side] - ref).abs().max().item() <= bound
        assert torch.equal(ranks[0][version][0][side], ranks[1][version][0][side])


@pytest.mark.parametrize("tp", [1, 2])
def test_weights_read_back_equal_transformers(tp):
    for version, (_, back, _) in _run(tp)[0].items():
        expected = hf_state(_hf(version))
        assert sorted(back) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(back[name], tensor), (version, name)


def test_names_are_those_of_a_te_built_t5model():
    """Relative-bias tables and final norms under Megatron-Core's own names; the fused norms' dist-checkpoint
    keys under Transformer Engine's names (what Megatron-LM with TE saves and loads)."""
    params, sharded = _run(1)[0]["1.1"][2]
    for name in ("encoder_relative_pos_emb.relative_attention_bias.weight",
                 "decoder_relative_pos_emb.relative_attention_bias.weight",
                 "encoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.0.pre_cross_attn_layernorm.weight",
                 "decoder.layers.0.cross_attention.linear_kv.weight", "lm_head.output_layer.weight"):
        assert name in params
    assert not any("bias" in n and "relative" not in n for n in params)  # no linear or norm biases
    for key in ("encoder.layers.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.final_layernorm.weight",
                "decoder.layers.pre_cross_attn_layernorm.weight"):
        assert key in sharded
    tied = _run(1)[0]["1.0"][2][0]
    assert "lm_head.output_layer.bias" in tied and "lm_head.output_layer.weight" not in tied


def test_megatron_local_t5_spec_drops_the_final_norm():
    """Why our block specs exist: Megatron-Core's local spec takes the final norm from TENorm (None here)."""
    from megatron.core.models.T5.t5_spec import get_t5_encoder_with_local_block_spec

    from interop.t5.spec import decoder_block_spec, encoder_block_spec

    assert get_t5_encoder_with_local_block_spec(2).layer_norm is None
    assert encoder_block_spec(2).layer_norm is not None and decoder_block_spec(2).layer_norm is not None
