"""Sniffing: which indexed variant a ``.idx`` file is, and its header, from bytes and file sizes alone.

Two pairs of variants share a magic (docs/indexed-formats.md §1.11, §2.1): Megatron and fairseq mmap both start with
``MMIDIDX\\0\\0``, Megatron and fairseq TNTIDX both with ``TNTIDX\\0\\0``. The header has no field that tells
them apart, but the exact ``.idx`` size does, unambiguously (the size equations can never coincide), and
it also says whether Megatron's multimodal modes array is present. Every check here is O(1): a 1e9-token
dataset opens instantly; the O(n) checks live in :mod:`formats.indexed.verify`.
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

import numpy as np

from formats.errors import FormatError
from formats.indexed import dtypes

MMAP_MAGIC = b"MMIDIDX\x00\x00"
TNT_MAGIC = b"TNTIDX\x00\x00"


class Variant(str, enum.Enum):
    """The four on-disk layouts (docs/indexed-formats.md §1, §2)."""

    MMAP = "mmap"  # Megatron-LM / Megatron-Core MMIDIDX, 34-byte header + document index
    FAIRSEQ_MMAP = "fairseq-mmap"  # fairseq MMIDIDX, 26-byte header, no document index
    TNTIDX = "tntidx"  # Megatron-LM lazy/cached, 56-byte header + doc_idx, values as-is
    FAIRSEQ_TNTIDX = "fairseq-tntidx"  # fairseq lazy/cached, 48-byte header, values stored +1

    @property
    def is_mmap(self) -> bool:
        return self in (Variant.MMAP, Variant.FAIRSEQ_MMAP)

    @property
    def is_fairseq(self) -> bool:
        return self in (Variant.FAIRSEQ_MMAP, Variant.FAIRSEQ_TNTIDX)

    @property
    def code_table(self) -> dict[int, np.dtype]:
        return dtypes.FAIRSEQ_CODES if self.is_fairseq else dtypes.MEGATRON_CODES

    @property
    def value_shift(self) -> int:
        """What the producer added to every stored value (fairseq's Lua "+1", docs/indexed-formats.md §2.3)."""
        return 1 if self is Variant.FAIRSEQ_TNTIDX else 0

    @classmethod
    def from_impl(cls, impl: str) -> "Variant":
        """Map the user-facing ``--impl`` names (Megatron's lazy/cached and fairseq's) to a layout."""
        names = {
            "mmap": cls.MMAP, "lazy": cls.TNTIDX, "cached": cls.TNTIDX, "tntidx": cls.TNTIDX,
            "fairseq-mmap": cls.FAIRSEQ_MMAP, "fairseq-lazy": cls.FAIRSEQ_TNTIDX,
            "fairseq-cached": cls.FAIRSEQ_TNTIDX, "fairseq-tntidx": cls.FAIRSEQ_TNTIDX,
        }
        try:
            return names[impl]
        except KeyError:
            raise FormatError(f"unknown dataset implementation {impl!r} (expected one of {', '.join(names)})") from None


IMPL_CHOICES = ["mmap", "lazy", "cached", "fairseq-mmap", "fairseq-lazy", "fairseq-cached"]


@dataclass(frozen=True)
class IndexHeader:
    """What the ``.idx`` header and size say: layout, element type, counts and where each array starts."""

    variant: Variant
    idx_path: str
    bin_path: str
    dtype: np.dtype
    dtype_code: int
    dtype_note: str | None  # set when the code is ambiguous across producers (6/7) or was overridden
    num_sequences: int  # S (mmap) / N (TNTIDX)
    num_doc_entries: int  # D: document-index entries incl. the leading 0; 0 for fairseq
    multimodal: bool
    idx_size: int
    bin_size: int
    header_size: int
    num_size_entries: int = 0  # TNTIDX: entries of the `sizes` (shapes) array
    element_size: int = 0  # TNTIDX: header's element size


def split_prefix(path: str | os.PathLike) -> str:
    """Accept ``prefix``, ``prefix.idx`` or ``prefix.bin`` alike."""
    path = os.fspath(path)
    return path[:-4] if path.endswith((".idx", ".bin")) else path


def read_header(prefix: str | os.PathLike, *, multimodal: bool | None = None,
                dtype: np.dtype | type | str | None = None) -> IndexHeader:
    """Sniff and validate ``prefix.idx`` / ``prefix.bin``; raise :class:`FormatError` naming the file."""
    prefix = split_prefix(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FormatError("missing file (an indexed dataset is a .idx/.bin pair)", path=path)
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        head = f.read(64)
    if head[:9] == MMAP_MAGIC:
        header = _mmap_header(head, idx_path, bin_path, idx_size, bin_size, multimodal)
    elif head[:8] == TNT_MAGIC:
        if multimodal:
            raise FormatError("TNTIDX datasets have no multimodal modes", path=idx_path)
        header = _tnt_header(head, idx_path, bin_path, idx_size, bin_size)
    else:
        raise FormatError(f"bad magic {head[:9]!r}: not an indexed dataset (expected MMIDIDX or TNTIDX)", path=idx_path)
    return _resolve_dtype(header, dtype)


def _unpack(fmt: str, head: bytes, offset: int, path: str, what: str):
    size = struct.calcsize(fmt)
    if len(head) < offset + size:
        raise FormatError(f"truncated header: {len(head)} bytes, {what} needs {offset + size}", path=path)
    return struct.unpack_from(fmt, head, offset)[0]


def _mmap_header(head, idx_path, bin_path, idx_size, bin_size, multimodal) -> IndexHeader:
    version = _unpack("<Q", head, 9, idx_path, "the version")
    if version != 1:
        raise FormatError(f"bad version {version} (expected 1)", path=idx_path)
    code = _unpack("<B", head, 17, idx_path, "the dtype code")
    count = _unpack("<Q", head, 18, idx_path, "the sequence count")
    if 12 * count > idx_size:
        raise FormatError(f"truncated or corrupt: header says {count} sequences but the file has {idx_size} bytes", path=idx_path)
    variant = None
    docs = 0
    if idx_size >= 34:
        docs = struct.unpack_from("<Q", head, 26)[0]
        base = 34 + 12 * count + 8 * docs
        if docs >= 1 and idx_size == base and not multimodal:
            variant, mm = Variant.MMAP, False
        elif docs >= 1 and idx_size == base + count and multimodal is not False:
            variant, mm = Variant.MMAP, True
        elif docs >= 1 and idx_size == base + count and count > 0:
            variant, mm = Variant.MMAP, False  # modes present but not wanted: ignored, as Megatron-Core does
    if variant is None and idx_size == 26 + 12 * count and not multimodal:
        variant, mm, docs = Variant.FAIRSEQ_MMAP, False, 0
    if variant is None:
        expected = f"{34 + 12 * count + 8 * docs} (Megatron{', +' + str(count) + ' with modes' if count else ''}) or {26 + 12 * count} (fairseq)"
        if multimodal:
            expected = f"{34 + 13 * count + 8 * docs} (Megatron multimodal)"
        if count and docs >= 1 and idx_size == 34 + 16 * count + 8 * docs:
            raise FormatError("written by Megatron-LM's multimodal builder of 2023-07-25..2023-10-26, which put i32 "
                              "modes between lengths and pointers; no Megatron reader can read it (spec 1.12)", path=idx_path)
        raise FormatError(f"truncated or corrupt: {idx_size} bytes for S={count}, D={docs}; expected {expected}", path=idx_path)
    variant_table = variant.code_table
    if code not in variant_table:
        raise FormatError(f"unknown dtype code {code} for {variant.value}", path=idx_path)
    return IndexHeader(variant, idx_path, bin_path, variant_table[code], code, dtypes.AMBIGUOUS_CODES.get(code),
                       count, docs, mm, idx_size, bin_size, 34 if variant is Variant.MMAP else 26)


def _tnt_header(head, idx_path, bin_path, idx_size, bin_size) -> IndexHeader:
    version = _unpack("<Q", head, 8, idx_path, "the version")
    if version != 1:
        raise FormatError(f"bad version {version} (expected 1)", path=idx_path)
    code = _unpack("<Q", head, 16, idx_path, "the dtype code")
    element_size = _unpack("<Q", head, 24, idx_path, "the element size")
    count = _unpack("<Q", head, 32, idx_path, "the item count")
    nsizes = _unpack("<Q", head, 40, idx_path, "the sizes count")
    body = 8 * (2 * count + 2 + nsizes)
    variant, docs = None, 0
    if idx_size >= 56:
        docs = struct.unpack_from("<Q", head, 48)[0]
        if docs >= 1 and idx_size == 56 + body + 8 * docs:
            variant = Variant.TNTIDX
    if variant is None and idx_size == 48 + body:
        variant, docs = Variant.FAIRSEQ_TNTIDX, 0
    if variant is None:
        raise FormatError(f"truncated or corrupt: {idx_size} bytes for N={count}, sizes={nsizes}; expected "
                          f"{56 + body + 8 * docs} (Megatron) or {48 + body} (fairseq)", path=idx_path)
    table = variant.code_table
    if code not in table:
        raise FormatError(f"unknown dtype code {code} for {variant.value}", path=idx_path)
    note = dtypes.AMBIGUOUS_CODES.get(code)
    if note and element_size in (4, 8):  # the header's element size settles the float width
        table = {**table, code: np.dtype(np.float32 if element_size == 4 else np.float64)}
        note = f"{note}; element size {element_size} says {table[code]}"
    if element_size != table[code].itemsize:
        raise FormatError(f"element size {element_size} does not match dtype code {code} ({table[code]})", path=idx_path)
    return IndexHeader(variant, idx_path, bin_path, table[code], code, note, count, docs,
                       False, idx_size, bin_size, 56 if variant is Variant.TNTIDX else 48, nsizes, element_size)


def _resolve_dtype(header: IndexHeader, override) -> IndexHeader:
    from dataclasses import replace

    if override is not None:
        dtype = np.dtype(override)
        if header.variant.is_mmap and dtype.itemsize != header.dtype.itemsize and header.dtype_note is None:
            raise FormatError(f"--dtype {dtype} has a different item size than the file's code {header.dtype_code} "
                              f"({header.dtype})", path=header.idx_path)
        return replace(header, dtype=dtype, dtype_note=f"dtype overridden to {dtype} (file code {header.dtype_code})")
    return header
