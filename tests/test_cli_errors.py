"""Hostile or broken inputs across commands are one line, exit 2, no traceback (issue 16, items 13 and 15),
and the CLI's error printer itself: OS errors, rank failures, progress bars, unexpected bugs, warnings."""
from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import shutil

import click
import numpy as np
import pytest

from interop import cli as cli_module
from tests.sec_cli_helpers import cli, cli_process, make_hf, one_line_error


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    hf = make_hf(root / "hf")
    meg = root / "meg"
    assert cli("convert", hf, meg, "--no-progress").exit_code == 0
    return root, hf, meg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_4000_digit_tracker(ckpts, tmp_path, command):
    _, _, meg = ckpts
    bad = _copy(meg, tmp_path / "bad")
    (bad / "latest_checkpointed_iteration.txt").write_text("9" * 4000)
    args = [command, bad] + ([tmp_path / "out", "--no-progress"] if command == "convert" else [])
    line = one_line_error(cli(*args), "latest_checkpointed_iteration.txt", "at most 18 digits")
    assert len(line) < 400


def test_metadata_json_holding_a_list(ckpts, tmp_path):
    _, _, meg = ckpts
    bad = _copy(meg, tmp_path / "bad")
    (bad / "release" / "metadata.json").write_text("[1, 2]")
    for args in (["inspect", bad], ["convert", bad, tmp_path / "out", "--no-progress"]):
        one_line_error(cli(*args), "metadata.json", "JSON object")


def test_a_dcp_storage_length_of_2_to_the_62(ckpts, tmp_path):
    _, _, meg = ckpts
    bad = _copy(meg, tmp_path / "bad")
    path = bad / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # written by us from torch's own classes; we rewrite one length
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], length=2**62)
    path.write_bytes(pickle.dumps(metadata))
    one_line_error(cli("convert", bad, tmp_path / "out", "--no-progress"), "__0_0.distcp", "the file has")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import glob
    import os
    import sysconfig

    from interop.data.train_tokenizer import train_bpe_tokenizer

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    return train_bpe_tokenizer(files, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "bad crc"])
def test_corrupt_gz_preprocess_input(tokenizer, tmp_path, damage):
    good = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(50)))
    data = {"truncated": good[: len(good) // 2], "not gzip": b"this is not gzip at all" * 10,
            "bad crc": good[:-8] + b"\0" * 8}[damage]
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(data)
    result = cli("data", "preprocess", "--input", path, "--tokenizer", tokenizer, "--output-prefix",
                 tmp_path / "out")
    one_line_error(result, "in.jsonl.gz", "cannot read input")
    assert "Aborted" not in result.output and not list(tmp_path.glob("out*"))


def test_data_inspect_of_a_backwards_document_index(tmp_path):
    from tests.test_trainer_helpers import write_corpus

    prefix = write_corpus(str(tmp_path / "c"), docs=20)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    n, d = (int(x) for x in np.frombuffer(bytes(raw[18:34]), np.uint64))
    at = 34 + 12 * n
    doc = np.frombuffer(bytes(raw[at:at + 8 * d]), np.int64).copy()
    doc[1:-1] = doc[1:-1][::-1]
    raw[at:at + 8 * d] = doc.tobytes()
    open(prefix + ".idx", "wb").write(raw)
    one_line_error(cli("data", "inspect", prefix), "c.idx", "document index")


# ----------------------------------------------------------------------------------------------- the printer
def _with_command(monkeypatch, name, fn):
    command = click.command(name)(fn)
    monkeypatch.setitem(cli_module.COMMANDS, name, f"{__name__}:{name}")
    globals()[name] = command


def test_os_errors_unexpected_errors_and_rank_failures_are_one_line(monkeypatch):
    from interop.launch import RankFailure
    from trainer.errors import TrainConfigError  # noqa: F401 - registers the subclass by name

    def oserror():
        raise IsADirectoryError(21, "Is a directory", "/tmp/somewhere")

    def bug():
        raise KeyError("oops")

    def rank():
        raise RankFailure("rank 1 failed: TrainConfigError: /data/x: token id 9 is outside", "Traceback ...")

    for name, fn in (("oserror_cmd", oserror), ("bug_cmd", bug), ("rank_cmd", rank)):
        _with_command(monkeypatch, name, fn)
    one_line_error(cli("oserror_cmd"), "error: /tmp/somewhere: Is a directory")
    r = cli("bug_cmd")
    assert r.exit_code == 1 and r.stderr.startswith("error: internal error KeyError") and "Traceback" not in r.output
    assert "--debug" in r.stderr and r.stderr.count("\n") == 1
    assert isinstance(cli("--debug", "bug_cmd").exception, KeyError)
    assert one_line_error(cli("rank_cmd")) == "error: /data/x: token id 9 is outside"


def test_an_error_after_a_progress_bar_starts_on_its_own_line(monkeypatch):
    from formats.errors import FormatError

    def failing_with_bar():
        from tqdm import tqdm

        bar = tqdm(total=10, desc="convert")
        bar.update(3)
        raise FormatError("truncated", path="/x.safetensors")

    _with_command(monkeypatch, "bar_cmd", failing_with_bar)
    r = cli("bar_cmd")
    assert r.exit_code == 2
    assert "\nerror: /x.safetensors: truncated\n" in "\n" + r.stderr.replace("\r", "\n")
    assert r.stderr.splitlines()[-1] == "error: /x.safetensors: truncated"


def test_dependency_warnings_are_silenced_ours_are_not(ckpts):
    _, hf, meg = ckpts
    result = cli_process("verify", hf, meg, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "apex" not in result.stderr.lower(), result.stderr
    import sys
    import warnings

    from interop.cli.quiet import silence_dependency_warnings

    saved = list(sys.warnoptions)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_dependency_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("ours stays", UserWarning)
    sys.warnoptions[:] = saved
    assert [str(w.message) for w in seen] == ["ours stays"]
