"""`interop convert/reshape/verify` on the command line: outputs, exit codes, one-line errors, nothing half-written."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from interop import cli as cli_module
from tests.test_convert_megatron_model import tiny_hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a, b = root / "a", root / "b"
    tiny_hf("llama", seed=0).save_pretrained(a)
    tiny_hf("llama", seed=1).save_pretrained(b)
    (a / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return root, a, b


def run(*args):
    result = CliRunner().invoke(cli_module.cli, [str(a) for a in args])
    return result


def test_convert_verify_and_back_carries_side_files(hf_dirs):
    root, a, _ = hf_dirs
    meg = root / "meg"
    r = run("convert", a, meg, "--tp", "2", "--format", "torch", "--verify", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "as torch at TP2xPP1" in r.output and "verify OK" in r.output
    assert (meg / "tokenizer" / "tokenizer_config.json").is_file()
    back = root / "back"
    r = run("convert", meg, back, "--max-shard-size", "100KB", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (back / "model.safetensors.index.json").is_file()
    assert json.loads((back / "tokenizer_config.json").read_text()) == {"model_max_length": 32}
    assert json.loads((back / "config.json").read_text())["num_key_value_heads"] == 2
    from transformers import AutoModelForCausalLM

    from tests.test_convert_megatron_model import hf_logits

    original = AutoModelForCausalLM.from_pretrained(a)
    reloaded = AutoModelForCausalLM.from_pretrained(back)  # sharded safetensors written by our streaming writer
    assert torch.equal(hf_logits(original), hf_logits(reloaded))
    r = run("reshape", meg, root / "re", "--tp", "1", "--pp", "2", "--format", "torch_dist", "--no-progress")
    assert r.exit_code == 0 and "dropped" in r.output, r.output


def test_verify_mismatch_exits_1(hf_dirs):
    _, a, b = hf_dirs
    r = run("verify", a, a)
    assert r.exit_code == 0 and "max |logit diff| = 0 " in r.output
    r = run("verify", a, b)
    assert r.exit_code == 1 and "MISMATCH" in r.output


def test_bad_inputs_are_one_line_errors_and_write_nothing(hf_dirs, tmp_path):
    root, a, _ = hf_dirs
    existing = tmp_path / "exists"
    existing.mkdir()
    r = run("convert", a, existing)
    assert r.exit_code == 2 and "output exists" in r.stderr
    r = run("convert", a, tmp_path / "tp3", "--tp", "3")
    assert r.exit_code == 2 and "TP=3 does not divide" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "tp3").exists() and not list(tmp_path.glob("tp3*"))
    r = run("convert", a, tmp_path / "leg", "--format", "legacy")
    assert r.exit_code == 2 and "legacy" in r.stderr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    r = run("convert", bert, tmp_path / "x")
    assert r.exit_code == 2 and "unsupported HF model_type 'bert'" in r.stderr
    r = run("reshape", a, tmp_path / "y", "--tp", "1", "--pp", "1")
    assert r.exit_code == 2 and "needs a Megatron checkpoint" in r.stderr


def test_missing_tensor_is_reported_before_writing(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, a, _ = hf_dirs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((a / "config.json").read_text())
    state = load_file(a / "model.safetensors")
    del state["model.layers.3.self_attn.k_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    r = run("convert", broken, tmp_path / "out")
    assert r.exit_code == 2 and "model.layers.3.self_attn.k_proj.weight" in r.stderr
    assert not list(tmp_path.glob("out*"))


def test_shape_mismatch_names_the_source(hf_dirs, tmp_path):
    import json as _json

    _, a, _ = hf_dirs
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = _json.loads((a / "config.json").read_text())
    conf["intermediate_size"] = 128  # the stored MLP weights are 96 wide
    (bad / "config.json").write_text(_json.dumps(conf))
    (bad / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    r = run("convert", bad, tmp_path / "out", "--no-progress")
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {bad}: ") and "linear_fc1.weight" in r.stderr
    assert not list(tmp_path.glob("out*"))
