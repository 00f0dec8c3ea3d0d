"""Megatron-BERT end to end, against the producers: Transformers' own ``MegatronBertForPreTraining`` /
``MegatronBertForMaskedLM`` and Megatron-Core's own ``BertModel`` (its loaders and its savers).

Tiny models with perturbed norms and biases (and MLP biases pushed to where erf and tanh GELU differ), a batch
with two token-type segments and a padded sample. Rank runs are the expensive part: every Megatron checkpoint
of this module is loaded by Megatron-Core in ONE 4-rank run (``outputs_at_layouts``)."""
from __future__ import annotations

import json

import pytest

import interop
from formats.checkpoint import open_checkpoint
from interop.launch import run_on_ranks
from interop.verification import hf_outputs as hf_dir_outputs
from tests.bert_tiny import VOCAB, assert_outputs_close, batch, hf_outputs, tiny_bert

LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
FORMATS = ["torch", "torch_dist"]


def _convert(src, dst, **kw):
    return interop.convert(src, dst, progress=False, **kw)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """HF MegatronBertForPreTraining dir, its outputs on the batch, and every Megatron conversion of it."""
    root = tmp_path_factory.mktemp("bert")
    model = tiny_bert()
    model.save_pretrained(root / "hf")
    b = batch()
    megs = {}
    for fmt in FORMATS:
        for tp, pp in LAYOUTS:
            dst = root / f"{fmt}-tp{tp}pp{pp}"
            _convert(root / "hf", dst, tp=tp, pp=pp, format=fmt)
            megs[(fmt, tp, pp)] = dst
    _convert(root / "hf", root / "legacy-tp2pp2", tp=2, pp=2, format="legacy")
    megs[("legacy", 2, 2)] = root / "legacy-tp2pp2"
    _convert(root / "hf", root / "vpp-pp2vpp2", tp=1, pp=2, vpp=2, format="torch")
    megs[("vpp2", 1, 2)] = root / "vpp-pp2vpp2"
    # reshapes: TP2 -> TP1 (torch_dist -> torch) and PP1 -> PP2 (torch)
    interop.reshape(megs[("torch_dist", 2, 1)], root / "reshaped-tp1", tp=1, pp=1, format="torch", progress=False)
    interop.reshape(megs[("torch", 1, 1)], root / "reshaped-pp2", tp=1, pp=2, progress=False)
    megs[("reshaped", 1, 1)] = root / "reshaped-tp1"
    megs[("reshaped", 1, 2)] = root / "reshaped-pp2"
    return root, b, hf_outputs(model, b), megs


def test_hf_to_megatron_every_layout_and_format_back_to_transformers(bert):
    root, b, expected, megs = bert
    for (fmt, tp, pp), meg in megs.items():
        ck = open_checkpoint(meg)
        assert (ck.layout.tp, ck.layout.pp) == (tp, pp), (fmt, tp, pp)
        back = root / f"back-{meg.name}"
        _convert(meg, back)
        config = json.loads((back / "config.json").read_text())
        assert config["architectures"] == ["MegatronBertForPreTraining"] and config["hidden_act"] == "gelu"
        assert_outputs_close(hf_dir_outputs(back, b), expected, b["attention_mask"], msg=f"{fmt} TP{tp}PP{pp}")


def test_megatron_core_bert_loads_every_checkpoint_at_its_layout(bert):
    """Megatron-Core's BertModel, at each checkpoint's own TP x PP, loaded by Megatron-Core's loaders, gives
    Transformers' outputs (also with virtual pipeline chunks); changing the tokens under the padding changes nothing at real positions."""
    _, b, expected, megs = bert
    repadded = dict(b, tokens=b["tokens"].masked_fill(b["attention_mask"] == 0, 7))
    entries = [(str(p), tp, pp, 2 if fmt == "vpp2" else None) for (fmt, tp, pp), p in megs.items()]
    results = run_on_ranks(__import__("tests.bert_ranks", fromlist=["x"]).outputs_at_layouts, 4, entries,
                           [b, repadded], timeout_s=900)[0]
    for (fmt, tp, pp), path in megs.items():
        got, got_repadded = results[str(path)]
        assert_outputs_close(got, expected, b["attention_mask"], msg=f"{fmt} TP{tp}PP{pp}")
        assert_outputs_close(got_repadded, got, b["attention_mask"], atol=1e-6, msg=f"padding {fmt} TP{tp}PP{pp}")


