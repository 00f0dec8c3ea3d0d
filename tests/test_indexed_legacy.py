"""TNTIDX (Megatron-LM lazy/cached, fairseq) and fairseq mmap, checked byte for byte against the spec's
worked examples, plus variant sniffing and the ambiguous dtype codes."""
import struct

import numpy as np
import pytest

from formats.errors import FormatError
from formats.indexed import Variant, create_writer, open_dataset
from formats.indexed.verify import verify

# docs/indexed-formats.md §2.2: documents [[1,2,3],[4]] and [[5,6]], written by Megatron-LM's legacy builder (ML23)
EXAMPLE = [[[1, 2, 3], [4]], [[5, 6]]]


def _write(prefix, impl, docs=EXAMPLE, dtype=np.int32):
    with create_writer(prefix, impl=impl, dtype=dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_item(seq)
            w.end_document()
    return prefix


def _q(*values):
    return struct.pack(f"<{len(values)}q", *values)


def test_megatron_tntidx_worked_example(tmp_path):
    prefix = _write(str(tmp_path / "lazy"), "lazy")
    expected = (b"TNTIDX\x00\x00" + _q(1, 4, 4, 3, 3, 3) + _q(0, 1, 2, 3) + _q(0, 3, 4, 6) + _q(3, 1, 2) + _q(0, 2, 3))
    idx = open(prefix + ".idx", "rb").read()
    assert len(idx) == 168 and idx == expected
    assert open(prefix + ".bin", "rb").read() == np.arange(1, 7, dtype="<i4").tobytes()
    for kwargs in ({}, {"mmap": False}, {"cached": True}):
        ds = open_dataset(prefix, **kwargs)
        assert ds.variant is Variant.TNTIDX and ds.document_indices.tolist() == [0, 2, 3]
        assert [x.tolist() for x in ds] == [[1, 2, 3], [4], [5, 6]]
        assert ds.get(0, 1, 2).tolist() == [2, 3]
    # cached and lazy are the same files: both impl names write identical bytes
    assert open(_write(str(tmp_path / "cached"), "cached") + ".idx", "rb").read() == expected


def test_fairseq_tntidx_stores_values_plus_one(tmp_path):
    prefix = _write(str(tmp_path / "fs"), "fairseq-lazy")
    idx = open(prefix + ".idx", "rb").read()
    assert idx == b"TNTIDX\x00\x00" + _q(1, 4, 4, 3, 3) + _q(0, 1, 2, 3) + _q(0, 3, 4, 6) + _q(3, 1, 2)
    assert len(idx) == 48 + 8 * (2 * 3 + 2 + 3)
    assert open(prefix + ".bin", "rb").read() == np.arange(2, 8, dtype="<i4").tobytes()  # Lua "+1"
    ds = open_dataset(prefix)
    assert ds.variant is Variant.FAIRSEQ_TNTIDX and not ds.has_document_index
    assert [x.tolist() for x in ds] == [[1, 2, 3], [4], [5, 6]]  # fix_lua_indexing on read


def test_fairseq_mmap_layout_and_megatron_core_rejects_it(tmp_path):
    prefix = _write(str(tmp_path / "fm"), "fairseq-mmap", dtype=np.uint16)
    idx = open(prefix + ".idx", "rb").read()
    assert idx == (b"MMIDIDX\x00\x00" + _q(1)[:8] + b"\x08" + _q(3) + np.array([3, 1, 2], "<i4").tobytes()
                   + _q(0, 6, 8)) and len(idx) == 26 + 12 * 3
    ds = open_dataset(prefix)
    assert ds.variant is Variant.FAIRSEQ_MMAP and [x.tolist() for x in ds] == [[1, 2, 3], [4], [5, 6]]
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    with pytest.raises(Exception):  # docs/indexed-formats.md §1.11: Megatron-Core misreads the 26-byte header
        mcore.IndexedDataset(prefix)


def test_fairseq_uint32_code_9(tmp_path):
    prefix = _write(str(tmp_path / "u32"), "fairseq-mmap", docs=[[[70000, 1]]], dtype=np.uint32)
    assert open(prefix + ".idx", "rb").read()[17] == 9
    assert open_dataset(prefix)[0].tolist() == [70000, 1]
    with pytest.raises(FormatError, match="cannot be stored"):
        create_writer(str(tmp_path / "m"), impl="mmap", dtype=np.uint32)
    with pytest.raises(FormatError, match="legacy TNTIDX"):
        create_writer(str(tmp_path / "l"), impl="lazy", dtype=np.uint16)


def test_ambiguous_float_code_is_reported_and_overridable(tmp_path):
    """An old Megatron-LM wrote code 7 meaning float64; Megatron-Core reads 7 as float32 (docs/indexed-formats.md §1.2)."""
    prefix = str(tmp_path / "f")
    values = [np.array([0.5, 1.5, -2.0]), np.array([3.25])]
    with create_writer(prefix, dtype=np.float64) as w:
        for v in values:
            w.add_item(v)
        w.end_document()
    with open(prefix + ".idx", "r+b") as f:
        f.seek(17)
        f.write(b"\x07")
    ds = open_dataset(prefix)
    assert ds.dtype == np.float32 and "code 7" in ds.header.dtype_note
    report = verify(prefix)
    assert not report.ok and "float64" in [f for f in report.findings if f.check == "bin size"][0].message
    fixed = open_dataset(prefix, dtype=np.float64)
    assert [x.tolist() for x in fixed] == [v.tolist() for v in values] and verify(prefix, dtype="float64").ok
    with pytest.raises(FormatError, match="item size"):
        open_dataset(_write(str(tmp_path / "i"), "mmap"), dtype=np.int64)


@pytest.mark.parametrize("impl", ["mmap", "lazy", "fairseq-mmap", "fairseq-lazy"])
def test_convert_between_every_pair_keeps_content(tmp_path, impl):
    src = _write(str(tmp_path / "src"), impl)
    for target in ["mmap", "lazy", "fairseq-mmap", "fairseq-lazy"]:
        with create_writer(str(tmp_path / f"to-{target}"), impl=target, dtype=np.int32) as w:
            w.add_index(src)
        out = open_dataset(str(tmp_path / f"to-{target}"))
        assert [x.tolist() for x in out] == [[1, 2, 3], [4], [5, 6]]
        both_have_docs = not impl.startswith("fairseq") and not target.startswith("fairseq")
        assert out.document_indices.tolist() == ([0, 2, 3] if both_have_docs else [0, 1, 2, 3])
        assert verify(str(tmp_path / f"to-{target}")).ok
