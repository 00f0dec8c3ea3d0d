"""Megatron-BERT through the library's CLI like GPT: ``convert --verify`` (MLM and binary-head logits through
Transformers and Megatron-Core's BertModel at TP2), ``verify`` on a mismatch, ``inspect`` naming family and heads,
and one-line errors for what an encoder cannot do."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from interop import cli as cli_module
from tests.bert_tiny import tiny_bert


def run(*args):
    return CliRunner().invoke(cli_module.cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-cli")
    tiny_bert(binary_head=False, layers=2).save_pretrained(root / "mlm")
    tiny_bert(binary_head=True, layers=2, seed=0).save_pretrained(root / "pre0")
    tiny_bert(binary_head=True, layers=2, seed=1).save_pretrained(root / "pre1")
    return root


def test_convert_verify_masked_lm_at_tp2_and_inspect(dirs):
    meg = dirs / "mlm-meg"
    r = run("convert", dirs / "mlm", meg, "--tp", "2", "--format", "torch_dist", "--verify", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "verify OK" in r.output
    r = run("inspect", meg, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["family"], info["model_kind"], info["heads"]) == ("bert", "encoder", ["lm_head"])
    r = run("inspect", dirs / "pre0", "--json")
    info = json.loads(r.output)
    assert (info["model_family"], info["heads"]) == ("bert", ["lm_head", "pooler", "binary_head"])
    back = dirs / "mlm-back"
    assert run("convert", meg, back, "--no-progress").exit_code == 0
    assert json.loads((back / "config.json").read_text())["architectures"] == ["MegatronBertForMaskedLM"]


def test_verify_compares_binary_head_too(dirs):
    r = run("verify", dirs / "pre0", dirs / "pre0")
    assert r.exit_code == 0 and "binary_logits 0" in r.output, r.output
    r = run("verify", dirs / "pre0", dirs / "pre1")
    assert r.exit_code == 1 and "MISMATCH" in r.output, r.output


def test_generate_on_an_encoder_is_a_one_line_error(dirs):
    r = run("generate", dirs / "pre0", "--prompt", "hello")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "generate needs a decoder model; bert is encoder-only" in line, r.output
    assert "Traceback" not in r.output


def test_family_without_legacy_layout_is_refused(dirs, tmp_path):
    from tests.test_convert_megatron_model import tiny_hf

    tiny_hf("llama").save_pretrained(tmp_path / "llama")
    r = run("convert", tmp_path / "llama", tmp_path / "out", "--format", "legacy", "--no-progress")
    assert r.exit_code == 2 and "legacy (pre-Megatron-Core) format is supported for bert, gpt2, t5 only" in r.output
    assert not (tmp_path / "out").exists()


def test_train_on_an_encoder_checkpoint_without_tokenizer_is_a_one_line_error(dirs, tmp_path):
    """BERT trains (masked LM), but its indexed data needs the tokenizer's special tokens (synthetic data does
    not): without one, one line."""
    from tests.encoder_train_helpers import write_sentence_corpus

    corpus = write_sentence_corpus(str(tmp_path / "sentences"))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": str(dirs / "pre0"), "tp_degree": 2, "data_path": [corpus],
                               "seq_length": 16}))
    r = run("train", cfg)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "needs a tokenizer" in r.output
