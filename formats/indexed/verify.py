"""Full O(n) checks of an indexed dataset and its summary statistics (``interop data verify|inspect``).

Megatron-Core's reader checks only the magic, version, dtype code and ``S == C[D-1]``; everything else
(pointers that are not prefix sums, a ``.bin`` of the wrong size, a non-monotone document index) surfaces
later as garbage tokens in training. These checks run chunk by chunk over the mapped index so they need
no more memory on a 1e9-token dataset than on a toy one, and they name the historical bugs they recognise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from formats.errors import FormatError
from formats.indexed.header import Variant
from formats.indexed.reader import open_dataset

_CHUNK = 1 << 20


@dataclass
class Finding:
    check: str
    ok: bool
    message: str


@dataclass
class VerifyReport:
    prefix: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def add(self, check: str, ok: bool, message: str) -> None:
        self.findings.append(Finding(check, bool(ok), message))

    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


def verify(prefix: str, *, multimodal: bool | None = None, dtype=None) -> VerifyReport:
    """Check every structural invariant of the dataset; header errors become a single failed check."""
    report = VerifyReport(prefix)
    try:
        ds = open_dataset(prefix, multimodal=multimodal, dtype=dtype)
    except FormatError as exc:
        report.add("header", False, str(exc))
        return report
    with ds:
        h = ds.header
        report.add("header", True, f"{h.variant.value}, version 1, dtype code {h.dtype_code} = {h.dtype}, "
                                   f"{len(ds)} sequences, index size {h.idx_size} bytes matches")
        if h.dtype_note:
            report.add("dtype", True, h.dtype_note)
        lengths_ok, pointers_ok, total, first_bad = scan_pointers(ds)
        report.add("lengths", lengths_ok, "all sequence lengths >= 0" if lengths_ok else "negative sequence length")
        report.add("pointers", pointers_ok, "pointers are the prefix sums of lengths x itemsize" if pointers_ok
                   else f"pointer of sequence {first_bad} is not the prefix sum of the lengths before it")
        _check_documents(ds, report)
        _check_bin_size(ds, total, report)
    return report


def scan_pointers(ds) -> tuple[bool, bool, int, int]:
    """One chunked pass: (all lengths >= 0, pointers are the exclusive prefix sums of lengths x itemsize,
    total tokens, first sequence whose pointer is off or -1). The writer's ``add_index`` uses the second to
    decide whether a source's ``.bin`` is contiguous and can be copied byte for byte."""
    itemsize, base, lengths_ok, first_bad = ds.dtype.itemsize, 0, True, -1
    for first in range(0, len(ds), _CHUNK):
        lengths = np.asarray(ds.sizes[first: first + _CHUNK], np.int64)
        if len(lengths) and lengths.min() < 0:
            lengths_ok = False
        ends = np.cumsum(lengths * itemsize) + base
        bad = np.flatnonzero(ends - lengths * itemsize != ds.pointers[first: first + _CHUNK])
        if first_bad < 0 and len(bad):
            first_bad = first + int(bad[0])
        if len(ends):
            base = int(ends[-1])
    return lengths_ok, first_bad < 0, base // itemsize, first_bad


def _check_documents(ds, report: VerifyReport) -> None:
    if not ds.has_document_index:
        report.add("documents", True, f"{ds.variant.value} has no document index (each sequence is a document)")
        return
    doc = ds.document_indices
    expected_end = len(ds) if ds._dims is None else ds.header.num_size_entries
    problems = []
    if len(doc) == 0 or int(doc[0]) != 0:
        problems.append("does not start at 0")
    if len(doc) and int(doc[-1]) != expected_end:
        problems.append(f"ends at {int(doc[-1])}, expected {expected_end}")
    decreasing, empty = False, 0
    for first in range(0, len(doc), _CHUNK):  # each chunk starts one entry back, so every step is seen once
        steps = np.diff(np.asarray(doc[max(0, first - 1): first + _CHUNK]))
        decreasing = decreasing or bool((steps < 0).any())
        empty += int(np.count_nonzero(steps == 0))
    if decreasing:
        problems.append("is not non-decreasing")
    message = "; ".join(problems) if problems else f"{len(doc) - 1} documents ({empty} empty), bounds and order ok"
    report.add("documents", not problems, ("document index " + message) if problems else message)


def _check_bin_size(ds, total_tokens: int, report: VerifyReport) -> None:
    h, itemsize = ds.header, ds.dtype.itemsize
    expected = total_tokens * itemsize
    if h.bin_size == expected:
        report.add("bin size", True, f".bin has {h.bin_size} bytes = {total_tokens} tokens x {itemsize}")
        return
    extra = h.bin_size - expected
    message = f".bin has {h.bin_size} bytes but the lengths add up to {total_tokens} tokens x {itemsize} = {expected}"
    nonempty_docs = _nonempty_documents(ds)
    if extra > 0 and nonempty_docs and extra == nonempty_docs * itemsize and h.variant is Variant.MMAP:
        message += (f"; the {extra // itemsize} extra tokens are one per document: Megatron-LM's 2023 EOD-length bug "
                    "(--append-eod wrote EOD but did not count it, preprocess_data.py 2023-06-26..08-05, issue #431); "
                    "re-preprocess the corpus")
    elif h.dtype_note and total_tokens and h.bin_size in (total_tokens * 4, total_tokens * 8):
        message += f"; the size fits {h.bin_size // total_tokens}-byte elements: reopen with --dtype float{8 * h.bin_size // total_tokens}"
    report.add("bin size", False, message)


def _nonempty_documents(ds) -> int:
    doc = np.asarray(ds.document_indices)
    return int(np.count_nonzero(np.diff(doc) > 0)) if len(doc) > 1 else 0


def summarize(ds) -> dict:
    """What ``interop data inspect`` prints: variant, dtype, counts, length percentiles, empty documents."""
    h = ds.header
    sizes = np.asarray(ds.sizes)
    doc = np.asarray(ds.document_indices)
    if ds.has_document_index and len(doc) and (doc.min() < 0 or doc.max() > len(sizes) or (np.diff(doc) < 0).any()):
        raise FormatError("document index is out of range or not non-decreasing; `interop data verify` names "
                          "the problem", path=h.idx_path)
    if ds.has_document_index and len(doc) > 1:
        seq_ends = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        doc_tokens = seq_ends[doc[1:]] - seq_ends[doc[:-1]]
    else:
        doc_tokens = sizes.astype(np.int64)
    pct = [0, 50, 90, 99, 100]
    lengths = {f"p{p}": int(v) for p, v in zip(pct, np.percentile(sizes, pct, method="lower"))} if len(sizes) else {}
    return {
        "prefix": ds.prefix,
        "variant": h.variant.value,
        "multimodal": h.multimodal,
        "dtype": str(ds.dtype),
        "dtype_code": h.dtype_code,
        "dtype_note": h.dtype_note,
        "sequences": len(ds),
        "documents": ds.num_documents,
        "has_document_index": ds.has_document_index,
        "tokens": int(sizes.sum(dtype=np.int64)),
        "empty_sequences": int(np.count_nonzero(sizes == 0)),
        "empty_documents": int(np.count_nonzero(doc_tokens == 0)),
        "sequence_length": lengths,
        "document_tokens_mean": float(doc_tokens.mean()) if len(doc_tokens) else 0.0,
        "idx_bytes": h.idx_size,
        "bin_bytes": h.bin_size,
    }
