"""TrainConfig loading/overrides and the ``interop train`` command: impossible layouts are one-line errors
(exit 2, before any rank is spawned); a JSONL corpus tokenized on the fly trains through the CLI."""
import json
import os

import pytest
from click.testing import CliRunner

from interop.cli import cli
from trainer.config import TrainConfig
from trainer.errors import TrainConfigError

STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"


def _write(path, data) -> str:
    with open(path, "w") as fh:
        json.dump(data, fh)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tp_degree: 2\narch: {family: llama, hidden_size: 32}\ndata_path: a b\nlr: 1e-3\n")
    cfg = TrainConfig.load_file(str(path))
    assert (cfg.tp_degree, cfg.arch.family, cfg.arch.hidden_size, cfg.data_path) == (2, "llama", 32, ["a", "b"])
    cfg2 = cfg.override({"lr": "3e-4", "arch.num_layers": "6", "sequence_parallelism": "true"})
    assert (cfg2.lr, cfg2.arch.num_layers, cfg2.sequence_parallelism) == (3e-4, 6, True)
    assert cfg.lr == 1e-3 and cfg.arch.num_layers == 2  # the original is untouched
    with pytest.raises(TrainConfigError, match="unknown config field 'nope'"):
        cfg.override({"nope": 1})
    path.write_text("tp_degre: 2\n")
    with pytest.raises(TrainConfigError, match="c.yaml: unknown field"):
        TrainConfig.load_file(str(path))


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"tp_degree": 2, "pp_degree": 2, "world_size": 6}, "world size 6 is not divisible by tp_degree\\*pp_degree = 4"),
        ({"tp_degree": 8}, "num_attention_heads 4 is not divisible by tp_degree 8"),
        ({"pp_degree": 3}, "num_layers 2 is not divisible by pp_degree\\*vpp_degree = 3"),
        ({"world_size": 2, "global_batch_size": 5}, "global_batch_size 5 is not divisible by micro_batch_size\\*dp = 2"),
        ({"sequence_parallelism": True}, "sequence_parallelism needs tp_degree >= 2"),
        ({"vpp_degree": 2}, "vpp_degree > 1 needs pp_degree >= 2"),
        ({"synthetic_data": False}, "no training data"),
    ],
)
def test_impossible_layouts_are_one_line_errors(tmp_path, fields, message):
    base = {"arch": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}, "synthetic_data": True,
            "seq_length": 16}
    base.update(fields)
    result = CliRunner().invoke(cli, ["train", _write(tmp_path / "c.json", base)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(message, result.output), result.output


def test_heads_not_divisible_in_an_hf_checkpoint(tmp_path):
    import transformers

    hf = str(tmp_path / "hf")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=48, n_layer=2, n_head=3,
                                                         n_positions=32)).save_pretrained(hf)
    cfg = _write(tmp_path / "c.json", {"model": hf, "tp_degree": 2, "synthetic_data": True, "seq_length": 16})
    result = CliRunner().invoke(cli, ["train", cfg])
    assert result.exit_code == 2 and "num_attention_heads 3 is not divisible by tp_degree 2" in result.output


def _cli_in_rank(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_cli_trains_on_jsonl_tokenized_on_the_fly(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from interop.launch import run_on_ranks

    sources = [os.path.join(STDLIB, n) for n in ("textwrap.py", "shlex.py", "fnmatch.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train(sources, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "docs.jsonl", "w") as fh:
        for src in sources:
            fh.write(json.dumps({"text": open(src).read()}) + "\n")
    cfg = _write(tmp_path / "c.json", {
        "arch": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 300,
                 "max_position_embeddings": 64},
        "text_path": str(tmp_path / "docs.jsonl"), "tokenizer": str(tmp_path / "tokenizer.json"),
        "seq_length": 32, "micro_batch_size": 4, "global_batch_size": 4, "train_iters": 4, "lr": 5e-3,
        "eval_interval": 4, "eval_iters": 1,
    })
    save = str(tmp_path / "run")
    code, output = run_on_ranks(_cli_in_rank, 1, ["train", cfg, "--save", save, "--no-progress"], timeout_s=300)[0]
    assert code == 0, output
    assert "trained to iteration 4" in output and "perplexity" in output
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_ppl" in r for r in rows)
    assert os.path.getsize(os.path.join(save, "loss.png")) > 1000
    code, output = run_on_ranks(_cli_in_rank, 1, ["train", cfg, "--save", save], timeout_s=300)[0]
    assert code == 2 and "checkpoint already exists" in output  # never overwritten without --force
