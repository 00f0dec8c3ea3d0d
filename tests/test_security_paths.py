"""Paths a checkpoint names stay inside it (issue 16 item 4), and tensor data carries its zip CRC (item 9).

A secret file outside the checkpoint must never be read as weights nor copied into an output: an HF index entry or a
DCP ``relative_path`` of ``../x`` or ``/abs/x``, and symlinks (tokenizer files, weight files, rank files) that lead
out, are refused with one line naming the entry. The Hugging Face hub cache layout (``snapshots/<rev>/`` symlinks into
``blobs/``) keeps working. A flipped bit in a ``.pt`` or ``.distcp`` tensor record is refused naming file and record.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.checkpoint import open_checkpoint
from interop.cli import cli
from tests import security_payloads as sp


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    from interop.conversion import convert
    from tests.ckpt_hf import tiny_gpt2

    root = tmp_path_factory.mktemp("paths")
    model = tiny_gpt2()
    model.save_pretrained(root / "hf", max_shard_size="20KB")  # sharded: an index with a weight_map
    (root / "hf" / "tokenizer.json").write_text('{"genuine": true}')
    convert(root / "hf", root / "mg_torch", format="torch")
    convert(root / "hf", root / "mg_dist", format="torch_dist")
    secret = root / "secret.txt"
    secret.write_text("SECRET " * 100)
    return {"root": root, "hf": root / "hf", "mg_torch": root / "mg_torch", "mg_dist": root / "mg_dist",
            "secret": secret}


def _one_line_refusal(args, *expected: str) -> str:
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == 2, result.output[-2000:]
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "Traceback" not in result.output, result.output[-2000:]
    for text in expected:
        assert text in line, line
    return line


@pytest.mark.parametrize("entry", ["../secret.safetensors", "ABSOLUTE"])
def test_hf_index_entry_outside_is_refused(genuine, tmp_path, entry):
    ckpt = sp.copy_checkpoint(genuine["hf"], tmp_path / "hf")
    outside = genuine["root"] / "secret.safetensors"
    shutil.copy(next(ckpt.glob("model-*.safetensors")), outside)  # a readable shard, outside
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = entry
    index.write_text(json.dumps(data))
    for args in (["inspect", ckpt], ["convert", ckpt, tmp_path / "out"]):
        _one_line_refusal(args, "weight_map entry", entry)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["../secret.distcp", "ABSOLUTE", "sub/../../secret.distcp"])
def test_dcp_relative_path_outside_is_refused(genuine, tmp_path, entry):
    ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp_path / "mg")
    it = ckpt / "release"
    md, _ = sp.dcp_storage(it)
    info = next(iter(md.storage_data.values()))
    outside = tmp_path / "secret.distcp"
    shutil.copy(it / info.relative_path, outside)
    info.relative_path = str(outside) if entry == "ABSOLUTE" else entry
    sp.write_dcp_metadata(it, md)
    for args in (["inspect", ckpt], ["convert", ckpt, tmp_path / "out"], ["verify", ckpt, genuine["hf"]]):
        _one_line_refusal(args, "relative_path", "outside the checkpoint")


def test_symlinked_tokenizer_file_is_not_copied(genuine, tmp_path):
    ckpt = sp.copy_checkpoint(genuine["hf"], tmp_path / "hf")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(genuine["secret"])
    _one_line_refusal(["convert", ckpt, tmp_path / "out"], "tokenizer.json", "outside the checkpoint")
    assert not (tmp_path / "out").exists()
    # the Megatron side: tokenizer/ beside the iteration dir, with a link leading out
    mg = sp.copy_checkpoint(genuine["mg_torch"], tmp_path / "mg")
    (mg / "tokenizer").mkdir(exist_ok=True)
    (mg / "tokenizer" / "vocab.json").symlink_to(genuine["secret"])
    _one_line_refusal(["convert", mg, tmp_path / "out2"], "vocab.json", "outside the checkpoint")
    assert not (tmp_path / "out2").exists()
    assert "SECRET" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file()
                                   and p.resolve() != genuine["secret"].resolve() and not p.is_symlink())


def test_symlinked_weight_and_rank_files_are_refused(genuine, tmp_path):
    ckpt = sp.copy_checkpoint(genuine["hf"], tmp_path / "hf")
    shard = next(ckpt.glob("model-*.safetensors"))
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    _one_line_refusal(["inspect", ckpt], shard.name, "outside the checkpoint")
    mg = sp.copy_checkpoint(genuine["mg_torch"], tmp_path / "mg")
    rank = mg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rank.rename(tmp_path / "rank.pt")
    rank.symlink_to(tmp_path / "rank.pt")
    _one_line_refusal(["inspect", mg], "model_optim_rng.pt", "outside the checkpoint")


def test_hub_cache_snapshot_links_into_blobs_still_load(genuine, tmp_path):
    """``huggingface_hub`` stores ``models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>``."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in genuine["hf"].iterdir():
        blob = repo / "blobs" / f"hash-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    ckpt = open_checkpoint(snap)
    original = open_checkpoint(genuine["hf"])
    for info in original.tensors():
        assert torch.equal(ckpt.load(info.name), original.load(info.name))
    result = CliRunner().invoke(cli, ["convert", str(snap), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text() == '{"genuine": true}'


# ---- item 9: zip CRC-32 of tensor records


def _convert_refuses_bit_flip(ckpt: Path, data_file: Path, offset: int, record: str, tmp_path: Path) -> None:
    sp.flip_bit(data_file, offset)
    line = _one_line_refusal(["convert", ckpt, tmp_path / "out"], "CRC-32 mismatch", record, data_file.name)
    assert str(data_file) in line
    assert not (tmp_path / "out").exists()


def test_bit_flip_in_torch_rank_file_is_refused(genuine, tmp_path):
    ckpt = sp.copy_checkpoint(genuine["mg_torch"], tmp_path / "mg")
    rank = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    record, start, size = sp.zip_data_record(rank)
    _convert_refuses_bit_flip(ckpt, rank, start + size // 2, record, tmp_path)


def test_bit_flip_in_distcp_chunk_is_refused(genuine, tmp_path):
    ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp_path / "mg")
    it = ckpt / "release"
    md, by_key = sp.dcp_storage(it)
    key = max((k for k in by_key if type(md.state_dict_metadata[k]).__name__ == "TensorStorageMetadata"),
              key=lambda k: by_key[k].length)
    info = by_key[key]
    blob = (it / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    record, start, size = sp.zip_data_record(it / info.relative_path, blob)
    _convert_refuses_bit_flip(ckpt, it / info.relative_path, info.offset + start + size // 2, record, tmp_path)


def test_genuine_records_pass_and_checking_reads_each_record_once(genuine):
    from formats.checkpoint.crc import ZipRecords

    ckpt = open_checkpoint(genuine["mg_torch"])
    for info in ckpt.tensors():
        ckpt.load(info.name)
    crcs = ckpt.rank_file(0, 0)._crcs
    assert isinstance(crcs.records, ZipRecords) and crcs.records._checked  # records were checked
    data = {start for name, (start, size, _) in crcs.records.records.items() if "/data/" in name and size}
    assert crcs.records._checked <= data
