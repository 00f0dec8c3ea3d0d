"""``interop generate`` end to end: an HF checkpoint on disk with a tokenizer trained here on stdlib sources."""
import json
import os
import sysconfig

import pytest
import torch
from click.testing import CliRunner

from interop.cli import cli

PROMPTS = ["def main(", "import os\nclass "]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, n) for n in ("os.py", "argparse.py", "json/__init__.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gen") / "hf"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model, tok


def _run(*args):
    result = CliRunner().invoke(cli, ["generate", *map(str, args)])
    return result


def _completions(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_greedy_cli_equals_transformers(checkpoint):
    path, model, tok = checkpoint
    out = _completions(_run(path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", 10, "--json"))
    assert [o["prompt"] for o in out] == PROMPTS
    for o in out:
        ids = torch.tensor([tok.encode(o["prompt"]).ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=0, pad_token_id=0)[0, ids.size(1):].tolist()
        ref = ref[: ref.index(0) + 1] if 0 in ref else ref
        assert o["tokens"] == ref
        assert o["completion"] == tok.decode([t for t in ref if t != 0])


def test_beam_sampling_and_prompts_file(checkpoint, tmp_path):
    path, _, _ = checkpoint
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    beam = _completions(_run(path, "--prompts-file", prompts, "--num-beams", 3, "--num-return-sequences", 2,
                             "--length-penalty", 0.6, "--max-new-tokens", 6, "--json"))
    assert len(beam) == 4 and beam[0]["score"] >= beam[1]["score"]
    args = [path, "--prompt", PROMPTS[0], "--sample", "--top-p", 0.9, "--top-k", 50, "--top-p-decay", 0.9,
            "--top-p-bound", 0.3, "--temperature", 0.8, "--max-new-tokens", 8, "--json", "--logprobs"]
    a, b = _completions(_run(*args, "--seed", 5)), _completions(_run(*args, "--seed", 5))
    assert a == b and len(a[0]["logprobs"]) == len(a[0]["tokens"])


def test_tp2_cli_launches_ranks(checkpoint):
    path, _, _ = checkpoint
    args = [path, "--prompt", PROMPTS[1], "--max-new-tokens", 6, "--json"]
    assert _completions(_run(*args, "--tp", 2)) == _completions(_run(*args))


@pytest.mark.parametrize("problem", ["empty-dir", "bad-tokenizer", "no-prompt", "too-long", "bad-layout"])
def test_bad_input_is_one_line_error(checkpoint, tmp_path, problem):
    path, _, _ = checkpoint
    args = {
        "empty-dir": [tmp_path, "--prompt", "x"],
        "bad-tokenizer": [path, "--prompt", "x", "--tokenizer", tmp_path / "nope.json"],
        "no-prompt": [path],
        "too-long": [path, "--prompt", "x", "--max-new-tokens", 500],
        "bad-layout": [path, "--prompt", "x", "--tp", 3],
    }[problem]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "rror" in result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_checkpoint_at_tp2_pp2_gives_the_same_tokens(checkpoint, tmp_path, fmt):
    """A Megatron checkpoint written by the converter (TP2 x PP2) generates what its HF source generates;
    the tokenizer travels with it."""
    from interop.conversion import convert

    path, _, _ = checkpoint
    megatron = tmp_path / "megatron"
    convert(path, megatron, tp=2, pp=2, format=fmt, progress=False)
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", 8, "--json"]
    assert _completions(_run(megatron, *args)) == _completions(_run(path, *args))
