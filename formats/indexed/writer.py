"""Writers: one API (``add_item``, ``add_document``, ``end_document``, ``add_index``, ``finalize``) for
every writable variant, with memory that does not grow with the corpus.

Megatron-Core's builder keeps all lengths and document indices in Python lists until ``finalize``
(tens of bytes per sequence). Here they are buffered in small NumPy chunks and spilled to sidecar files
next to the output; ``finalize`` streams them into the index, computing pointers as int64 prefix sums chunk
by chunk. Token data goes straight to ``<prefix>.bin.tmp-<pid>``; ``add_index`` copies another dataset's
``.bin`` with ``os.copy_file_range`` when the bytes can be reused as they are. Nothing appears under the
final names until ``finalize`` renames the finished files (``.bin`` first, ``.idx`` last).
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator

import numpy as np

from formats import staging
from formats.errors import FormatError, OutputExistsError
from formats.indexed import dtypes
from formats.indexed.header import MMAP_MAGIC, TNT_MAGIC, Variant, split_prefix

_SUFFIXES = (".bin", ".idx", ".lengths", ".docs", ".modes")  # files written as <prefix><suffix>.tmp-<pid>
_CHUNK = 1 << 18  # entries per spilled chunk: ~2 MiB (a few temporaries of it at finalize), whatever the corpus size


class _Column:
    """An append-only integer column spilled to a sidecar file in chunks (flat memory)."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self._file = open(path, "wb")
        self._pending: list[int] = []
        self.count = 0

    def append(self, value: int) -> None:
        self._pending.append(value)
        self.count += 1
        if len(self._pending) >= _CHUNK:
            self._flush()

    def extend(self, values: np.ndarray) -> None:
        self._flush()
        values = np.asarray(values, self.dtype)
        self._file.write(memoryview(np.ascontiguousarray(values)).cast("B"))
        self.count += len(values)

    def _flush(self) -> None:
        if self._pending:
            self._file.write(np.array(self._pending, self.dtype).tobytes())
            self._pending = []

    def chunks(self) -> Iterator[np.ndarray]:
        self._flush()
        self._file.flush()
        with open(self.path, "rb") as f:
            while True:
                data = f.read(_CHUNK * self.dtype.itemsize)
                if not data:
                    return
                yield np.frombuffer(data, self.dtype)

    def discard(self) -> None:
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedWriter:
    """Builds ``<prefix>.bin`` + ``<prefix>.idx`` in one variant.

    Byte-identical to Megatron-Core's ``IndexedDatasetBuilder`` for :attr:`Variant.MMAP` (same items, same
    dtype). TNTIDX follows Megatron-LM's legacy builder (56-byte header, doc index) and fairseq's (48 bytes,
    values stored +1). fairseq mmap has no document index: document boundaries are dropped.
    """

    def __init__(self, prefix: str | os.PathLike, *, impl: str | Variant = Variant.MMAP, dtype=np.int32,
                 multimodal: bool = False, force: bool = False, inputs=()):
        self.prefix = split_prefix(prefix)
        self.variant = impl if isinstance(impl, Variant) else Variant.from_impl(impl)
        self.dtype = np.dtype(dtype)
        self.multimodal = multimodal
        if multimodal and self.variant is not Variant.MMAP:
            raise FormatError(f"multimodal modes exist only in Megatron mmap datasets, not {self.variant.value}",
                              path=self.prefix)
        if not self.variant.is_mmap and self.dtype not in dtypes.LEGACY_WRITABLE:
            raise FormatError(f"the legacy TNTIDX writer cannot store {self.dtype} (Megatron-LM's element-size "
                              "table has no entry for it; use int32)", path=self.prefix)
        self.code = _code_or_error(self.dtype, self.variant.code_table, self.prefix)
        self.force = force
        for path in (self.prefix + ".bin", self.prefix + ".idx"):
            staging.check_output_location(path, [p + ext for p in inputs for ext in ("", ".bin", ".idx")])
            staging.check_replaceable(path, force, lambda p: p.is_file())  # --force replaces our two files only
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(directory):
            raise FormatError("output directory does not exist", path=directory)
        staging.sweep_stale(self.prefix, _SUFFIXES)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = self.prefix + ".bin" + tag
        self._tmp_idx = self.prefix + ".idx" + tag
        for ext in _SUFFIXES:
            staging.register(self.prefix + ext + tag, self.prefix)
        with staging.disk_errors(self.prefix + ".bin"):
            self._bin: BinaryIO = open(self._tmp_bin, "wb", buffering=1 << 20)
            self._lengths = _Column(self.prefix + ".lengths" + tag, np.int64)
            self._docs = _Column(self.prefix + ".docs" + tag, np.int64)
            self._modes = _Column(self.prefix + ".modes" + tag, np.int8) if multimodal else None
        self._docs.append(0)
        self._shift = self.variant.value_shift
        self.num_tokens = 0
        self._done = False

    # -- adding data ------------------------------------------------------------------------------------------
    def _as_dtype(self, tokens) -> np.ndarray:
        if hasattr(tokens, "numpy") and not isinstance(tokens, np.ndarray):
            tokens = tokens.numpy()  # torch tensors, as Megatron-Core's builder accepts
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and not dtypes.fits(arr, self.dtype):
                raise FormatError(f"values {arr.min()}..{arr.max()} do not fit the dataset dtype {self.dtype}",
                                  path=self.prefix)
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def _write(self, arr: np.ndarray) -> None:
        if self._shift:
            if arr.size and not dtypes.fits(arr.astype(np.int64) + self._shift, self.dtype):
                raise FormatError(f"value {arr.max()} + 1 (fairseq's stored offset) overflows {self.dtype}",
                                  path=self.prefix)
            arr = arr + np.array(self._shift, self.dtype)
        self._bin.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self.num_tokens += arr.size

    def add_item(self, tokens, mode: int = 0) -> None:
        """Append one sequence (any integer array-like or torch tensor)."""
        arr = self._as_dtype(tokens)
        self._write(arr)
        self._lengths.append(arr.size)
        if self._modes is not None:
            self._modes.append(mode)

    def add_document(self, tokens, lengths, modes=None) -> None:
        """Append one document: ``tokens`` is its sequences concatenated, ``lengths`` their sizes."""
        arr = self._as_dtype(tokens)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if int(lengths.sum()) != arr.size:
            raise FormatError(f"document lengths sum to {int(lengths.sum())} but it has {arr.size} tokens",
                              path=self.prefix)
        self._write(arr)
        self._lengths.extend(lengths)
        if self._modes is not None:
            self._modes.extend(np.zeros(len(lengths), np.int8) if modes is None else np.asarray(modes, np.int8))
        self.end_document()

    def add_documents(self, tokens, doc_lengths) -> None:
        """Fast path for document-level data: many documents of one sequence each, from one flat array.
        A zero length is an empty document (a boundary without a sequence, as preprocess_data.py writes)."""
        arr = self._as_dtype(tokens)
        doc_lengths = np.asarray(doc_lengths, np.int64)
        if int(doc_lengths.sum()) != arr.size:
            raise FormatError(f"document lengths sum to {int(doc_lengths.sum())} but there are {arr.size} tokens",
                              path=self.prefix)
        self._write(arr)
        nonempty = doc_lengths > 0
        first = self._lengths.count
        self._lengths.extend(doc_lengths[nonempty])
        self._docs.extend(first + np.cumsum(nonempty, dtype=np.int64))
        if self._modes is not None:
            self._modes.extend(np.zeros(int(nonempty.sum()), np.int8))

    def end_document(self) -> None:
        """Close the current document (for use after ``add_item``)."""
        self._docs.append(self._lengths.count)

    def add_index(self, source) -> None:
        """Append a whole dataset (a prefix or an open :class:`~formats.indexed.reader.IndexedDataset`),
        keeping its document boundaries. Same dtype and value convention: ``.bin`` bytes are copied;
        otherwise values are converted (and range-checked)."""
        from formats.indexed.reader import IndexedDataset, open_dataset
        from formats.indexed.verify import scan_pointers

        ds = source if isinstance(source, IndexedDataset) else open_dataset(source, multimodal=self.multimodal or None)
        try:
            if self.multimodal and ds.modes is None:
                raise FormatError("has no multimodal modes but the output is multimodal", path=ds.header.idx_path)
            offset = self._lengths.count
            n = len(ds)
            _, contiguous, _, _ = scan_pointers(ds)
            raw_ok = (contiguous and ds.dtype == self.dtype and ds.variant.value_shift == self._shift
                      and ds._dims is None and not ds.options.cached)
            if raw_ok:
                self._copy_bytes(ds.header.bin_path, n and int(ds.sizes.sum(dtype=np.int64)) * self.dtype.itemsize)
                self.num_tokens += ds.num_tokens
            else:
                step = max(1, _CHUNK // 8)
                for first in range(0, n, step):
                    last = min(n, first + step)
                    if contiguous and ds._dims is None:
                        self._write(self._as_dtype(ds.read_range(first, last)))
                    else:
                        for i in range(first, last):
                            self._write(self._as_dtype(ds._read(i, 0, None)))
            for first in range(0, n, _CHUNK):
                self._lengths.extend(ds.sizes[first: first + _CHUNK])
                if self._modes is not None:
                    self._modes.extend(ds.modes[first: first + _CHUNK])
            docs = ds.document_indices
            for first in range(1, len(docs), _CHUNK):
                self._docs.extend(np.asarray(docs[first: first + _CHUNK], np.int64) + offset)
        finally:
            if ds is not source:
                ds.close()

    def _copy_bytes(self, path: str, nbytes: int) -> None:
        self._bin.flush()
        with open(path, "rb") as src:
            copied = 0
            out_fd, in_fd = self._bin.fileno(), src.fileno()
            try:
                while copied < nbytes:
                    got = os.copy_file_range(in_fd, out_fd, nbytes - copied)
                    if got == 0:
                        break
                    copied += got
            except (OSError, AttributeError):
                src.seek(copied)
                self._bin.seek(0, os.SEEK_END)
                while copied < nbytes:
                    data = src.read(min(1 << 24, nbytes - copied))
                    if not data:
                        break
                    self._bin.write(data)
                    copied += len(data)
            if copied != nbytes:
                raise FormatError(f"ended after {copied} of {nbytes} bytes", path=path)
        self._bin.seek(0, os.SEEK_END)

    # -- finishing ----------------------------------------------------------------------------------------------
    def finalize(self) -> str:
        """Write the index, rename both files into place, remove the sidecars; returns the prefix."""
        if self._done:
            return self.prefix
        try:
            self._bin.close()
            with open(self._tmp_idx, "wb", buffering=1 << 20) as idx:
                if self.variant.is_mmap:
                    self._write_mmap_index(idx)
                else:
                    self._write_tnt_index(idx)
            self._publish()
        except BaseException as exc:
            self.abort()
            err = staging.disk_error(exc, self.prefix + ".bin")
            if err is not None:
                raise err from None
            raise
        self._cleanup()
        for ext in _SUFFIXES:
            staging.unregister(self.prefix + ext + f".tmp-{os.getpid()}")
        self._done = True
        return self.prefix

    def _publish(self) -> None:
        """Rename ``.bin`` then ``.idx`` into place: replacing only with ``force``; without it an output that
        appeared meanwhile (another run) is left alone and our half-published ``.bin`` is taken back."""
        placed = []
        try:
            for tmp, final in ((self._tmp_bin, self.prefix + ".bin"), (self._tmp_idx, self.prefix + ".idx")):
                if self.force:
                    os.replace(tmp, final)
                else:
                    staging.rename_noreplace(tmp, final)
                placed.append(final)
        except FileExistsError:
            for final in placed:
                staging.remove(final)
            raise OutputExistsError("output appeared while this run was writing it; left it untouched "
                                    "(use --force to overwrite)", path=self.prefix) from None

    def _pointer_chunks(self, scale: int) -> Iterator[np.ndarray]:
        """Exclusive prefix sums of lengths × scale, in int64, chunk by chunk."""
        base = 0
        for lengths in self._lengths.chunks():
            ends = np.cumsum(lengths * np.int64(scale), dtype=np.int64) + np.int64(base)
            yield ends - lengths * np.int64(scale)
            if len(ends):
                base = int(ends[-1])

    def _write_mmap_index(self, idx: BinaryIO) -> None:
        count = self._lengths.count
        if self.variant is Variant.MMAP:
            idx.write(MMAP_MAGIC + struct.pack("<QBQQ", 1, self.code, count, self._docs.count))
        else:
            idx.write(MMAP_MAGIC + struct.pack("<QBQ", 1, self.code, count))
        for lengths in self._lengths.chunks():
            if len(lengths) and (lengths.max() > np.iinfo(np.int32).max):
                raise FormatError("a sequence longer than 2**31-1 tokens cannot be indexed", path=self.prefix)
            idx.write(lengths.astype(np.int32).tobytes())
        for pointers in self._pointer_chunks(self.dtype.itemsize):
            idx.write(pointers.tobytes())
        if self.variant is Variant.MMAP:
            for docs in self._docs.chunks():
                idx.write(docs.tobytes())
            if self._modes is not None:
                for modes in self._modes.chunks():
                    idx.write(modes.tobytes())

    def _write_tnt_index(self, idx: BinaryIO) -> None:
        count = self._lengths.count
        fields = [1, self.code, self.dtype.itemsize, count, count]
        if self.variant is Variant.TNTIDX:
            fields.append(self._docs.count)
        idx.write(TNT_MAGIC + struct.pack(f"<{len(fields)}Q", *fields))
        for first in range(0, count + 1, _CHUNK):
            idx.write(np.arange(first, min(count + 1, first + _CHUNK), dtype=np.int64).tobytes())  # dim_offsets
        total = 0
        for offsets in self._pointer_chunks(1):  # data_offsets, in elements
            idx.write(offsets.tobytes())
        for lengths in self._lengths.chunks():
            total += int(lengths.sum())
        idx.write(struct.pack("<q", total))
        for lengths in self._lengths.chunks():  # sizes (1-D items)
            idx.write(lengths.tobytes())
        if self.variant is Variant.TNTIDX:
            for docs in self._docs.chunks():
                idx.write(docs.tobytes())

    def _cleanup(self) -> None:
        for column in (self._lengths, self._docs, self._modes):
            if column is not None:
                column.discard()

    def abort(self) -> None:
        """Drop everything written so far (temporary files only; existing outputs are untouched)."""
        if not self._bin.closed:
            self._bin.close()
        self._cleanup()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        for ext in _SUFFIXES:
            staging.unregister(self.prefix + ext + f".tmp-{os.getpid()}")
        self._done = True

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
            err = staging.disk_error(exc, self.prefix + ".bin")
            if err is not None:
                raise err from None


def _code_or_error(dtype: np.dtype, table, prefix: str) -> int:
    try:
        return dtypes.code_for(dtype, table)
    except ValueError:
        raise FormatError(f"dtype {dtype} cannot be stored in this format", path=prefix) from None


def default_dtype(impl: str | Variant, wanted) -> np.dtype:
    """The element type a writer of ``impl`` uses for data of type ``wanted``: Megatron-LM's legacy
    (TNTIDX) builder cannot store uint16 and always wrote int32, so ``wanted`` is widened to int32 there."""
    variant = impl if isinstance(impl, Variant) else Variant.from_impl(impl)
    wanted = np.dtype(wanted)
    if not variant.is_mmap and wanted not in dtypes.LEGACY_WRITABLE:
        return np.dtype(np.int32)
    return wanted


def create_writer(prefix: str | os.PathLike, *, impl: str | Variant = "mmap", dtype=np.int32,
                  multimodal: bool = False, force: bool = False, inputs=()) -> IndexedWriter:
    """Start writing ``prefix.bin``/``prefix.idx``; see :class:`IndexedWriter`. ``inputs`` (prefixes or files
    being read) must not be among the outputs: with ``--force`` that would delete what is being read."""
    return IndexedWriter(prefix, impl=impl, dtype=dtype, multimodal=multimodal, force=force,
                         inputs=[os.fspath(p) for p in inputs])
