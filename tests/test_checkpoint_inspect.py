"""``interop inspect`` on real artifacts, its error path, and the size bounds on a >= 1 GB checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from interop.cli import cli
from tests import ckpt_big, ckpt_hf, ckpt_legacy


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = ckpt_hf.tiny_llama()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path, model


def test_inspect_hf_json_and_text(hf_dir):
    path, model = hf_dir
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json", "--tensors"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    stored = ckpt_hf.stored_state(model)
    assert (info["kind"], info["format"], info["family"]) == ("hf", "safetensors", "llama")
    assert info["parameters"] == sum(t.numel() for t in stored.values())
    assert info["vocab_size"] == {"config": 96, "embedding_rows": 96}
    assert {t["name"]: tuple(t["shape"]) for t in info["tensors"]} == {k: tuple(v.shape) for k, v in stored.items()}
    text = CliRunner().invoke(cli, ["inspect", str(path)])
    assert text.exit_code == 0 and "family             llama" in text.output and "\ntensors\n" not in text.output


def test_inspect_legacy_megatron(tmp_path):
    ckpt_legacy.write_legacy(tmp_path, tp=2, pp=2)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["format"], info["key_style"], info["family"], info["iteration"]) == ("torch", "legacy", "gpt2", 20)
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2
    assert info["vocab_size"]["padded"] == ckpt_legacy.VOCAB


def test_inspect_errors_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert str(tmp_path) in result.output


@pytest.fixture(scope="module")
def megatron_1gb(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "megatron"
    assert ckpt_big.write_megatron(path) >= 10**9
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "megatron"])
def test_inspect_1gb_is_small_and_one_tensor_reads_one_tensor(tmp_path, kind, request):
    if kind == "hf":
        path = tmp_path / kind
        assert ckpt_big.write_sparse_safetensors(path) >= 10**9
    else:
        path = request.getfixturevalue("megatron_1gb")
    _, peak, out = ckpt_big.peak_rss_of(
        "import torch\nfrom interop.cli import main\n"
        f"try:\n    main(['inspect', {str(path)!r}, '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
    )
    info = json.loads(out[: out.rindex("}") + 1])
    assert info["bytes"] >= 10**9
    # the speed target (< 5 s, checkpoint-dependent work < 1 s) is measured by tools/bench/bench_checkpoint.py,
    # not asserted here: wall time on a shared 2-core CI box says nothing. Memory is deterministic enough to test.
    assert peak < 300 * 2**20, f"inspect peak RSS {peak / 2**20:.0f} MiB"
    name = "decoder.final_layernorm.weight" if kind == "megatron" else "model.layers.3.mlp.up_proj.weight"
    _, peak_one, out = ckpt_big.peak_rss_of(
        "import resource, torch\nfrom formats.checkpoint import open_checkpoint\n"
        f"c = open_checkpoint({str(path)!r})\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"t = c.load({name!r})\nprint('SUM', float(t.sum()), t.numel())\n"
    )
    one = ckpt_big.ROWS * ckpt_big.COLS * 4 if kind == "hf" else ckpt_big.COLS * 4
    # peak stays far below the checkpoint: the whole file would be >= 1 GB
    assert peak_one < 300 * 2**20 + one, f"{peak_one / 2**20:.0f} MiB"
    expected = float(torch.arange(ckpt_big.COLS).sum()) if kind == "megatron" else 0.0
    assert f"SUM {expected}" in out


@pytest.mark.slow
def test_reading_every_tensor_of_1gb_keeps_one_tensor_resident(megatron_1gb):
    """Tensor-by-tensor reading of a >= 1 GB rank file: peak RSS ~ interpreter + one tensor, not the file."""
    path = megatron_1gb
    _, peak, out = ckpt_big.peak_rss_of(
        "from formats.checkpoint import open_checkpoint\n"
        f"c = open_checkpoint({str(path)!r})\nn = 0\n"
        "for i in c.rank_tensors(0, 0):\n    n += c.load_rank_tensor(i.name, 0, 0).numel()\nprint('N', n)\n"
    )
    assert f"N {ckpt_big.COUNT * ckpt_big.ROWS * ckpt_big.COLS + ckpt_big.COLS}" in out
    one = ckpt_big.ROWS * ckpt_big.COLS * 4
    assert peak < 300 * 2**20 + 2 * one, f"peak RSS {peak / 2**20:.0f} MiB for a {ckpt_big.COUNT * one / 2**30:.2f} GiB file"
