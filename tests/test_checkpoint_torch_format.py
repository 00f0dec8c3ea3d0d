"""Per-rank torch format beyond the Megatron-Core run: legacy nested keys, old checkpoint versions, VPP chunks,
distrib_optim listing, the allow-listing unpickler, the tracker and bad input."""
from __future__ import annotations

import argparse
import collections

import pytest
import torch

from formats.checkpoint import MegatronTorchWriter, open_checkpoint
from formats.checkpoint.tracker import Tracker
from formats.checkpoint.unpickle import load_megatron_pickle
from formats.errors import FormatError, OutputExistsError
from formats.layout import Layout
from tests import ckpt_legacy


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    return root, ckpt_legacy.write_legacy(root, tp=2, pp=2)


def test_legacy_nested_keys_flatten_and_read_back(legacy):
    root, ranks = legacy
    ckpt = open_checkpoint(root)
    assert (ckpt.format, ckpt.key_style, ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration) == ("torch", "legacy", 2, 2, 20)
    for (t, p), top in ranks.items():
        ref = {k: v for k, v in ckpt_legacy.flat(top["model"]).items() if isinstance(v, torch.Tensor)}
        assert {i.name for i in ckpt.rank_tensors(t, p)} == set(ref)
        for name, v in ref.items():
            assert torch.equal(ckpt.load_rank_tensor(name, t, p), v)
    names = {i.name for i in ckpt.rank_tensors(0, 0)}
    assert "language_model.encoder.layers.0.self_attention.query_key_value.weight" in names
    assert "language_model.embedding.word_embeddings.weight" in names
    assert "word_embeddings_for_head.weight" in {i.name for i in ckpt.rank_tensors(1, 1)}


def test_legacy_write_reproduces_the_nested_layout(legacy, tmp_path):
    root, ranks = legacy
    src = open_checkpoint(root)
    with MegatronTorchWriter(tmp_path / "out", src.layout, iteration=src.iteration, args=src.args,
                             checkpoint_version=src.checkpoint_version) as w:
        for t, p, _ in src.rank_keys():
            for name, value in src.rank_state(t, p).items():
                w.add(name, src.load_rank_tensor(name, t, p) if isinstance(value, torch.Tensor) else value, t, p)
        w.finalize()
    for (t, p), top in ranks.items():
        got = torch.load(tmp_path / "out" / "iter_0000020" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt",
                         weights_only=False)
        a, b = ckpt_legacy.flat(top["model"]), ckpt_legacy.flat(got["model"])
        assert list(a) == list(b)
        assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())
        assert set(got["model"]["language_model"]) == set(top["model"]["language_model"])  # same nesting


def test_missing_checkpoint_version_means_zero(tmp_path):
    ckpt_legacy.write_legacy(tmp_path, tp=2, pp=1, version=None)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.checkpoint_version == 0.0 and ckpt.layout.tp == 2  # TP from args.model_parallel_size


