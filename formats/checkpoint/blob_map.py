"""A one-tensor ``torch.save`` blob inside a bigger file (a ``torch_dist`` chunk), as a view of a file mapping.

Why: a ``torch_dist`` data file is a run of ``torch.save`` blobs. Reading one the obvious way — read its bytes,
``torch.load`` them from memory, copy the wanted region out — copies every byte three times; on the 2-core VM
that made Megatron torch_dist -> HF conversions ~3× slower than from the per-rank ``torch`` format, which is
memory-mapped. Here the blob's zip is parsed in place (stored records only, as torch writes them), its
``data.pkl`` unpickled with an unpickler that accepts nothing but one ``_rebuild_tensor_v2`` call on one storage,
and the tensor is ``torch.frombuffer`` over a read-only mapping of the file: the caller's copy is the only one
(where the storage is not element-aligned in the file — DCP packs blobs back to back — one aligned copy first).
Anything else (zip64, compression, several tensors, a tensor that is not ``(size, stride, offset)`` of its
storage) returns None and the caller falls back to ``torch.load``.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import warnings
from pathlib import Path

import torch

from formats.checkpoint.crc import check_record
from formats.checkpoint.megatron import release_pages

_EOCD = b"PK\x05\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"


class _StorageMarker:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Rebuilt:
    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, size, stride


def _rebuild(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride))


def _storage_classes() -> dict[str, type]:
    """torch's typed storage classes by name (``FloatStorage`` …): a blob names one for its storage's dtype."""
    with warnings.catch_warnings():  # the typed storage classes are deprecated: only their dtype is read
        warnings.simplefilter("ignore")
        return {n: c for n in dir(torch) if n.endswith("Storage") and isinstance(c := getattr(torch, n), type)
                and isinstance(getattr(c, "dtype", None), torch.dtype)}


# exact (module, name) pairs: nothing is looked up by a name taken from the file
_ALLOWED: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", n): c for n, c in _storage_classes().items()},
    **{("torch", n): getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
}


class _OneTensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        return _StorageMarker(key, dtype, numel)


class FileMaps:
    """Read-only mappings of files, opened once each (pages are dropped by the caller after copying)."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def get(self, path: Path) -> mmap.mmap | None:
        if path not in self._maps:
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size == 0:
                        return None
                    # shared and read-only: reading a private mapping's pages costs twice the page faults
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return None
            self._maps[path] = mapped
        return self._maps[path]


def _records(blob: memoryview) -> dict[str, tuple[int, int, int]] | None:
    """``name -> (data offset in blob, size, CRC-32)`` of a plain (stored, non-zip64) zip occupying all of ``blob``."""
    if len(blob) < 22 or bytes(blob[-22:-18]) != _EOCD:
        return None
    count, cd_size, cd_offset = struct.unpack("<HII", bytes(blob[-12:-2]))
    if cd_offset == 0xFFFFFFFF or count == 0xFFFF or cd_offset + cd_size > len(blob):
        return None
    out, pos = {}, cd_offset
    for _ in range(count):
        head = bytes(blob[pos:pos + 46])
        if len(head) < 46 or head[:4] != _CENTRAL:
            return None
        method, = struct.unpack("<H", head[10:12])
        crc, = struct.unpack("<I", head[16:20])
        csize, usize = struct.unpack("<II", head[20:28])
        n, m, k = struct.unpack("<HHH", head[28:34])
        local, = struct.unpack("<I", head[42:46])
        name = bytes(blob[pos + 46:pos + 46 + n]).decode("utf-8", "replace")
        if method != 0 or csize != usize or 0xFFFFFFFF in (csize, local):
            return None
        lh = bytes(blob[local:local + 30])
        if len(lh) < 30 or lh[:4] != _LOCAL:
            return None
        ln, lm = struct.unpack("<HH", lh[26:30])
        start = local + 30 + ln + lm
        if start + usize > len(blob):
            return None
        out[name] = (start, usize, crc)
        pos += 46 + n + m + k
    return out


def mapped_tensor(mapped: mmap.mmap, offset: int, length: int, path=None) -> tuple[torch.Tensor, bool] | None:
    """``(tensor, is_view)`` for the tensor ``torch.save``d at ``[offset, offset + length)`` of the mapped file:
    a view of the mapping (``is_view``: the caller may drop its pages after copying) or, for an element-misaligned
    storage, an aligned copy; None where the blob is not a plain one-tensor archive (the caller then uses
    ``torch.load``). The pickle's and the storage's bytes are checked against their zip CRC-32 (a mismatch is a
    :class:`FormatError` naming ``path`` and the record)."""
    if offset < 0 or offset + length > len(mapped):
        return None
    blob = memoryview(mapped)[offset:offset + length]
    try:
        records = _records(blob)
        if not records:
            return None
        pkl = [name for name in records if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pkl) != 1:
            return None
        prefix = pkl[0][: -len("data.pkl")]
        start, size, crc = records[pkl[0]]
        pickled = bytes(blob[start:start + size])
        check_record(pickled, crc, pkl[0], path)
        obj = _OneTensorUnpickler(io.BytesIO(pickled)).load()
        if not isinstance(obj, _Rebuilt) or not isinstance(obj.storage, _StorageMarker):
            return None
        record = records.get(f"{prefix}data/{obj.storage.key}")
        itemsize = torch.empty((), dtype=obj.storage.dtype).element_size()
        if record is None or record[1] != obj.storage.numel * itemsize:
            return None
        data_start, nbytes, crc = record
        check_record(blob[data_start:data_start + nbytes], crc, f"{prefix}data/{obj.storage.key}", path)
        start = offset + data_start
        is_view = start % itemsize == 0
        if is_view:
            with warnings.catch_warnings():  # a read-only mapping: the view is only ever read (then copied)
                warnings.simplefilter("ignore")
                storage = torch.frombuffer(mapped, dtype=obj.storage.dtype, count=obj.storage.numel, offset=start)
        else:
            # torch aligns records inside a blob, but DCP packs blobs back to back: an element-misaligned
            # storage is copied once into an aligned tensor (still one copy fewer than torch.load from bytes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=start)
            storage = torch.empty(obj.storage.numel, dtype=obj.storage.dtype)
            storage.view(torch.uint8).copy_(raw)
            release_pages(raw)
        return storage.as_strided(obj.size, obj.stride, obj.storage_offset), is_view
    except (pickle.UnpicklingError, struct.error, ValueError, TypeError, AttributeError, RuntimeError, EOFError,
            IndexError):
        return None
    finally:
        blob.release()

