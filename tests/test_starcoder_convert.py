"""StarCoder (Transformers ``GPTBigCodeForCausalLM``, multi-query) <-> Megatron-Core GPT with one query group,
against the producers: Transformers' own model, and Megatron-Core's own ``GPTModel`` loading each checkpoint at
its own TP x PP with its own loaders (one 4-rank run for every checkpoint of the module)."""
from __future__ import annotations

import pytest
import torch

import interop
from formats.checkpoint import open_checkpoint
from interop.launch import run_on_ranks
from tests.alibi_mqa_tiny import (
    FORMATS,
    LAYOUTS,
    assert_close,
    hf_config,
    hf_dir_logits,
    hf_logits,
    tiny_starcoder,
    tokens,
)


def _convert(src, dst, **kw):
    return interop.convert(src, dst, progress=False, **kw)


@pytest.fixture(scope="module")
def starcoder(tmp_path_factory):
    """HF multi-query model, its logits, and every Megatron conversion / reshape of it."""
    root = tmp_path_factory.mktemp("starcoder")
    model = tiny_starcoder()
    model.save_pretrained(root / "hf")
    toks = tokens()
    megs = {}
    for fmt in FORMATS:
        for tp, pp in LAYOUTS:
            megs[(fmt, tp, pp)] = root / f"{fmt}-tp{tp}pp{pp}"
            _convert(root / "hf", megs[(fmt, tp, pp)], tp=tp, pp=pp, format=fmt)
    interop.reshape(megs[("torch_dist", 2, 2)], root / "reshaped-tp1", tp=1, pp=1, format="torch", progress=False)
    interop.reshape(megs[("torch", 1, 1)], root / "reshaped-tp2", tp=2, pp=1, format="torch", progress=False)
    megs[("reshaped", 1, 1)] = root / "reshaped-tp1"
    megs[("reshaped", 2, 1)] = root / "reshaped-tp2"
    return root, toks, hf_logits(model, toks), megs


def test_every_layout_and_format_back_to_transformers(starcoder):
    root, toks, expected, megs = starcoder
    for (fmt, tp, pp), meg in megs.items():
        ck = open_checkpoint(meg)
        assert (ck.layout.tp, ck.layout.pp) == (tp, pp), (fmt, tp, pp)
        back = root / f"back-{meg.name}"
        result = _convert(meg, back)
        assert result.config.family == "starcoder" and result.config.num_query_groups == 1
        config = hf_config(back)
        assert config["architectures"] == ["GPTBigCodeForCausalLM"] and config["multi_query"] is True
        assert config["activation_function"] == "gelu_pytorch_tanh"
        assert_close(hf_dir_logits(back, toks), expected, msg=f"{fmt} TP{tp}PP{pp} -> HF")


def test_megatron_core_loads_every_checkpoint_at_its_layout(starcoder):
    """Megatron-Core's GPTModel with num_query_groups=1, at TP2 too (fewer K/V heads than ranks: Megatron-Core
    all-gathers the QKV rows, every rank uses the one K/V head), gives Transformers' logits."""
    from tests import bert_ranks

    _, toks, expected, megs = starcoder
    entries = [(str(p), tp, pp, None) for (fmt, tp, pp), p in megs.items()]
    results = run_on_ranks(bert_ranks.outputs_at_layouts, 4, entries, [{"tokens": toks}], timeout_s=900)[0]
    for (fmt, tp, pp), path in megs.items():
        assert_close(results[str(path)][0]["logits"], expected, msg=f"Megatron-Core {fmt} TP{tp}PP{pp}")


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
    _convert(tmp_path / "hf", tmp_path / "meg", tp=2, pp=1, format="torch_dist")
    result = _convert(tmp_path / "meg", tmp_path / "back")
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
    with torch.no_grad():  # same q rows, K/V of head 0 replicated, but in the per-head layout: a different model
        state = {k: v for k, v in model.state_dict().items() if "c_attn" not in k}
        mha.load_state_dict(state, strict=False)
    assert (hf_logits(mha, toks) - hf_logits(model, toks)).abs().max() > 1e-4
