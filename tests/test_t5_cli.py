"""``interop generate`` on T5 checkpoints (HF and Megatron): greedy tokens equal Transformers' own ``generate``;
beam search and sampling run through ``trainer.generate_seq2seq``."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from interop.cli import cli
from interop.conversion import convert
from tests.t5_helpers import GEN_DECODER_LAYERS, GEN_EOS, PAD, VOCAB, tiny_t5

PROMPTS = ["t5 t17 t33 t2 t9 t41 t12 t70 t8", "t7 t3 t44", "t60 t22 t8 t14 t90 t31"]
NEW = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = tiny_t5("1.0", decoder_layers=GEN_DECODER_LAYERS)
    root = tmp_path_factory.mktemp("t5gen")
    model.save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    convert(root / "hf", root / "meg", tp=2, format="torch_dist", progress=False)
    return root, model, tok


def _generate(path, *args):
    result = CliRunner().invoke(cli, ["generate", str(path), *(a for p in PROMPTS for a in ("--prompt", p)),
                                      "--max-new-tokens", str(NEW), "--eos-id", str(GEN_EOS["1.0"]), "--json",
                                      *map(str, args)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _reference(model, tok, prompt: str, **kwargs) -> list[int]:
    ids = torch.tensor([tok.encode(prompt).ids])
    eos = GEN_EOS["1.0"]
    with torch.no_grad():
        row = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, eos_token_id=eos,
                             pad_token_id=PAD, decoder_start_token_id=PAD, **kwargs)[0, 1:].tolist()
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("which", ["hf", "meg"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, which):
    root, model, tok = checkpoint
    out = _generate(root / which, *(("--tp", 2) if which == "meg" else ()))
    assert [o["prompt"] for o in out] == PROMPTS
    for o in out:
        assert o["tokens"] == _reference(model, tok, o["prompt"], do_sample=False)


def test_beam_and_sampling(checkpoint):
    root, model, tok = checkpoint
    beams = _generate(root / "hf", "--num-beams", 3)
    for o in beams:
        assert o["tokens"] == _reference(model, tok, o["prompt"], do_sample=False, num_beams=3)
        assert o["score"] is not None
    sampled = _generate(root / "hf", "--sample", "--top-k", 5, "--seed", 7)
    again = _generate(root / "hf", "--sample", "--top-k", 5, "--seed", 7)
    assert [o["tokens"] for o in sampled] == [o["tokens"] for o in again]
    assert all(1 <= len(o["tokens"]) <= NEW for o in sampled)


def test_inspect_verify_and_pp_error_on_the_command_line(checkpoint, tmp_path):
    root, _, _ = checkpoint
    shown = CliRunner().invoke(cli, ["inspect", str(root / "meg"), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert (info["model_family"], info["model_kind"]) == ("t5", "encoder-decoder")
    checked = CliRunner().invoke(cli, ["verify", str(root / "hf"), str(root / "meg")])
    assert checked.exit_code == 0 and "verify OK" in checked.output, checked.output
    refused = CliRunner().invoke(cli, ["convert", str(root / "hf"), str(tmp_path / "pp2"), "--pp", "2"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "error: PP=2: Megatron-Core's T5Model runs without pipeline parallelism (use PP=1)"]
    assert not (tmp_path / "pp2").exists()
