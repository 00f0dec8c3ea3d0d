"""Fuzz: mutated headers, mutated index bodies, truncated and extended files. Every case must either be
read (every item, get(), verify) or rejected with our FormatError; never a numpy traceback, never a hang."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.errors import FormatError
from formats.indexed import create_writer, open_dataset
from formats.indexed.verify import verify

DOCS = [[[1, 2, 3, 0]], [[5, 6]], [], [[7, 8, 9], [10]], [[11]]]
IMPLS = ["mmap", "lazy", "fairseq-mmap", "fairseq-lazy"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    out = {}
    for impl in IMPLS:
        prefix = str(root / impl)
        with create_writer(prefix, impl=impl, dtype=np.int32) as w:
            for doc in DOCS:
                for seq in doc:
                    w.add_item(seq)
                w.end_document()
        out[impl] = (open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read())
    return out


def _exercise(prefix):
    """Read everything; return 'ok' or 'rejected'. Any other exception fails the test."""
    report = verify(prefix)  # must never raise
    assert report.findings
    try:
        for mmap in (True, False):
            with open_dataset(prefix, mmap=mmap) as ds:
                for i in range(len(ds)):
                    ds[i]
                    ds.get(i, 0, None)
                ds[0:len(ds)]
                ds.document_indices
        return "ok"
    except FormatError as exc:
        assert "\n" not in str(exc) and prefix in str(exc)
        return "rejected"


def _put(tmp_path, idx, binary):
    prefix = str(tmp_path / "case")
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(binary)
    return prefix


@pytest.mark.parametrize("impl", IMPLS)
def test_every_header_byte_mutated(tmp_path, originals, impl):
    idx, binary = originals[impl]
    header = 56 if impl == "lazy" else 48 if impl == "fairseq-lazy" else 34 if impl == "mmap" else 26
    outcomes = set()
    for pos in range(header):
        for value in {0, 1, 0xFF, idx[pos] ^ 0x01, (idx[pos] + 1) % 256, 0x80}:
            mutated = idx[:pos] + bytes([value]) + idx[pos + 1:]
            outcomes.add(_exercise(_put(tmp_path, mutated, binary)))
    assert outcomes == {"ok", "rejected"}


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_and_extended_files_are_rejected(tmp_path, originals, impl):
    idx, binary = originals[impl]
    for cut in range(len(idx)):
        assert _exercise(_put(tmp_path, idx[:cut], binary)) == "rejected", cut
    for cut in range(0, len(binary), 3):
        assert _exercise(_put(tmp_path, idx, binary[:cut])) == "rejected", cut
    assert _exercise(_put(tmp_path, idx + b"\x00" * 3, binary)) == "rejected"
    # a longer .bin is readable, but verify names the problem
    prefix = _put(tmp_path, idx, binary + b"\x00" * 8)
    assert _exercise(prefix) == "ok" and not verify(prefix).ok


def test_missing_and_foreign_files(tmp_path, originals):
    idx, binary = originals["mmap"]
    prefix = _put(tmp_path, idx, binary)
    os.remove(prefix + ".bin")
    with pytest.raises(FormatError, match=r"case\.bin: missing file"):
        open_dataset(prefix)
    foreign = _put(tmp_path, b"PK\x03\x04 a zip file, not an index", binary)
    with pytest.raises(FormatError, match="bad magic"):
        open_dataset(foreign)
    empty = _put(tmp_path, b"", b"")
    with pytest.raises(FormatError):
        open_dataset(empty)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(impl=st.sampled_from(IMPLS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                    min_size=1, max_size=4))
def test_random_body_mutations(tmp_path, originals, impl, edits):
    idx, binary = originals[impl]
    mutated = bytearray(idx)
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    _exercise(_put(tmp_path, bytes(mutated), binary))


def test_eod_length_bug_is_named(tmp_path):
    """Megatron-LM 2023 (issue #431): --append-eod wrote EOD to .bin without counting it in the lengths."""
    prefix = str(tmp_path / "bug")
    docs = [[1, 2, 3], [4, 5]]
    with create_writer(prefix, dtype=np.uint16) as w:
        for doc in docs:
            w.add_item(doc)
            w.end_document()
    with open(prefix + ".bin", "wb") as f:  # what the buggy tool wrote: tokens + EOD per document
        f.write(np.array([1, 2, 3, 0, 4, 5, 0], np.uint16).tobytes())
    report = verify(prefix)
    assert not report.ok and any("EOD-length bug" in f.message for f in report.findings)


def test_broken_2023_multimodal_layout_is_named(tmp_path):
    """Megatron-LM 2023-07-25..10-26 wrote multimodal modes as i32 between lengths and pointers (spec 1.12)."""
    lengths, pointers, docs = np.array([2, 3], "<i4"), np.array([0, 8], "<i8"), np.array([0, 2], "<i8")
    idx = (b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + b"\x04" + (2).to_bytes(8, "little")
           + (2).to_bytes(8, "little") + lengths.tobytes() + np.array([0, 1], "<i4").tobytes()
           + pointers.tobytes() + docs.tobytes())
    prefix = _put(tmp_path, idx, np.arange(5, dtype="<i4").tobytes())
    with pytest.raises(FormatError, match="multimodal builder of 2023"):
        open_dataset(prefix)
