"""Property tests (hypothesis): random documents through every writer/reader pair, with Megatron-Core's
builder and reader as the oracle for the mmap layout."""
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.indexed import create_writer, open_dataset
from formats.indexed.verify import verify

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def documents(max_value):
    sequence = st.lists(st.integers(0, max_value), max_size=12)
    return st.lists(st.lists(sequence, max_size=4), max_size=8)


def _expected(docs):
    seqs = [s for d in docs for s in d]
    bounds = np.cumsum([0] + [len(d) for d in docs]).tolist()
    return seqs, bounds


def _write(prefix, docs, impl, dtype, multimodal=False):
    with create_writer(prefix, impl=impl, dtype=dtype, multimodal=multimodal) as w:
        for d, doc in enumerate(docs):
            for k, seq in enumerate(doc):
                w.add_item(np.asarray(seq, np.int64), mode=(d * 7 + k) % 3)
            w.end_document()


@SETTINGS
@given(docs=documents(65535), dtype=st.sampled_from([np.uint16, np.int32]), multimodal=st.booleans())
def test_mmap_writer_equals_megatron_core_builder_and_reader(docs, dtype, multimodal):
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = f"{d}/ours", f"{d}/theirs"
        _write(ours, docs, "mmap", dtype, multimodal)
        b = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype, multimodal=multimodal)
        for i, doc in enumerate(docs):
            for k, seq in enumerate(doc):
                b.add_item(torch.tensor(seq, dtype=torch.int64), (i * 7 + k) % 3)
            b.end_document()
        b.finalize(theirs + ".idx")
        for ext in (".idx", ".bin"):
            assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()
        seqs, bounds = _expected(docs)
        ds = open_dataset(ours)
        assert len(ds) == len(seqs) and ds.document_indices.tolist() == bounds
        assert [(x[0] if multimodal else x).tolist() for x in ds] == seqs
        if not any(seqs):  # Megatron-Core cannot map an empty .bin ("cannot mmap an empty file"); we can
            return
        ref = mcore.IndexedDataset(ours, multimodal=multimodal)
        assert len(ref) == len(seqs)
        for i, seq in enumerate(seqs):
            assert (ref[i][0] if multimodal else ref[i]).tolist() == seq
        assert verify(ours).ok


@SETTINGS
@given(docs=documents(2**31 - 2), impl=st.sampled_from(["lazy", "fairseq-lazy", "fairseq-mmap", "mmap"]),
       mmap=st.booleans(), data=st.data())
def test_every_writer_reader_pair_round_trips(docs, impl, mmap, data):
    seqs, bounds = _expected(docs)
    with tempfile.TemporaryDirectory() as d:
        _write(f"{d}/x", docs, impl, np.int32)
        ds = open_dataset(f"{d}/x", mmap=mmap)
        assert [x.tolist() for x in ds] == seqs
        assert ds.document_indices.tolist() == (list(range(len(seqs) + 1)) if impl.startswith("fairseq") else bounds)
        assert ds.num_tokens == sum(map(len, seqs)) and verify(f"{d}/x").ok
        if seqs:
            i = data.draw(st.integers(0, len(seqs) - 1))
            off = data.draw(st.integers(0, len(seqs[i])))
            n = data.draw(st.integers(0, len(seqs[i]) - off))
            assert ds.get(i, off, n).tolist() == seqs[i][off: off + n]
            lo = data.draw(st.integers(0, len(seqs)))
            assert [x.tolist() for x in ds[lo:]] == seqs[lo:]


@SETTINGS
@given(parts=st.lists(documents(1000), min_size=1, max_size=4), impl=st.sampled_from(["mmap", "lazy"]))
def test_merge_is_concatenation(parts, impl):
    with tempfile.TemporaryDirectory() as d:
        for k, docs in enumerate(parts):
            _write(f"{d}/p{k}", docs, impl, np.int32)
        with create_writer(f"{d}/all", impl=impl, dtype=np.int32) as w:
            for k in range(len(parts)):
                w.add_index(f"{d}/p{k}")
        seqs, bounds = _expected([doc for docs in parts for doc in docs])
        ds = open_dataset(f"{d}/all")
        assert [x.tolist() for x in ds] == seqs and ds.document_indices.tolist() == bounds