def test_vpp_chunks_release_and_optimizer_listing(tmp_path):
    layout = Layout(tp=1, pp=2, vpp=2)
    gen = torch.Generator().manual_seed(0)
    ref = {}
    expected = {}
    with MegatronTorchWriter(tmp_path / "vpp", layout, release=True, args={"num_layers": 8}) as w:
        for p in range(2):
            for c in range(2):
                for i in range(2):
                    t = torch.randn(6, 4, generator=gen)
                    name = f"decoder.layers.{i}.mlp.linear_fc1.weight"
                    w.add(name, t.t(), 0, p, c)  # non-contiguous input is written contiguous
                    ref[(p, c, name)] = t.t().contiguous()
                    expected.setdefault((0, p, c), {})[name] = (4, 6)
        w.expected = expected
        w.finalize()
    optim = {"buckets_coalesced": True, 0: {(torch.float32, torch.float32): {"param": torch.ones(5), "numel_unpadded": 5}}}
    torch.save(optim, tmp_path / "vpp" / "release" / "mp_rank_00_000" / "distrib_optim.pt")
    ckpt = open_checkpoint(tmp_path / "vpp")
    assert ckpt.release and ckpt.iteration == 0 and ckpt.layout.vpp == 2 and ckpt.num_chunks == 2
    assert ckpt.optimizer_files == ["mp_rank_00_000/distrib_optim.pt"]
    state = ckpt.optimizer_state(0, 0)
    assert torch.equal(state[0][(torch.float32, torch.float32)]["param"], torch.ones(5))
    assert ckpt.optimizer_state(0, 1) is None
    for (p, c, name), t in ref.items():
        assert torch.equal(ckpt.load_rank_tensor(name, 0, p, chunk=c), t)
    raw = torch.load(tmp_path / "vpp" / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
    assert set(raw) >= {"model0", "model1", "args", "iteration", "checkpoint_version"} and "model" not in raw


def test_writer_validates_keys_and_ranks(tmp_path):
    w = MegatronTorchWriter(tmp_path / "a", Layout(tp=2), iteration=1, expected={(0, 0, 0): ["x"], (1, 0, 0): ["x"]})
    w.add("x", torch.ones(1), 0, 0)
    w.add("y", torch.ones(1), 1, 0)
    with pytest.raises(FormatError, match="missing 1 key"):
        w.finalize()
    w.abort()
    w = MegatronTorchWriter(tmp_path / "b", Layout(tp=2), iteration=1)
    w.add("x", torch.ones(1), 0, 0)
    with pytest.raises(Exception, match="no tensors were written for rank"):
        w.finalize()
    w.abort()
    assert not any(tmp_path.iterdir())
    (tmp_path / "c").mkdir()
    with pytest.raises(OutputExistsError):
        MegatronTorchWriter(tmp_path / "c", Layout(), iteration=1)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unpickler_allows_exactly_what_megatron_needs(tmp_path):
    import io
    import random
    import signal

    import numpy as np

    ok = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(exit_signal=signal.SIGTERM, params_dtype=torch.bfloat16),
                "rng_state": [{"np_rng_state": np.random.get_state(), "random_rng_state": random.getstate()}],
                "model": collections.OrderedDict(w=torch.ones(2), **{"l._extra_state": io.BytesIO(b"te")})}, ok)
    d = load_megatron_pickle(ok)
    assert d["model"]["l._extra_state"].getvalue() == b"te"
    assert d["args"].params_dtype == torch.bfloat16 and torch.equal(d["model"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, evil)
    with pytest.raises(FormatError, match=r"builtins\.print") as e:
        load_megatron_pickle(evil)
    assert str(evil) in str(e.value) and "allow-list" in str(e.value)


def test_tracker_and_bad_directories(tmp_path):
    assert Tracker.read(_write(tmp_path / "t1", "12\n")) == Tracker(12)
    assert Tracker.read(_write(tmp_path / "t2", "release")) == Tracker(0, True)
    with pytest.raises(FormatError, match="iteration number or 'release'"):
        Tracker.read(_write(tmp_path / "t3", "latest"))
    save = tmp_path / "save"
    save.mkdir()
    _write(save / "latest_checkpointed_iteration.txt", "5")
    with pytest.raises(FormatError, match="iter_0000005 but that directory is missing"):
        open_checkpoint(save)
    (save / "iter_0000005").mkdir()
    with pytest.raises(FormatError, match="not a checkpoint"):
        open_checkpoint(save / "iter_0000005")
    trunc = save / "iter_0000005" / "mp_rank_00"
    trunc.mkdir()
    (trunc / "model_optim_rng.pt").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(FormatError, match="model_optim_rng.pt"):
        open_checkpoint(save)


def test_missing_rank_file_is_reported(legacy, tmp_path):
    import shutil

    root, _ = legacy
    shutil.copytree(root, tmp_path / "c")
    (tmp_path / "c" / "iter_0000020" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    with pytest.raises(FormatError, match="mp_rank_01_001/model_optim_rng.pt is missing"):
        open_checkpoint(tmp_path / "c")


def _write(path, text):
    path.write_text(text)
    return path


def test_expert_parallel_dirs_and_key_styles(tmp_path):
    from formats.checkpoint.megatron import detect_key_style

    layout = Layout(tp=1, pp=1, ep=2)
    with MegatronTorchWriter(tmp_path / "ep", layout, iteration=3, args={"num_layers": 1}) as w:
        for e in range(2):
            w.add("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", torch.full((2, 2), float(e)), 0, 0, ep=e)
        w.finalize()
    assert sorted(p.name for p in (tmp_path / "ep" / "iter_0000003").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    ckpt = open_checkpoint(tmp_path / "ep")
    assert ckpt.layout.ep == 2 and ckpt.layout.pp == 1 and ckpt.rank_keys() == [(0, 0, 0), (0, 0, 1)]
    name = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
    assert float(ckpt.load_rank_tensor(name, 0, 0, ep=1)[0, 0]) == 1.0
    assert detect_key_style(["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]) == "mcore_te"
    assert detect_key_style(["decoder.layers.0.input_layernorm.weight"]) == "mcore"
    assert detect_key_style(["language_model.encoder.final_norm.weight"]) == "legacy"


def test_torch_dist_damage_is_reported(tmp_path):
    from formats.checkpoint import TorchDistWriter

    with TorchDistWriter(tmp_path / "d", iteration=1, args={"num_layers": 2}) as w:
        w.add("decoder.layers.mlp.linear_fc2.weight", torch.ones(1, 3, 4), (2, 3, 4), (0, 0, 0))
        with pytest.raises(Exception, match="chunks cover 12 of 24"):
            w.finalize()
    assert not (tmp_path / "d").exists()
    with TorchDistWriter(tmp_path / "d", iteration=1, args={"num_layers": 2}) as w:
        w.add("a", torch.arange(6.0).reshape(2, 3))
        w.add("b", torch.ones(4))
        w.finalize()
    ckpt = open_checkpoint(tmp_path / "d")
    assert torch.equal(ckpt.load("a", (slice(None), slice(1, 3))), torch.arange(6.0).reshape(2, 3)[:, 1:])
    data = tmp_path / "d" / "iter_0000001" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated data file|corrupt chunk"):
        open_checkpoint(tmp_path / "d").load("b")
    (tmp_path / "d" / "iter_0000001" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(FormatError, match="cannot read DCP metadata"):
        open_checkpoint(tmp_path / "d")


def _two_layer_dist(path) -> torch.Tensor:
    """A torch_dist checkpoint at ``path`` holding one stacked [2, 3, 4] tensor as two layer chunks; returns it."""
    from formats.checkpoint import TorchDistWriter

    full = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    with TorchDistWriter(path, iteration=1) as w:
        for i in range(2):
            w.add("decoder.layers.x.weight", full[i : i + 1], (2, 3, 4), (i, 0, 0))
        w.finalize()
    return full


def test_torch_dist_slice_reads_only_the_chunks_it_needs(tmp_path):
    full = _two_layer_dist(tmp_path / "d")
    ckpt = open_checkpoint(tmp_path / "d")
    layer0 = next(info for idx, info in ckpt._index["decoder.layers.x.weight"] if idx[0] == 0)
    data = tmp_path / "d" / "iter_0000001" / layer0.relative_path
    raw = bytearray(data.read_bytes())
    raw[layer0.offset : layer0.offset + layer0.length] = b"\x00" * layer0.length  # destroy layer 0's chunk
    data.write_bytes(bytes(raw))
    assert torch.equal(ckpt.load("decoder.layers.x.weight", (slice(1, 2),)), full[1:2])
    with pytest.raises(FormatError, match="corrupt chunk"):
        ckpt.load("decoder.layers.x.weight", (slice(0, 1),))


def test_torch_dist_chunks_go_out_through_the_writer_threads(tmp_path):
    """Blobs of several MB at unaligned offsets (page-aligned middles with O_DIRECT, the rest buffered), strided
    chunks (a transposed view, an expanded row) copied by the writer threads: every blob is a valid zip (CRC-32s
    checked by ``zipfile``) and reads back bit for bit — by our reader, by ``torch.load`` of the blob's bytes and
    by torch's own DCP loader (the oracle Megatron-Core's dist_checkpointing uses)."""
    import io
    import zipfile

    import torch.distributed.checkpoint as dcp

    from formats.checkpoint import TorchDistWriter
    from formats.checkpoint.rangewrite import _File

    gen = torch.Generator().manual_seed(3)
    small = torch.randn(7, 5, generator=gen)
    big = torch.randn(3, 1001, 997, generator=gen)  # ~12 MB: three chunks of ~4 MB, none page-aligned
    wide = torch.randn(1200, 900, generator=gen)
    row = torch.randn(1, 33, generator=gen)
    with TorchDistWriter(tmp_path / "d", iteration=2, args={"num_layers": 3}) as w:
        w.add("small", small)
        for i in range(3):
            w.add("stack", big[i:i + 1], global_shape=tuple(big.shape), offset=(i, 0, 0))
        w.add("transposed", wide.t())  # a view: copied once by a writer thread
        w.add("rows", row.expand(5, 33))  # stride 0
        w.add_object("obj", [None])
        sink = w._io
        w.finalize()
    expected = {"small": small, "stack": big, "transposed": wide.t().contiguous(), "rows": row.expand(5, 33)}
    ckpt = open_checkpoint(tmp_path / "d")
    for key, value in expected.items():
        assert torch.equal(ckpt.load(key), value), key
    assert torch.equal(ckpt.load("stack", (slice(1, 2), slice(None), slice(500, 997))), big[1:2, :, 500:])
    raw = (tmp_path / "d" / "iter_0000002" / "__0_0.distcp").read_bytes()
    assert set(ckpt._index) >= set(expected)
    for key in expected:  # every chunk is read through the file mapping
        for _, info in ckpt._index[key]:
            chunk, is_view = ckpt._mapped_chunk(info)
            assert is_view and torch.equal(chunk, ckpt._read_chunk(key, info)), key  # our blobs are aligned
            blob = raw[info.offset:info.offset + info.length]
            assert zipfile.ZipFile(io.BytesIO(blob)).testzip() is None, key
            assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), chunk), key
    out = {k: torch.empty_like(v) for k, v in expected.items()}
    dcp.load(out, checkpoint_id=str(tmp_path / "d" / "iter_0000002"), no_dist=True)
    for key, value in expected.items():
        assert torch.equal(out[key], value), key
    probe = _File(tmp_path / "probe", True)
    direct_possible = probe.dfd is not None
    probe.close()
    assert sink.direct_bytes >= (8 << 20 if direct_possible else 0)  # the page-aligned middles went out with O_DIRECT


def test_torch_dist_load_into_a_given_buffer(tmp_path):
    full = _two_layer_dist(tmp_path / "d")
    ckpt = open_checkpoint(tmp_path / "d")
    buf = torch.full((1, 3, 4), -1.0)
    got = ckpt.load("decoder.layers.x.weight", (slice(1, 2),), out=buf)
    assert got is buf and torch.equal(buf, full[1:2])
    with pytest.raises(ValueError, match="out is"):
        ckpt.load("decoder.layers.x.weight", (slice(0, 2),), out=buf)
    with pytest.raises(ValueError, match="out is"):
        ckpt.load("decoder.layers.x.weight", (slice(1, 2),), out=buf.double())


def test_torch_dist_blob_layout_matches_torch_save():
    """The archive around a tensor's bytes: the same ``data.pkl`` as ``torch.save`` (byte for byte), the records
    torch writes with the same contents (its ``.data/serialization_id`` aside), the data record 64-byte aligned."""
    import io
    import zipfile
    import zlib

    from formats.checkpoint.blob_zip import tensor_blob
    from formats.checkpoint.streaming import RefPickler, StorageRef, TensorRef

    for t in (torch.randn(3, 5), torch.arange(7), torch.randn(2, 3).bfloat16(), torch.tensor(2.5), torch.empty(0, 4)):
        buf = io.BytesIO()
        RefPickler(buf, protocol=2).dump(TensorRef(StorageRef("0", t.dtype, t.numel()), tuple(t.shape)))
        blob = tensor_blob(buf.getvalue(), t.numel() * t.element_size())
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        blob.set_crc(zlib.crc32(data))
        archive = bytes(blob.head) + data + bytes(blob.tail)
        assert len(archive) == blob.length and len(blob.head) % 64 == 0
        ref = io.BytesIO()
        torch.save(t, ref)
        theirs, ours = zipfile.ZipFile(ref), zipfile.ZipFile(io.BytesIO(archive))
        assert ours.testzip() is None
        assert set(ours.namelist()) == set(theirs.namelist()) - {"archive/.data/serialization_id"}
        for name in ours.namelist():
            assert ours.read(name) == theirs.read(name), name
        loaded = torch.load(io.BytesIO(archive), weights_only=True)
        assert torch.equal(loaded, t) and loaded.dtype == t.dtype


def test_mapped_blob_reader_declines_what_it_cannot_map(tmp_path):
    """A blob the mapped reader cannot prove it understands (not one tensor, a view into a bigger storage,
    garbage) gives None, and the checkpoint falls back to torch.load for it."""
    import io
    import mmap

    from formats.checkpoint.blob_map import mapped_tensor

    def blob(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    base = torch.arange(24.0).reshape(4, 6)
    parts = [blob(base), blob({"a": base}), blob(base.t()), blob(torch.arange(5, dtype=torch.int64)), b"garbage!" * 9]
    path = tmp_path / "blobs"
    path.write_bytes(b"".join(parts))
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    got = [(mapped_tensor(mapped, o, len(p)) or (None,))[0] for o, p in zip(offsets, parts)]
    assert torch.equal(got[0], base)
    assert got[1] is None  # a dict, not a tensor
    assert torch.equal(got[2], base.t()) and got[2].stride() == base.t().stride()  # strides kept
    assert torch.equal(got[3], torch.arange(5))
    assert got[4] is None
    assert mapped_tensor(mapped, offsets[0], len(parts[0]) - 1) is None  # truncated
    assert mapped_tensor(mapped, len(mapped) - 10, 100) is None  # past the end


def test_torch_dist_writing_and_reading_do_not_import_dcp(tmp_path):
    """Writing, opening, listing and loading a torch_dist checkpoint go through stand-ins of DCP's metadata
    classes: no ``torch.distributed.checkpoint`` import (DTensor, sympy: 0.45-0.9 s on the 2-core VM)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from formats.checkpoint import TorchDistWriter, open_checkpoint\n"
        f"d = {str(tmp_path / 'd')!r}\n"
        "with TorchDistWriter(d, iteration=1) as w:\n"
        "    w.add('decoder.layers.x.weight', torch.arange(6.0).reshape(1, 2, 3), (2, 2, 3), (0, 0, 0))\n"
        "    w.add('decoder.layers.x.weight', torch.arange(6.0, 12.0).reshape(1, 2, 3), (2, 2, 3), (1, 0, 0))\n"
        "    w.add_object('decoder.layers.x._extra_state/shard_0_2', [None])\n"
        "    w.finalize()\n"
        "c = open_checkpoint(d)\n"
        "assert [(i.name, i.shape, i.dtype) for i in c.tensors()] == [('decoder.layers.x.weight', (2, 2, 3), torch.float32)]\n"
        "assert c.objects() == ['decoder.layers.x._extra_state/shard_0_2']\n"
        "assert torch.equal(c.load('decoder.layers.x.weight'), torch.arange(12.0).reshape(2, 2, 3))\n"
        "assert c.load_object('decoder.layers.x._extra_state/shard_0_2') == [None]\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'DCP was imported'\n"
    )
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_torch_dist_metadata_unpickles_as_dcps_own(tmp_path):
    """The ``.metadata`` our writer pickles without DCP is, unpickled by plain ``pickle`` (DCP's real classes),
    equal to the ``Metadata`` DCP would have built; and DCP's own pickle reads back through our stand-ins."""
    import pickle

    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
        TensorStorageMetadata,
    )

    from formats.checkpoint import TorchDistWriter
    from formats.checkpoint.dcp_metadata import DCP_VERSION, MetadataUnpickler, kind

    assert DCP_VERSION == CURRENT_DCP_VERSION
    with TorchDistWriter(tmp_path / "d", iteration=1) as w:
        w.add("stack", torch.ones(1, 2, 3, dtype=torch.bfloat16), (2, 2, 3), (0, 0, 0))
        w.add("stack", torch.ones(1, 2, 3, dtype=torch.bfloat16), (2, 2, 3), (1, 0, 0))
        w.add("flat", torch.zeros(5))
        w.add_object("obj", [None])
        w.finalize()
    raw = (tmp_path / "d" / "iter_0000001" / ".metadata").read_bytes()
    md = pickle.loads(raw)
    assert type(md) is Metadata and type(md.storage_meta) is StorageMeta and md.version == CURRENT_DCP_VERSION
    assert md.state_dict_metadata == {
        "stack": TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size([2, 2, 3]),
                                       [ChunkStorageMetadata(torch.Size([0, 0, 0]), torch.Size([1, 2, 3])),
                                        ChunkStorageMetadata(torch.Size([1, 0, 0]), torch.Size([1, 2, 3]))]),
        "flat": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([5]),
                                      [ChunkStorageMetadata(torch.Size([0]), torch.Size([5]))]),
        "obj": BytesStorageMetadata(),
    }
    assert set(md.storage_data) == {MetadataIndex("stack", (0, 0, 0)), MetadataIndex("stack", (1, 0, 0)),
                                    MetadataIndex("flat", (0,)), MetadataIndex("obj")}
    assert all(type(v) is _StorageInfo and v.relative_path == "__0_0.distcp" and v.length > 0
               for v in md.storage_data.values())
    theirs = pickle.dumps(md)  # DCP's own pickling of the same Metadata, read through the stand-ins
    ours = MetadataUnpickler(__import__("io").BytesIO(theirs)).load()
    assert kind(ours) == "Metadata" and ours.version == CURRENT_DCP_VERSION
    assert {k: (kind(v), getattr(v, "size", None)) for k, v in ours.state_dict_metadata.items()} == {
        "stack": ("TensorStorageMetadata", torch.Size([2, 2, 3])), "flat": ("TensorStorageMetadata", torch.Size([5])),
        "obj": ("BytesStorageMetadata", None)}
    assert ours.state_dict_metadata["stack"].properties.dtype == torch.bfloat16
    assert sorted((i.fqn, tuple(i.offset or ()), v.offset, v.length) for i, v in ours.storage_data.items()) == \
        sorted((i.fqn, tuple(i.offset or ()), v.offset, v.length) for i, v in md.storage_data.items())


def test_torch_dist_chunk_past_zip32_goes_through_torch_save(tmp_path, monkeypatch):
    """A chunk whose archive would need zip64 (>= 4 GiB; here the limit is lowered) is written by ``torch.save``
    instead, beside laid-out ones: both read back, by our reader and by DCP."""
    import torch.distributed.checkpoint as dcp

    from formats.checkpoint import TorchDistWriter, blob_zip

    monkeypatch.setattr(blob_zip, "ZIP32_LIMIT", 4000)
    small, big = torch.arange(6.0).reshape(2, 3), torch.randn(40, 30)  # big: ~4.8 KB of data
    with TorchDistWriter(tmp_path / "d", iteration=1) as w:
        w.add("small", small)
        w.add("big", big.t())
        assert [future is None for _, _, future in w._records] == [False, True]  # laid out / torch.save
        w.finalize()
    ckpt = open_checkpoint(tmp_path / "d")
    assert torch.equal(ckpt.load("small"), small) and torch.equal(ckpt.load("big"), big.t())
    out = {"small": torch.empty_like(small), "big": torch.empty(30, 40)}
    dcp.load(out, checkpoint_id=str(tmp_path / "d" / "iter_0000001"), no_dist=True)
    assert torch.equal(out["small"], small) and torch.equal(out["big"], big.t())
