"""``interop generate`` on a T5 that Megatron-Core saved with its own local spec (what Megatron-LM trains without
Transformer Engine: learned absolute positions, LayerNorm, linear biases, no final norms): greedy tokens equal
Megatron-Core's own ``T5Model.forward`` argmax loop; the fast engine declines it with the reason named and the
Megatron-Core-module path runs it."""
from __future__ import annotations

import json

from click.testing import CliRunner

from interop.cli import cli
from interop.launch import run_on_ranks
from tests import t5_family_ranks as ranks

INPUTS = [[5, 17, 33, 2, 9, 41, 12, 70, 8], [7, 3, 44], [60, 22, 8, 14, 90, 31]]
NEW = 6


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, ranks.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_generate_on_a_local_spec_t5_equals_megatron_core_argmax_loop(tmp_path):
    reference = run_on_ranks(ranks.save_tp1_and_greedy_reference, 1, str(tmp_path / "meg"), INPUTS, NEW,
                             timeout_s=600)[0]
    reason = reference.pop("reason")
    assert reason is not None and "learned_absolute" in reason  # the fast engine declines it, naming why
    assert len({tuple(t) for t in reference.values()}) == len(INPUTS)  # the input matters
    assert all(len(set(t)) > 1 for t in reference.values())  # and the decoder position
    _tokenizer(tmp_path / "tokenizer.json")
    prompts = [" ".join(f"t{i}" for i in row) for row in INPUTS]
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "meg" / "torch"), "--tokenizer",
                                      str(tmp_path / "tokenizer.json"), "--max-new-tokens", str(NEW), "--eos-id",
                                      str(ranks.VOCAB - 1), "--json", *(a for p in prompts for a in ("--prompt", p))])
    assert result.exit_code == 0, result.output
    tokens = [json.loads(line)["tokens"] for line in result.stdout.splitlines()]
    assert tokens == [reference[i] for i in range(len(INPUTS))]
