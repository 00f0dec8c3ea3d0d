"""Readers: one typed dataset class over every indexed variant, opened by :func:`open_dataset`.

Item access mirrors Megatron-Core's ``IndexedDataset`` (``ds[i]``, ``ds.get(i, offset, length)``,
contiguous slices, ``(tokens, mode)`` for multimodal files) so the trainer and users can swap it in, but it
is cheaper per item: the index arrays are read through ``memoryview`` casts of the mapped ``.idx`` (a Python
int per lookup instead of a NumPy scalar), and mmap items are zero-copy views of the mapped ``.bin``.
Every failure a corrupt file can cause (offsets past the end, negative lengths, short reads) becomes a
:class:`FormatError` naming the file.
"""
from __future__ import annotations

import mmap as _mmap
import os
import sys
from dataclasses import dataclass

import numpy as np

from formats.errors import FormatError
from formats.indexed.header import IndexHeader, Variant, read_header, split_prefix


@dataclass(frozen=True)
class OpenOptions:
    """How a dataset was opened; pickled instead of the mapped files so DataLoader workers reopen it."""

    multimodal: bool | None = None
    mmap: bool = True
    dtype: str | None = None  # override for ambiguous codes (6/7)
    cached: bool = False  # read the whole .bin into RAM (the legacy "cached" reader)


