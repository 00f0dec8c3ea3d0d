"""BLOOM and StarCoder through the command line: ``interop train`` on each family's HF checkpoint (first-step loss
from metrics.jsonl equals Transformers' loss on the same batch, and the model trains) and ``interop generate``
(greedy tokens equal Transformers' generate, left-padded prompts of uneven length, on the fast decode engine).

Training runs at TP2, so ``train`` launches its own gloo ranks and nothing distributed stays in this process."""
from __future__ import annotations

import json
import string

import pytest
from click.testing import CliRunner

from interop.cli import cli
from tests.alibi_mqa_tiny import peaked, tiny_bloom, tiny_starcoder, transformers_first_loss
from tests.generate_helpers import hf_generate

# rank variables an earlier in-process test may have left: with them ``train`` believes it runs under torchrun
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")
PROMPTS = ["def f(x):", "ab", "x = 1 + 2", "q"]
FAMILIES = {"bloom": tiny_bloom, "starcoder": tiny_starcoder}


def run(*args):
    return CliRunner(env={var: None for var in LAUNCHER_VARS}).invoke(cli, [str(a) for a in args])


def char_tokenizer(path):
    """One token per character, ids clear of the peaked models' PAD 0, BOS 1 and EOS 78 (vocabulary 96)."""
    from tokenizers import Tokenizer, models

    ids = [i for i in range(2, 96) if i != 78]
    chars = string.ascii_letters + string.digits + " ():=+-*/.,_"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 78, **{c: ids[n] for n, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.save(str(path / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_cli_first_loss_equals_transformers(family, tmp_path):
    from trainer.config import TrainConfig

    model = FAMILIES[family]()
    model.save_pretrained(tmp_path / "hf")
    fields = dict(model=str(tmp_path / "hf"), tp_degree=2, seq_length=16, micro_batch_size=2, global_batch_size=4,
                  synthetic_data=True, train_iters=3, lr=1e-3, seed=3, plot=False, log_interval=1)
    (tmp_path / "train.json").write_text(json.dumps(fields))
    r = run("train", tmp_path / "train.json", "--log-dir", tmp_path / "logs", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "trained to iteration 3" in r.output, r.output
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3
    expected = transformers_first_loss(model, TrainConfig(**fields))
    assert losses[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert losses[-1] < losses[0]  # it trained


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_cli_greedy_equals_transformers_on_the_fast_engine(family, tmp_path, monkeypatch):
    from trainer import generate_fast

    hf = peaked(family)
    hf.save_pretrained(tmp_path / "hf")
    tok = char_tokenizer(tmp_path / "hf")
    built = []
    original = generate_fast.FastStepper.__init__

    def spy(self, *args, **kwargs):
        built.append(args[1])  # the GPTModel the fast engine serves
        original(self, *args, **kwargs)

    monkeypatch.setattr(generate_fast.FastStepper, "__init__", spy)
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    r = run("generate", tmp_path / "hf", *args, "--max-new-tokens", 10, "--json")
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["prompt"] for o in out] == PROMPTS
    ids = [tok.encode(p).ids for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1  # uneven: left padding in one batch
    assert [o["tokens"] for o in out] == hf_generate(hf, ids, max_new_tokens=10)
    assert len(built) == 1  # one generate call, on the fast engine
