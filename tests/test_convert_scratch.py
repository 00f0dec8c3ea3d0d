"""``interop.scratch``: a buffer is handed out again only once nothing refers to it (views, numpy arrays, writer
jobs), and conversions that reuse buffers all the time write files byte-identical to conversions without reuse."""
from __future__ import annotations

import filecmp

import pytest
import torch

import interop
import interop.scratch as scratch
from tests.test_convert_megatron_model import tiny_hf


def test_a_buffer_is_reused_only_when_nothing_refers_to_it(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)
    with scratch.pool(1 << 20) as p:
        a = scratch.empty((64, 64), torch.float32)
        where = a.data_ptr()
        view, array = a.t()[3:], a[5].numpy()
        del a
        assert scratch.empty((64, 64), torch.float32).data_ptr() != where  # a view still holds it
        del view
        assert scratch.empty((64, 64), torch.float32).data_ptr() != where  # a numpy array still holds it
        del array
        b = scratch.empty((32, 64), torch.float32)  # smaller requests fit a larger free buffer
        assert b.data_ptr() == where and p.reused >= 1
        c = scratch.empty((600, 600), torch.float32)  # past max_bytes: plain memory, not kept
        assert len(p._bufs) < 4 and c.shape == (600, 600)
    assert scratch._ACTIVE is None


def test_copy_and_contiguous_give_equal_values():
    t = torch.randn(300, 200)
    with scratch.pool(64 << 20):
        assert torch.equal(scratch.contiguous(t.t()), t.t()) and scratch.contiguous(t.t()).is_contiguous()
        assert scratch.contiguous(t) is t
        c = scratch.copy(t[:, 3:])
        assert torch.equal(c, t[:, 3:]) and c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind,tie", [("gpt2", True), ("llama", False)])
def test_conversions_reusing_buffers_write_the_same_bytes(tmp_path, monkeypatch, kind, tie):
    src = tmp_path / "hf"
    tiny_hf(kind, tie=tie).save_pretrained(src)

    def round_trip(tag):
        meg, back = tmp_path / f"meg-{tag}", tmp_path / f"back-{tag}"
        interop.convert(src, meg, tp=2, pp=2, format="torch", progress=False)
        interop.convert(meg, back, progress=False)
        return meg, back

    plain = round_trip("plain")
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)  # every tensor through the pool: buffers reused constantly
    pools = []

    class Tracked(scratch.ScratchPool):
        def __init__(self, max_bytes):
            super().__init__(max_bytes)
            pools.append(self)

    monkeypatch.setattr(scratch, "ScratchPool", Tracked)
    pooled = round_trip("pooled")
    assert len(pools) == 2 and all(p.reused >= 5 for p in pools)
    for a, b in zip(plain, pooled):
        assert _files(a) == _files(b)
        for f in _files(a):
            assert filecmp.cmp(a / f, b / f, shallow=False), f
