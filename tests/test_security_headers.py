"""Safetensors headers are validated by safetensors' own rules (issue 16 item 8).

Each hostile header is refused by our reader with one line naming the file (and the tensor where there is one) —
and, as the independent oracle, by the ``safetensors`` library itself, so our rules are no looser than the
producer's. Before the fix, negative offsets and overlapping ranges converted to wrong weights with exit 0.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.checkpoint.hf import read_safetensors_header
from formats.errors import FormatError
from interop.cli import cli


def _write(path: Path, header, data: bytes, raw_header: bytes | None = None, length: int | None = None) -> Path:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _genuine_header():
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}


DATA = torch.arange(6.0).numpy().tobytes() + torch.ones(4, dtype=torch.float16).numpy().tobytes()


def _mutated(change):
    header = _genuine_header()
    change(header)
    return header


BAD = {  # name -> (header, data, raw header, declared length, text the error names)
    "negative-offset": (_mutated(lambda h: h["b"].update(data_offsets=[-8, 0])), DATA, None, None, "'b'"),
    "overlap": (_mutated(lambda h: h["b"].update(data_offsets=[16, 24], shape=[4])), DATA[:24], None, None, "'b'"),
    "offsets-as-strings": (_mutated(lambda h: h["a"].update(data_offsets=["0", "24"])), DATA, None, None, "'a'"),
    "reversed": (_mutated(lambda h: h["b"].update(data_offsets=[32, 24])), DATA, None, None, "'b'"),
    "size-not-dtype-times-shape": (_mutated(lambda h: h["a"].update(shape=[2, 2])), DATA, None, None, "'a'"),
    "gap": (_mutated(lambda h: h["b"].update(data_offsets=[26, 34])), DATA + b"\0\0", None, None, "'b'"),
    "float-shape": (_mutated(lambda h: h["a"].update(shape=[2.0, 3])), DATA, None, None, "'a'"),
    "bool-offset": (_mutated(lambda h: h["a"].update(data_offsets=[False, 24])), DATA, None, None, "'a'"),
    "negative-shape": (_mutated(lambda h: h["a"].update(shape=[-2, -3])), DATA, None, None, "'a'"),
    "unknown-dtype": (_mutated(lambda h: h["a"].update(dtype="F128")), DATA, None, None, "'a'"),
    "missing-field": (_mutated(lambda h: h["a"].pop("shape")), DATA, None, None, "'a'"),
    "truncated-data": (_genuine_header(), DATA[:-1], None, None, "truncated"),
    "trailing-data": (_genuine_header(), DATA + b"\0" * 8, None, None, "after the last tensor"),
    "header-beyond-file": (_genuine_header(), DATA, None, 10_000, "header of 10000 bytes"),
    "absurd-header-size": (_genuine_header(), DATA, None, 2**62, "limit"),
    "non-dict-header": (None, DATA, b"[1, 2, 3]", None, "does not start with"),
    "not-json": (None, DATA, b"{nope", None, "corrupt safetensors header"),
    "not-utf8": (None, DATA, b'{"\xff": 1}', None, "corrupt safetensors header"),
    "bad-metadata": (_mutated(lambda h: h.update(__metadata__={"format": 1})), DATA, None, None, "__metadata__"),
    "entry-not-a-dict": (_mutated(lambda h: h.update(a=[0, 24])), DATA, None, None, "'a'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_hostile_header_is_refused_like_safetensors_does(tmp_path, case):
    from safetensors import safe_open

    header, data, raw, length, named = BAD[case]
    path = _write(tmp_path / "model.safetensors", header, data, raw, length)
    with pytest.raises(FormatError) as err:
        read_safetensors_header(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and named in message, message
    with pytest.raises(Exception):  # the producer's own reader refuses the same file
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def test_genuine_headers_pass_and_agree_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"w": torch.randn(3, 5), "b": torch.randn(5).half(), "e": torch.empty(0, 4), "i": torch.arange(7)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "m.safetensors")
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert {k: (v["shape"], v["dtype"]) for k, v in header.items()} == {
        k: (list(t.shape), {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}[t.dtype])
        for k, t in loaded.items()}


@pytest.mark.parametrize("case", ["negative-offset", "overlap", "offsets-as-strings", "reversed",
                                  "size-not-dtype-times-shape"])
def test_convert_and_inspect_refuse_in_one_line(tmp_path, case):
    """The cases that used to convert to wrong weights (exit 0) or give tracebacks, through the CLI."""
    from tests.ckpt_hf import tiny_gpt2

    model_dir = tmp_path / "hf"
    tiny_gpt2().save_pretrained(model_dir)
    header, data, raw, length, named = BAD[case]
    path = model_dir / "model.safetensors"
    original = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    ordered = sorted((k for k in original if k != "__metadata__"), key=lambda k: original[k]["data_offsets"][0])
    second, third = ordered[1], ordered[2]
    if case == "negative-offset":
        original[third]["data_offsets"] = [-original[third]["data_offsets"][1], 0]
    elif case == "overlap":
        a, b = original[second]["data_offsets"]
        original[third]["data_offsets"] = [a, a + original[third]["data_offsets"][1] - original[third]["data_offsets"][0]]
    elif case == "offsets-as-strings":
        original[third]["data_offsets"] = [str(o) for o in original[third]["data_offsets"]]
    elif case == "reversed":
        original[third]["data_offsets"] = original[third]["data_offsets"][::-1]
    else:
        original[third]["shape"] = [1] + original[third]["shape"][1:]
    body = path.read_bytes()[8 + struct.unpack("<Q", path.read_bytes()[:8])[0]:]
    _write(path, original, body)
    for args in (["inspect", model_dir, "--tensors"], ["convert", model_dir, tmp_path / "out"]):
        result = CliRunner().invoke(cli, [*map(str, args)])
        assert result.exit_code == 2, result.output[-2000:]
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error:") and "model.safetensors" in line and "Traceback" not in result.output
        assert repr(third) in line or repr(second) in line, line
    assert not (tmp_path / "out").exists()
