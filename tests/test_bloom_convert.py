"""BLOOM (Transformers ``BloomForCausalLM``, ALiBi, 6 heads: not a power of two) <-> Megatron-Core GPT with the
ALiBi core attention and the word-embedding LayerNorm, against the producers: Transformers' own model, and
Megatron-Core's own ``GPTModel`` loading each checkpoint at its own TP x PP with its own loaders (one 4-rank run
for every checkpoint of the module)."""
from __future__ import annotations

import pytest
import torch

import interop
from interop.alibi import alibi_slopes, rank_slopes
from tests.alibi_mqa_tiny import (
    back_to_hf,
    convert_everywhere,
    hf_logits,
    megatron_core_agrees,
    tiny_bloom,
    tokens,
)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("bloom")
    model = tiny_bloom()
    toks = tokens()
    return root, toks, hf_logits(model, toks), convert_everywhere(root, model)


def test_every_layout_and_format_back_to_transformers(bloom):
    for result, config in back_to_hf(*bloom):
        assert result.config.family == "bloom" and result.config.position_embedding_type == "alibi"
        assert config["architectures"] == ["BloomForCausalLM"] and config["n_head"] == 6


def test_megatron_core_loads_every_checkpoint_at_its_layout(bloom):
    """The ALiBi core (TP2: each rank its 3 heads' slopes) and the embedding LayerNorm in Megatron-Core's
    GPTModel, at every layout."""
    _, toks, expected, megs = bloom
    megatron_core_agrees(megs, toks, expected)


def test_inspect_and_verify(bloom):
    root, _, _, megs = bloom
    from interop.checkpoints import config_of, open_source

    cfg = config_of(open_source(megs[("torch_dist", 2, 2)]))
    assert (cfg.family, cfg.num_attention_heads, cfg.position_embedding_type) == ("bloom", 6, "alibi")
    result = interop.verify(root / "hf", megs[("torch", 2, 1)], tolerance=1e-5)
    assert result.ok and result.max_abs_diff <= 1e-5


def test_slopes_are_transformers_and_split_by_rank():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for n in (1, 3, 6, 8, 12, 30, 112):
        assert torch.equal(alibi_slopes(n), _get_alibi_slopes(n, "cpu")), n
    assert torch.equal(torch.cat([rank_slopes(12, 4, r) for r in range(4)]), alibi_slopes(12))


def test_missing_alibi_or_embedding_norm_is_visible_at_this_tolerance():
    """The comparisons above can fail: without the embedding LayerNorm or with a power-of-two slope rule the
    logits move far beyond 1e-5."""
    model = tiny_bloom()
    toks = tokens()
    expected = hf_logits(model, toks)
    with torch.no_grad():
        model.transformer.word_embeddings_layernorm.weight.fill_(1.0)
        model.transformer.word_embeddings_layernorm.bias.zero_()
    assert (hf_logits(model, toks) - expected).abs().max() > 1e-4
    wrong = 2.0 ** (-8.0 * torch.arange(1, 7) / 6)  # the power-of-two formula applied to 6 heads
    assert (wrong - alibi_slopes(6)).abs().max() > 1e-2
