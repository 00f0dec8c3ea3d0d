"""StarCoder (Transformers ``GPTBigCodeForCausalLM``, multi-query) <-> Megatron-Core GPT with one query group,
against the producers: Transformers' own model, and Megatron-Core's own ``GPTModel`` loading each checkpoint at
its own TP x PP with its own loaders (one 4-rank run for every checkpoint of the module)."""
from __future__ import annotations

import pytest
import torch

import interop
from tests.alibi_mqa_tiny import (
    assert_close,
    back_to_hf,
    convert_everywhere,
    hf_config,
    hf_dir_logits,
    hf_logits,
    megatron_core_agrees,
    tiny_starcoder,
    tokens,
)


@pytest.fixture(scope="module")
def starcoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("starcoder")
    model = tiny_starcoder()
    toks = tokens()
    return root, toks, hf_logits(model, toks), convert_everywhere(root, model)


def test_every_layout_and_format_back_to_transformers(starcoder):
    for result, config in back_to_hf(*starcoder):
        assert result.config.family == "starcoder" and result.config.num_query_groups == 1
        assert config["architectures"] == ["GPTBigCodeForCausalLM"] and config["multi_query"] is True
        assert config["activation_function"] == "gelu_pytorch_tanh"


def test_megatron_core_loads_every_checkpoint_at_its_layout(starcoder):
    """num_query_groups=1 at TP2 too (fewer K/V heads than ranks: Megatron-Core all-gathers the QKV rows and
    every rank uses the one K/V head)."""
    _, toks, expected, megs = starcoder
    megatron_core_agrees(megs, toks, expected)


def test_inspect_names_the_family_and_verify_agrees(starcoder):
    root, _, _, megs = starcoder
    from interop.checkpoints import config_of, open_source

    cfg = config_of(open_source(megs[("torch", 2, 1)]))
    assert (cfg.family, cfg.num_query_groups, cfg.num_attention_heads) == ("starcoder", 1, 4)
    result = interop.verify(root / "hf", megs[("torch", 2, 1)], tolerance=1e-5)
    assert result.ok and result.max_abs_diff <= 1e-5


def test_multi_head_and_erf_gelu_variant_at_tp2(tmp_path):
    """``multi_query=false`` (per-head [q, k, v] rows: one group per head) with erf GELU, TP2 and back."""
    model = tiny_starcoder(multi_query=False, act="gelu", seed=3)
    model.save_pretrained(tmp_path / "hf")
    toks = tokens()
    interop.convert(tmp_path / "hf", tmp_path / "meg", tp=2, pp=1, format="torch_dist", progress=False)
    result = interop.convert(tmp_path / "meg", tmp_path / "back", progress=False)
    assert result.config.num_query_groups == 4
    config = hf_config(tmp_path / "back")
    assert config["multi_query"] is False and config["activation_function"] == "gelu"
    assert_close(hf_dir_logits(tmp_path / "back", toks), hf_logits(model, toks), msg="MHA erf TP2 -> HF")


def test_wrong_gelu_or_wrong_kv_layout_is_visible_at_this_tolerance():
    """The comparisons above can fail: tanh vs erf GELU, and MQA rows read as per-head rows, differ far beyond
    1e-5 on these models."""
    import transformers

    model = tiny_starcoder()
    toks = tokens()
    erf = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        **{**model.config.to_dict(), "activation_function": "gelu"}))
    erf.load_state_dict(model.state_dict())
    assert (hf_logits(erf.eval(), toks) - hf_logits(model, toks)).abs().max() > 1e-4
    mha = tiny_starcoder(multi_query=False)
    with torch.no_grad():  # every weight but c_attn the same: the K/V layout matters
        mha.load_state_dict({k: v for k, v in model.state_dict().items() if "c_attn" not in k}, strict=False)
    assert (hf_logits(mha, toks) - hf_logits(model, toks)).abs().max() > 1e-4
