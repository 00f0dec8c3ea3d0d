"""Issue 16 item 10: foreign Megatron checkpoints convert to HF at their TRUE vocabulary with no flag.

Oracles: for the Transformers-reshaping-script checkpoint, the HF model it was made from (Transformers' own
forward) and ``interop.verify`` (a Megatron-Core GPTModel at the source layout); for the Megatron-LM NullTokenizer
checkpoint, the logits of the very Megatron-Core model that saved it.
"""
from __future__ import annotations

import json
import types

import pytest
import torch
from click.testing import CliRunner

from interop import cli as cli_module
from interop.errors import ConversionError
from interop.vocab import GPT2_BPE_VOCAB, infer_vocab, true_vocab_size
from tests import vocab_producers as vp


def run(*args):
    return CliRunner().invoke(cli_module.cli, [str(a) for a in args])


def hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vp.TRUE_V, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def script_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("script")
    hf = vp.hf_gpt2(root / "hf")
    return hf, vp.reshaping_script_checkpoint(hf, root / "megatron", tp=2, pp=1)


def test_reshaping_script_checkpoint_exports_true_vocab(script_ckpt, tmp_path):
    import interop

    hf, src = script_ckpt
    r = run("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    vocab = json.loads(r.output)["vocab_size"]
    assert (vocab["true"], vocab["padded"]) == (vp.TRUE_V, 1024) and "orig_vocab_size" in vocab["source"]
    out = tmp_path / "hf-out"
    r = run("convert", src, out, "--no-progress")  # no --vocab-size
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vp.TRUE_V
    t = tokens()
    want, got = hf_logits(hf, t), hf_logits(out, t)
    assert got.shape == want.shape == (2, 12, vp.TRUE_V)
    assert (got - want).abs().max().item() <= 1e-5
    assert interop.verify(src, out).ok  # Megatron-Core at TP2 vs Transformers


@pytest.fixture(scope="module")
def null_tokenizer_ckpt(tmp_path_factory):
    from interop.launch import run_on_ranks

    root = tmp_path_factory.mktemp("nulltok") / "megatron"
    t = tokens(1)
    results = run_on_ranks(vp.megatron_lm_null_tokenizer, 2, str(root), 2, t)
    logits = next(r for r in results if r is not None)
    assert logits.shape == (2, 12, vp.padded(vp.TRUE_V, 2))
    return root, t, logits


def test_megatron_lm_null_tokenizer_checkpoint_exports_true_vocab(null_tokenizer_ckpt, tmp_path):
    root, t, logits = null_tokenizer_ckpt
    r = run("inspect", root)
    assert r.exit_code == 0, r.output
    assert "true=1000, padded=1024" in r.output and "NullTokenizer" in r.output
    out = tmp_path / "hf"
    r = run("convert", root, out, "--no-progress")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == vp.TRUE_V and config["model_type"] == "llama"
    got = hf_logits(out, t)
    assert (got - logits[..., : vp.TRUE_V]).abs().max().item() <= 1e-5


def test_unknown_vocab_is_one_line_error(script_ckpt, tmp_path):
    """Without orig_vocab_size and tokenizer_type nothing tells V: refuse in one line, then --vocab-size works."""
    hf, _ = script_ckpt
    src = vp.reshaping_script_checkpoint(hf, tmp_path / "bare", tp=1, pp=1)
    rank = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank, weights_only=False)
    del state["args"].orig_vocab_size, state["args"].tokenizer_type
    torch.save(state, rank)
    r = run("inspect", src, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["vocab_size"]["true"] is None
    r = run("convert", src, tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "cannot tell the true vocabulary size" in lines[0] and "--vocab-size" in lines[0]
    assert not (tmp_path / "out").exists()
    r = run("convert", src, tmp_path / "out", "--vocab-size", vp.TRUE_V, "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vp.TRUE_V


# ---------------------------------------------------------------------------------------------------------------
# the rules of interop.vocab (docs/checkpoint-formats.md §10.1), on args alone


def fake(tmp_path, **args):
    it = tmp_path / "save" / "iter_0000001"
    it.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(args=types.SimpleNamespace(**args), path=it)


def test_hf_tokenizer_beside_the_checkpoint_counts_added_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    tok.add_special_tokens(["<eos>", "<pad>"])
    (tmp_path / "save" / "tok").mkdir(parents=True)
    tok.save(str(tmp_path / "save" / "tok" / "tokenizer.json"))
    ckpt = fake(tmp_path, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tok", padded_vocab_size=384)
    info = infer_vocab(ckpt)
    assert (info.true, info.padded) == (302, 384) and "HuggingFaceTokenizer" in info.source
    gone = fake(tmp_path, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="org/model-on-the-hub",
                padded_vocab_size=384)
    with pytest.raises(ConversionError, match="not readable beside the checkpoint.*--vocab-size N"):
        true_vocab_size(gone)


@pytest.mark.parametrize("args, want", [
    (dict(true_vocab_size=1000, orig_vocab_size=7), 1000),
    (dict(orig_vocab_size=1000, tokenizer_type="GPT2BPETokenizer"), 1000),
    (dict(tokenizer_type="NullTokenizer", vocab_size=999), 1000),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent/gpt2-vocab.json"), GPT2_BPE_VOCAB),
])
def test_producer_conventions(tmp_path, args, want):
    assert true_vocab_size(fake(tmp_path, padded_vocab_size=50304, **args)) == want


def test_true_vocab_larger_than_the_stored_rows_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="exceeds the 1024 stored rows"):
        true_vocab_size(fake(tmp_path, tokenizer_type="NullTokenizer", vocab_size=2000, padded_vocab_size=1024))