class IndexedDataset:
    """A read-only indexed dataset (any variant). Sequences are 1-D NumPy arrays of :attr:`dtype`."""

    def __init__(self, prefix: str | os.PathLike, options: OpenOptions = OpenOptions()):
        self.prefix = split_prefix(prefix)
        self.options = options
        self.header: IndexHeader = read_header(self.prefix, multimodal=options.multimodal, dtype=options.dtype)
        self._open()

    # -- opening -------------------------------------------------------------------------------------------
    def _open(self) -> None:
        h = self.header
        if sys.byteorder != "little":  # pragma: no cover - every producer writes little-endian
            raise FormatError("big-endian hosts are not supported", path=h.idx_path)
        self._idx_file = open(h.idx_path, "rb")
        self._idx = _mmap.mmap(self._idx_file.fileno(), 0, access=_mmap.ACCESS_READ)
        self._views: list[memoryview] = []
        n = h.num_sequences
        self._shift = h.variant.value_shift
        if h.variant.is_mmap:
            start = h.header_size
            self.sizes = np.frombuffer(self._idx, np.int32, n, start)
            self.pointers = np.frombuffer(self._idx, np.int64, n, start + 4 * n)
            self._len = self._cast(start, n, "i")
            self._ptr = self._cast(start + 4 * n, n, "q")
            if h.variant is Variant.MMAP:
                self._doc = np.frombuffer(self._idx, np.int64, h.num_doc_entries, start + 12 * n)
            else:
                self._doc = None
            mode_start = start + 12 * n + 8 * h.num_doc_entries
            self.modes = np.frombuffer(self._idx, np.int8, n, mode_start) if h.multimodal else None
            self._mm_modes = self._cast(mode_start, n, "b") if h.multimodal else None
            self._dims = None
        else:
            start = h.header_size
            dim_offsets = np.frombuffer(self._idx, np.int64, n + 1, start)
            data_offsets = np.frombuffer(self._idx, np.int64, n + 1, start + 8 * (n + 1))
            shapes = np.frombuffer(self._idx, np.int64, h.num_size_entries, start + 16 * (n + 1))
            self._doc = (np.frombuffer(self._idx, np.int64, h.num_doc_entries, start + 16 * (n + 1) + 8 * h.num_size_entries)
                         if h.variant is Variant.TNTIDX else None)
            self.sizes = np.diff(data_offsets)
            self.pointers = data_offsets[:-1] * h.element_size
            self._len = self.sizes.tolist()
            self._ptr = self.pointers.tolist()
            self.modes = self._mm_modes = None
            # items of more than one dimension keep their shape (rare: token data is 1-D)
            self._dims = None if np.array_equal(dim_offsets, np.arange(n + 1)) else (dim_offsets, shapes)
            self._check_legacy_offsets(dim_offsets, data_offsets, shapes)
        self._check_cheap()
        self._fd = None
        self._bin = None
        if self.options.cached:
            with open(h.bin_path, "rb") as f:
                self._bin = f.read()
        elif self.options.mmap and h.bin_size > 0:
            self._bin_file = open(h.bin_path, "rb")
            self._bin = _mmap.mmap(self._bin_file.fileno(), 0, access=_mmap.ACCESS_READ)
        elif self.options.mmap:
            self._bin = b""
        else:
            self._fd = os.open(h.bin_path, os.O_RDONLY)
        self._itemsize = self.dtype.itemsize

    def _cast(self, offset: int, count: int, fmt: str) -> memoryview:
        """A typed view of part of the index: Python ints on access, unaligned-safe (CPython memcpy's)."""
        size = {"i": 4, "q": 8, "b": 1}[fmt]
        view = memoryview(self._idx)[offset: offset + size * count].cast(fmt)
        self._views.append(view)
        return view

    def _check_legacy_offsets(self, dim_offsets, data_offsets, shapes) -> None:
        """TNTIDX readers load the whole index anyway, so its offsets are validated in full here."""
        path = self.header.idx_path
        if int(data_offsets[0]) != 0 or (np.diff(data_offsets) < 0).any():
            raise FormatError("data offsets do not start at 0 and increase", path=path)
        if int(dim_offsets[0]) != 0 or int(dim_offsets[-1]) != len(shapes) or (np.diff(dim_offsets) < 0).any():
            raise FormatError("dimension offsets do not cover the sizes array in order", path=path)
        if self._dims is None:
            ok = np.array_equal(shapes, self.sizes)
        else:
            ok = all(int(np.prod(shapes[int(a): int(b)])) == int(n)
                     for a, b, n in zip(dim_offsets[:-1], dim_offsets[1:], self.sizes))
        if not ok:
            raise FormatError("item shapes disagree with the data offsets", path=path)

    def _check_cheap(self) -> None:
        """O(1) consistency checks done on open (full checks: :func:`formats.indexed.verify.verify`)."""
        h, n = self.header, self.header.num_sequences
        if self._doc is not None and len(self._doc) and int(self._doc[-1]) != (n if self._dims is None else h.num_size_entries):
            raise FormatError(f"document index ends at {int(self._doc[-1])} but there are {n} sequences", path=h.idx_path)
        if n:
            last = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
            if last > h.bin_size or int(self.pointers[0]) < 0:
                raise FormatError(f"the index points to byte {last} but the file has {h.bin_size} bytes",
                                  path=h.bin_path)

    # -- the typed API ---------------------------------------------------------------------------------------
    @property
    def variant(self) -> Variant:
        return self.header.variant

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def multimodal(self) -> bool:
        return self.header.multimodal

    @property
    def has_document_index(self) -> bool:
        return self._doc is not None

    @property
    def document_indices(self) -> np.ndarray:
        """Sequence index where each document starts, plus the end (``D`` entries). fairseq files have no
        document index: every sequence is then its own document."""
        if self._doc is None:
            return np.arange(len(self) + 1, dtype=np.int64)
        return self._doc

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __len__(self) -> int:
        return self.header.num_sequences

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            tokens = self._read(idx, 0, None)
            return (tokens, self._mm_modes[idx]) if self._mm_modes is not None else tokens
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an indexed dataset must be contiguous (step 1)")
            items = [self._read(i, 0, None) for i in range(start, stop)]
            return (items, self.modes[start:stop]) if self.modes is not None else items
        raise TypeError(f"unexpected index type {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None):
        """``length`` tokens of sequence ``idx`` from token ``offset`` (default: to its end)."""
        tokens = self._read(idx, offset, length)
        return (tokens, self._mm_modes[idx]) if self._mm_modes is not None else tokens

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def document(self, k: int) -> list[np.ndarray]:
        """The sequences of document ``k``."""
        doc = self.document_indices
        return [self._read(i, 0, None) for i in range(int(doc[k]), int(doc[k + 1]))]

    def read_range(self, first: int, last: int) -> np.ndarray:
        """Sequences ``[first, last)`` as one flat array (they are contiguous when pointers are prefix sums)."""
        if first >= last:
            return np.empty(0, self.dtype)
        count = int(self.sizes[first:last].sum(dtype=np.int64))
        return self._raw(int(self.pointers[first]), count, first)

    def _read(self, idx, offset, length) -> np.ndarray:
        try:
            n = self._len[idx]
            ptr = self._ptr[idx]
        except IndexError:
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences") from None
        if self._dims is not None:
            return self._read_shaped(idx)
        if length is None:
            length = n - offset
        if offset or length != n:
            if offset < 0 or length < 0 or offset + length > n:
                raise IndexError(f"get({idx}, offset={offset}, length={length}) outside a sequence of {n} tokens")
        return self._raw(ptr + offset * self._itemsize, length, idx)

    def _raw(self, byte_offset: int, count: int, idx) -> np.ndarray:
        try:
            if count < 0 or byte_offset < 0:
                raise ValueError
            if self._fd is None:
                out = np.frombuffer(self._bin, self.header.dtype, count, byte_offset)
            else:
                out = np.empty(count, self.header.dtype)
                if os.preadv(self._fd, [out], byte_offset) != out.nbytes:
                    raise ValueError
        except ValueError:
            raise FormatError(f"sequence {idx}: {count} tokens at byte {byte_offset} lie outside the file "
                              f"({self.header.bin_size} bytes)", path=self.header.bin_path) from None
        if self._shift:
            out = out - self._shift  # fairseq's Lua "+1" (spec 2.3)
        return out

    def _read_shaped(self, idx) -> np.ndarray:
        dim_offsets, shapes = self._dims
        shape = tuple(int(s) for s in shapes[int(dim_offsets[idx]): int(dim_offsets[idx + 1])])
        return self._raw(self._ptr[idx], self._len[idx], idx).reshape(shape)

    # -- lifetime and pickling -------------------------------------------------------------------------------
    def __getstate__(self):
        return (self.prefix, self.options)

    def __setstate__(self, state):
        self.prefix, self.options = state
        self.header = read_header(self.prefix, multimodal=self.options.multimodal, dtype=self.options.dtype)
        self._open()

    def close(self) -> None:
        """Release the files; arrays handed out earlier keep the mapping alive until they are dropped."""
        for view in getattr(self, "_views", []):
            view.release()
        self._views = []
        for name in ("sizes", "pointers", "_doc", "modes", "_len", "_ptr", "_mm_modes"):
            setattr(self, name, None)
        for name in ("_bin", "_idx"):
            obj = getattr(self, name, None)
            if isinstance(obj, _mmap.mmap):
                try:
                    obj.close()
                except BufferError:
                    pass
            setattr(self, name, None)
        for name in ("_bin_file", "_idx_file"):
            f = getattr(self, name, None)
            if f is not None:
                f.close()
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, variant={self.variant.value}, dtype={self.dtype}, "
                f"sequences={len(self)}, documents={self.num_documents})")


def open_dataset(prefix: str | os.PathLike, *, multimodal: bool | None = None, mmap: bool = True,
                 dtype=None, cached: bool = False) -> IndexedDataset:
    """Open any indexed dataset by prefix (``prefix.idx``/``prefix.bin``; a ``.idx``/``.bin`` path works too).

    ``multimodal=None`` infers Megatron's modes array from the file size; ``mmap=False`` reads items with
    ``pread`` (Megatron's ``--no-mmap-bin-files``); ``cached=True`` loads ``.bin`` into RAM (the legacy
    "cached" reader); ``dtype`` overrides the element type for the ambiguous float codes 6/7.
    """
    return IndexedDataset(prefix, OpenOptions(multimodal=multimodal, mmap=mmap,
                                              dtype=None if dtype is None else np.dtype(dtype).str, cached=cached))