def test_bert_saved_by_megatron_core_at_tp2_converts_to_transformers(tmp_path):
    """Megatron-LM-style args (no interop fields): the family comes from the tensor names; a model without the
    binary head has no token-type table, and HF gets a zero one (exact)."""
    from tests import bert_ranks

    b = batch()
    own = run_on_ranks(bert_ranks.save_with_megatron_core, 2, str(tmp_path), b, timeout_s=900)[0]
    for name, arch in (("pretraining", "MegatronBertForPreTraining"), ("mlm", "MegatronBertForMaskedLM")):
        expected = {k: v for k, v in own[name].items()}
        for fmt in ("torch", "dist"):
            out = tmp_path / f"hf-{name}-{fmt}"
            result = _convert(tmp_path / name / fmt, out, vocab_size=VOCAB)
            assert result.config.family == "bert"
            config = json.loads((out / "config.json").read_text())
            assert config["architectures"] == [arch] and config["layer_norm_eps"] == 1e-5
            assert_outputs_close(hf_dir_outputs(out, b), expected, b["attention_mask"], msg=f"{name} {fmt}")


def test_hand_built_legacy_bert_converts_both_ways(tmp_path):
    """A legacy (pre-Megatron-Core) BERT at TP2 written by hand from the HF tensors, with the 2021–2023 names
    (``input_layernorm``, ``final_layernorm``, ``lm_head.layernorm``), converts to HF with Transformers' outputs,
    and back to legacy."""
    from tests.bert_legacy import write_legacy_bert

    model = tiny_bert(layers=2)
    b = batch()
    expected = hf_outputs(model, b)
    write_legacy_bert(tmp_path / "legacy", model, tp=2)
    _convert(tmp_path / "legacy", tmp_path / "hf", vocab_size=VOCAB)
    assert_outputs_close(hf_dir_outputs(tmp_path / "hf", b), expected, b["attention_mask"], msg="legacy -> HF")
    interop.reshape(tmp_path / "legacy", tmp_path / "legacy-tp1", tp=1, pp=1, vocab_size=VOCAB, progress=False)
    ck = open_checkpoint(tmp_path / "legacy-tp1")
    assert ck.key_style == "legacy"
    assert {"lm_head.bias", "binary_head.weight", "language_model.pooler.dense.weight",
            "language_model.embedding.tokentype_embeddings.weight"} <= set(ck.rank_state(0, 0))
    _convert(tmp_path / "legacy-tp1", tmp_path / "hf2")
    assert_outputs_close(hf_dir_outputs(tmp_path / "hf2", b), expected, b["attention_mask"], msg="legacy TP1 -> HF")


def test_gelu_variant_is_visible_at_this_tolerance():
    """The erf/tanh GELU trap (docs/checkpoint-formats.md §10.2) must be caught by the 1e-5 comparisons above: the same weights with
    tanh GELU differ far beyond it."""
    import transformers

    model = tiny_bert()
    tanh = transformers.MegatronBertForPreTraining(transformers.MegatronBertConfig(
        **{**model.config.to_dict(), "hidden_act": "gelu_new"}))
    tanh.load_state_dict(model.state_dict())
    b = batch()
    diff = (hf_outputs(tanh.eval(), b)["logits"] - hf_outputs(model, b)["logits"]).abs().max()
    assert diff > 10 * 1e-5, diff  # ten times the tolerance of the tests above (measured: 6e-4)
