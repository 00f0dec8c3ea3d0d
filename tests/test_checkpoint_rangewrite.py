"""The threaded write paths of the Megatron torch writer (O_DIRECT, buffered): files byte-identical to torch's own
``write_record`` path (CRC on and off, views with offsets, empty and odd-sized records, the zip64 fallback),
read back by ``torch.load(weights_only=True)`` equal to the tensors given, and a whole checkpoint read by
``MegatronCheckpoint`` like the one written without threads; our CRC-32 (libdeflate or zlib) equals zlib's."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

import formats.checkpoint.rangewrite as rangewrite
import formats.checkpoint.format_torch as format_torch
import formats.checkpoint.streaming as streaming
from formats.checkpoint import open_checkpoint
from formats.checkpoint.crc import crc32
from formats.checkpoint.rangewrite import RangeWriter
from formats.checkpoint.format_torch import MegatronTorchWriter
from formats.checkpoint.streaming import StreamingTorchFile
from formats.layout import Layout


def _tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(700, 1001, generator=g)
    return {
        "rows": big[5:605],  # contiguous view at an odd offset of a larger storage
        "cols": big[:, 3:9],  # strided: copied once, by the worker thread
        "rows_t": big[100:300].t(),  # a transposed row block (a row-parallel shard of a Conv1D weight)
        "half": torch.arange(7, dtype=torch.float16),
        "vec": torch.randn(100_003, generator=g),
        "empty": torch.empty(0),
        "bf16": torch.randn(33, 65, generator=g).to(torch.bfloat16),
    }


def _write(path, tensors, io):
    path.parent.mkdir(parents=True)
    f = StreamingTorchFile(path, io)
    refs = {k: f.add_tensor(t) for k, t in tensors.items()}
    f.finish({"model": refs, "iteration": 3})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the skeleton is gone
    if io is not None:
        io.close()
    return path.read_bytes(), len(f._records), io


def direct_supported(tmp_path) -> bool:
    probe = tmp_path / "direct-probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))  # a directory refuses O_DIRECT even where files don't
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def small_direct(monkeypatch):
    monkeypatch.setattr(rangewrite, "SMALL", 4096)  # exercise the O_DIRECT middle + buffered head/tail split
    monkeypatch.setattr(rangewrite, "CHUNK", 64 << 10)


MODES = {"direct": dict(direct=True), "buffered": dict(direct=False)}


@pytest.mark.parametrize("crc", [True, False])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_byte_identical_to_write_record(tmp_path, small_direct, crc, mode):
    old = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc)
    try:
        tensors = _tensors()
        slow, _, _ = _write(tmp_path / "a" / "model_optim_rng.pt", tensors, None)
        fast, ours, io = _write(tmp_path / "b" / "model_optim_rng.pt", tensors,
                                RangeWriter(max_inflight=1 << 20, **MODES[mode]))
    finally:
        torch.serialization.set_crc32_options(old)
    assert ours == 5  # every record up to the empty one was laid out and written by the threads
    assert (io.direct_bytes > 0) == (mode == "direct") or not direct_supported(tmp_path)
    assert fast == slow
    back = torch.load(tmp_path / "b" / "model_optim_rng.pt", weights_only=True)
    for k, t in tensors.items():
        assert back["model"][k].dtype == t.dtype and torch.equal(back["model"][k], t), k


def test_zip64_territory_falls_back_to_write_record(tmp_path, small_direct, monkeypatch):
    monkeypatch.setattr(streaming, "ZIP32_LIMIT", 2_500_000)  # records ending past 2.5 MB: torch's write_record
    tensors = _tensors()
    slow, _, _ = _write(tmp_path / "a" / "model_optim_rng.pt", tensors, None)
    fast, ours, _ = _write(tmp_path / "b" / "model_optim_rng.pt", tensors, RangeWriter())
    assert ours == 2  # rows, cols; "rows_t" would end past the limit, and so everything after it
    assert fast == slow


def test_checkpoint_reads_back_like_the_unthreaded_one(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    shards = {(t, p): {f"decoder.layers.{i}.w": torch.randn(300, 257, generator=g) for i in range(3)}
              for t in range(2) for p in range(2)}

    def build(dst):
        with MegatronTorchWriter(dst, Layout(tp=2, pp=2), release=True, args={"num_layers": 6}) as w:
            for (t, p), state in shards.items():
                for name, x in state.items():
                    w.add(name, x[:, 1:], t, p)  # strided views: one copy each
                w.add("decoder.layers.0.mlp._extra_state", None, t, p)
            w.finalize()

    build(tmp_path / "fast")
    monkeypatch.setattr(format_torch, "RangeWriter", lambda: None)
    build(tmp_path / "slow")
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert files(tmp_path / "fast") == files(tmp_path / "slow")  # no skeleton left behind
    fast, slow = open_checkpoint(tmp_path / "fast"), open_checkpoint(tmp_path / "slow")
    for (t, p), state in shards.items():
        assert (tmp_path / "fast" / "release" / f"mp_rank_0{t}_00{p}" / "model_optim_rng.pt").read_bytes() == \
            (tmp_path / "slow" / "release" / f"mp_rank_0{t}_00{p}" / "model_optim_rng.pt").read_bytes()
        for name, x in state.items():
            assert torch.equal(fast.load(name, tp=t, pp=p), x[:, 1:])
            assert torch.equal(slow.load(name, tp=t, pp=p), x[:, 1:])


def test_a_failed_write_is_raised(tmp_path):
    io = RangeWriter(direct=False)
    io.open("f", tmp_path / "f.bin")
    io._files["f"].fd, fd = -1, io._files["f"].fd  # a broken file descriptor: the job fails
    io.write("f", 0, torch.ones(10))
    with pytest.raises(OSError):
        io.wait()
    io._files["f"].fd = fd
    io.close()


def test_streamed_hf_shards_read_back_by_safetensors(tmp_path, small_direct):
    from safetensors.torch import load_file

    from formats.checkpoint import HFCheckpointWriter

    tensors = {k: v.contiguous() for k, v in _tensors().items() if v.numel()}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with HFCheckpointWriter(tmp_path / "hf", {"model_type": "x"}, max_shard_size=1_000_000, plan=plan) as w:
        for k, v in tensors.items():
            w.add(k, v)
        io = w._io
        w.finalize()
    assert io.direct_bytes > 0 or not direct_supported(tmp_path)
    back = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        back.update(load_file(f))
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_hf_map_equals_load_and_is_copy_on_write(tmp_path, monkeypatch):
    import formats.checkpoint.hf as hf
    from safetensors.torch import save_file

    monkeypatch.setattr(hf, "MAP_MIN_BYTES", 1024)
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    ckpt = open_checkpoint(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    n_mapped = 0
    for k, v in tensors.items():
        mapped = ckpt.map(k)
        n_mapped += mapped.untyped_storage().nbytes() > mapped.numel() * mapped.element_size()  # page-aligned map
        assert mapped.dtype == v.dtype and torch.equal(mapped, v) and torch.equal(mapped, ckpt.load(k)), k
        mapped.add_(1)  # a private mapping: the file is never written
    assert n_mapped >= 2
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("backend", ["system", "zlib"])
@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1 << 20 | 5])
def test_crc32_equals_zlib(n, backend, monkeypatch):
    import formats.checkpoint.crc as crc_module

    if backend == "zlib":
        monkeypatch.setattr(crc_module, "_LIBDEFLATE", None)  # the fallback where libdeflate is missing
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[n // 3:], crc32(memoryview(data)[:n // 3])) == zlib.crc32(data)
    assert crc32(data, 12345) == zlib.crc32(data, 12345)
