"""Megatron mmap datasets against the independent oracle: Megatron-Core's own IndexedDatasetBuilder and
IndexedDataset (byte identity both ways, reading each other's files), and the spec's worked example."""
import os
import pickle

import numpy as np
import pytest
import torch

from formats.indexed import Variant, create_writer, open_dataset

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

# documents -> sequences: empty documents, multi-sequence documents, an empty sequence, large ids
DOCS = [[[1, 2, 3, 0]], [[5, 6]], [], [[7, 8, 9], [10]], [[]], [[65000, 1, 65499], [4], [2, 2]]]


def _write_ours(prefix, docs, dtype, *, multimodal=False, whole_documents=False):
    with create_writer(prefix, dtype=dtype, multimodal=multimodal) as w:
        for d, doc in enumerate(docs):
            if whole_documents:
                w.add_document(np.concatenate([np.asarray(s, np.int64) for s in doc]) if doc else [],
                               [len(s) for s in doc])
                continue
            for k, seq in enumerate(doc):
                w.add_item(seq, mode=(d + k) % 2) if multimodal else w.add_item(seq)
            w.end_document()


def _write_mcore(prefix, docs, dtype, *, multimodal=False):
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=multimodal)
    for d, doc in enumerate(docs):
        for k, seq in enumerate(doc):
            b.add_item(torch.tensor(seq, dtype=torch.int64), (d + k) % 2) if multimodal else b.add_item(
                torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize(prefix + ".idx")


def _same_bytes(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read(), ext


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("whole_documents", [False, True])
def test_byte_identical_to_megatron_core_builder(tmp_path, dtype, whole_documents):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write_ours(ours, DOCS, dtype, whole_documents=whole_documents)
    _write_mcore(theirs, DOCS, dtype)
    _same_bytes(ours, theirs)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporaries left behind


def test_multimodal_byte_identical_and_read_by_megatron_core(tmp_path):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    docs = [d for d in DOCS if d]
    _write_ours(ours, docs, np.int32, multimodal=True)
    _write_mcore(theirs, docs, np.int32, multimodal=True)
    _same_bytes(ours, theirs)
    ds, ref = open_dataset(ours), mcore.IndexedDataset(ours, multimodal=True)
    assert ds.multimodal and len(ds) == len(ref)
    for i in range(len(ds)):
        (a, ma), (b, mb) = ds[i], ref[i]
        np.testing.assert_array_equal(a, b)
        assert ma == mb
    assert open_dataset(ours, multimodal=False)[0].tolist() == [1, 2, 3, 0]  # modes ignored on request


def test_spec_worked_example_bytes(tmp_path):
    """docs/indexed-formats.md §1.13, produced by Megatron-Core 0.16.1."""
    prefix = str(tmp_path / "ex")
    _write_ours(prefix, [[[1, 2, 3, 0]], [[5, 6]], [], [[7, 8, 9], [10]]], np.uint16)
    idx = open(prefix + ".idx", "rb").read()
    expected = (b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + b"\x08" + (4).to_bytes(8, "little")
                + (5).to_bytes(8, "little") + np.array([4, 2, 3, 1], "<i4").tobytes()
                + np.array([0, 8, 12, 18], "<i8").tobytes() + np.array([0, 1, 2, 2, 4], "<i8").tobytes())
    assert len(idx) == 122 and idx == expected
    assert open(prefix + ".bin", "rb").read().hex() == "0100020003000000050006000700080009000a00"
    mm = str(tmp_path / "mm")
    with create_writer(mm, dtype=np.int32, multimodal=True) as w:
        w.add_item([1, 2], mode=0)
        w.add_item([3, 4, 5], mode=1)
        w.end_document()
    data = open(mm + ".idx", "rb").read()
    assert len(data) == 76 and data.endswith(b"\x00\x01")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_each_reads_the_others_files(tmp_path, dtype):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write_ours(ours, DOCS, dtype)
    _write_mcore(theirs, DOCS, dtype)
    for written, reader_prefix in ((ours, ours), (theirs, theirs)):
        ds, ref = open_dataset(reader_prefix), mcore.IndexedDataset(written)
        assert len(ds) == len(ref) and ds.dtype == ref.index.dtype and ds.variant is Variant.MMAP
        np.testing.assert_array_equal(ds.document_indices, ref.document_indices)
        np.testing.assert_array_equal(ds.sizes, ref.sequence_lengths)
        np.testing.assert_array_equal(ds.pointers, ref.index.sequence_pointers)
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i], ref[i])
            n = int(ds.sizes[i])
            for off, length in ((0, None), (min(1, n), None), (0, n // 2), (n // 3, n - n // 3)):
                np.testing.assert_array_equal(ds.get(i, off, length), ref.get(i, off, length))
        for a, b in zip(ds[1:5], ref[1:5]):
            np.testing.assert_array_equal(a, b)
        assert ds.num_tokens == int(ref.sequence_lengths.sum())
        plain = open_dataset(reader_prefix, mmap=False)
        for i in range(len(ds)):
            np.testing.assert_array_equal(plain[i], ref[i])


def test_add_index_matches_megatron_core_merge(tmp_path):
    parts = [DOCS[:3], DOCS[3:], [[[9, 9]]]]
    for k, docs in enumerate(parts):
        _write_mcore(str(tmp_path / f"part{k}"), docs, np.uint16)
    b = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    with create_writer(tmp_path / "ours", dtype=np.uint16) as w:
        for k in range(len(parts)):
            b.add_index(str(tmp_path / f"part{k}"))
            w.add_index(str(tmp_path / f"part{k}"))
    b.finalize(str(tmp_path / "theirs.idx"))
    _same_bytes(str(tmp_path / "ours"), str(tmp_path / "theirs"))


def test_pickled_dataset_reopens_in_dataloader_workers(tmp_path):
    prefix = str(tmp_path / "d")
    _write_ours(prefix, DOCS, np.uint16)
    ds = open_dataset(prefix)
    state = pickle.dumps(ds)
    assert len(state) < 500  # the prefix and options, not the mapped data
    np.testing.assert_array_equal(pickle.loads(state)[5], ds[5])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert [x.tolist() for x in loader] == [ds[i].tolist() for i in range(len(ds))]


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path):
    from formats.errors import FormatError, OutputExistsError

    prefix = str(tmp_path / "d")
    _write_ours(prefix, DOCS, np.uint16)
    with pytest.raises(OutputExistsError):
        create_writer(prefix, dtype=np.uint16)
    before = open(prefix + ".idx", "rb").read()
    with pytest.raises(FormatError, match="do not fit"):
        with create_writer(prefix, dtype=np.uint16, force=True) as w:
            w.add_item([1, 2])
            w.add_item([70000])
    assert open(prefix + ".idx", "rb").read() == before  # the old output is untouched
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
