"""What every streaming checkpoint writer shares: the staged output directory, plain ``args`` pickles, owned
tensor bytes, and ``torch.save``-compatible zip archives written record by record.

Why one helper module: the Megatron ``torch`` writer streams whole rank files through :class:`StreamingTorchFile`,
the ``torch_dist`` writer pickles single-tensor archives with the same :class:`RefPickler`, and all writers stage
their output the same way (temporary sibling, rename on ``finalize()``, cleanup when used as a context manager).
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

from formats import staging
from formats.checkpoint.common import StagedDir
from formats.checkpoint.rangewrite import RangeWriter, pwrite_all
from formats.errors import InteropError


class StagedWriter:
    """Base of the writers: output staged in a temporary sibling of ``dst``; ``abort`` (or leaving a ``with`` block
    by an exception) removes it, and a full disk becomes a one-line error."""

    def __init__(self, dst, force: bool):
        self._stage = StagedDir(dst, force)
        self.dst = self._stage.dst

    @property
    def tmp(self) -> Path:
        return self._stage.tmp

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            err = staging.disk_error(exc, self.dst)  # a full disk is a one-line error, not a traceback
            if err is not None:
                raise err from None
        return False

    def abort(self) -> None:
        self._close()
        self._stage.abort()

    def _close(self) -> None:
        pass


def plain_args(args: argparse.Namespace | dict | None) -> argparse.Namespace | None:
    """``args`` with Megatron placeholder objects (enums read without Megatron) replaced by their plain values,
    so the written pickle needs no Megatron class (docs/checkpoint-formats.md trap T13)."""
    import enum

    from formats.checkpoint.unpickle import PLACEHOLDER_PREFIXES, Placeholder

    def plain(v):
        if isinstance(v, Placeholder):
            return v.value
        if isinstance(v, enum.Enum) and type(v).__module__.startswith(PLACEHOLDER_PREFIXES):
            return v.value  # real Megatron enum (Megatron registers some as torch safe globals when imported)
        return v

    if args is None:
        return None
    items = dict(args) if isinstance(args, dict) else dict(vars(args))
    return argparse.Namespace(**{k: plain(v) for k, v in items.items()})


def owned_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes (no shared or oversized storage is ever written)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        return t.contiguous()  # a fresh tensor of exactly its bytes: one copy, not two
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()



def storage_type(dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(torch, torch.TypedStorage(0, dtype=dtype)._pickle_storage_type())


class StorageRef:
    """Pickled by persistent id as a storage record already written to the archive."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class TensorRef:
    """Pickles exactly like a CPU tensor (``_rebuild_tensor_v2``) whose bytes were streamed earlier."""

    def __init__(self, storage: StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        if isinstance(obj, torch.Tensor):
            raise TypeError("tensors must be added with add(), not passed inside extra values")
        return None


ZIP32_LIMIT = 0xFFFFFFFF  # past this file offset miniz writes zip64 fields: torch lays those records out itself


class StreamingTorchFile:
    """One ``torch.save``-compatible zip archive written record by record (torch's own zip writer).

    With a :class:`RangeWriter` (``io``), a tensor record is laid out by torch (``write_record_metadata``: header,
    space, data descriptor — the layout ``write_record`` produces) and its bytes are written at the data offset by
    ``io``'s threads, with no copy of a contiguous view; ``finish`` then puts the CRC-32s torch would have
    computed into the descriptors, the central directory and the serialization id, so the file is byte-identical
    to the all-``write_record`` one (tested). Records that could need zip64 fields (a file past 4 GB) fall back
    to ``write_record``.

    Torch's own writes (headers, descriptors, the pickle, the directory) then go to a *skeleton* file beside it
    (same name: torch names the records' prefix after it), copied into the real file around our records at the
    end. Why: torch's writer holds the GIL while it writes, and a write into a file whose holes ``io`` is filling
    with ``O_DIRECT`` waits for those writes (ext4 takes the inode lock for them): measured, a fifth of the
    ``write_record_metadata`` calls of a GPT-2-XL conversion took > 1 ms, 1.3 s in all, with every other thread
    stalled behind the GIL.
    """

    def __init__(self, path: Path, io: RangeWriter | None = None):
        self.path = path
        self._crc = torch.serialization.get_crc32_options()
        self._align = torch.serialization._get_storage_alignment()
        if not hasattr(torch._C.PyTorchFileWriter, "write_record_metadata"):
            io = None  # torch < 2.5: write_record only
        # with ``io``, torch writes the archive's skeleton to a file of the same name (its records' prefix) in a
        # side directory, never touching the file ``io`` writes into (see ``finish``)
        self._skeleton = path.parent / SKELETON_DIR / path.name if io is not None else None
        if self._skeleton is not None:
            self._skeleton.parent.mkdir(exist_ok=True)
        self._zip = torch._C.PyTorchFileWriter(str(self._skeleton or path), self._crc, self._align)
        self._next = 0
        self._io = io
        if self._io is not None:
            self._io.open(self, path)
        self._prefix = self._zip.archive_name() + "/"
        self._cursor = 0  # file offset of the next record while every record so far was laid out here
        self._records: dict[str, tuple[int, int, Any]] = {}  # name -> (data offset, size, future of the CRC)

    def _data_offset(self, name: str, nbytes: int) -> int | None:
        """Where torch's writer puts the data of the next record (``getPadding`` in torch's inline_container),
        or None where the record is not ours to lay out (no ``io``, empty, or zip64 territory)."""
        if self._io is None or self._cursor is None or nbytes == 0:
            return None
        start = self._cursor + 30 + len(self._prefix) + len(name) + 4  # local header, name, "FB" + length
        offset = -(-start // self._align) * self._align
        if offset + nbytes + 16 >= ZIP32_LIMIT:
            self._cursor = None  # from here on torch lays out (and checksums) every record itself
            return None
        return offset

    def add_tensor(self, tensor: torch.Tensor) -> TensorRef:
        t = tensor.detach().cpu()  # strided views go to ``io`` as they are: its thread copies them once
        key = str(self._next)
        self._next += 1
        nbytes = t.numel() * t.element_size()
        name = f"data/{key}"
        offset = self._data_offset(name, nbytes)
        if offset is None:
            self._cursor = None  # a record torch lays out: later offsets are no longer ours to compute
            t = owned_tensor(t)
            self._zip.write_record(name, t.untyped_storage(), nbytes)
        else:
            self._zip.write_record_metadata(name, nbytes)
            self._records[self._prefix + name] = (offset, nbytes, self._io.write(self, offset, t, crc=self._crc))
            self._cursor = offset + nbytes + 16  # data descriptor: signature, CRC, two 32-bit sizes
        return TensorRef(StorageRef(key, t.dtype, t.numel()), tuple(t.shape))

    def finish(self, obj: Any) -> None:
        buf = io.BytesIO()
        RefPickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.close()
        if self._skeleton is not None:
            crcs = {name: fut.result() for name, (_, _, fut) in self._records.items()}  # our bytes are all written
            _copy_outside(self._skeleton, self.path, [(off, size) for off, size, _ in self._records.values()])
            self._skeleton.unlink()
            self._skeleton.parent.rmdir()
            if self._records:
                patch_zip_crcs(self.path, {n: (off, size, crcs[n]) for n, (off, size, _) in self._records.items()},
                               self._crc)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.write_end_of_file()
            self._zip = None


SKELETON_DIR = ".zip-skeleton"


def _copy_outside(src: Path, dst: Path, ranges: list[tuple[int, int]], piece: int = 16 << 20) -> None:
    """Copy every byte of ``src`` outside ``ranges`` ((offset, size), disjoint) to the same offset of ``dst``
    (which then ends where ``src`` ends)."""
    with open(src, "rb", buffering=0) as fin, open(dst, "r+b", buffering=0) as fout:
        end = os.fstat(fin.fileno()).st_size
        pos = 0
        for off, size in sorted(ranges) + [(end, 0)]:
            while pos < off:
                data = os.pread(fin.fileno(), min(piece, off - pos), pos)
                if not data:
                    raise InteropError("zip skeleton ended early", path=src)
                pwrite_all(fout.fileno(), memoryview(data), pos)
                pos += len(data)
            pos = max(pos, off + size)
        fout.truncate(end)


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64-bit ``size_t`` (how torch folds record CRCs into the serialization id)."""
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask


def _central_directory(f) -> list[tuple[int, str, int, int, bool]]:
    """``(entry position, name, CRC, local header offset, empty)`` of every central-directory entry, in order."""
    f.seek(0, 2)
    end = f.tell()
    f.seek(end - 22)
    eocd = f.read(22)
    if eocd[:4] != b"PK\x05\x06":
        raise InteropError("no zip end-of-central-directory record", path=f.name)
    count, cd_offset = struct.unpack("<H", eocd[10:12])[0], struct.unpack("<I", eocd[16:20])[0]
    if cd_offset == 0xFFFFFFFF or count == 0xFFFF:
        f.seek(end - 22 - 20)
        (z64,) = struct.unpack("<Q", f.read(20)[8:16])
        f.seek(z64)
        rec = f.read(56)
        count, cd_offset = struct.unpack("<Q", rec[32:40])[0], struct.unpack("<Q", rec[48:56])[0]
    f.seek(cd_offset)
    out, pos = [], cd_offset
    for _ in range(count):
        head = f.read(46)
        if head[:4] != b"PK\x01\x02":
            raise InteropError("corrupt zip central directory", path=f.name)
        crc, = struct.unpack("<I", head[16:20])
        n, m, k = struct.unpack("<HHH", head[28:34])
        local, = struct.unpack("<I", head[42:46])
        name = f.read(n).decode()
        extra = f.read(m)
        f.read(k)
        if local == 0xFFFFFFFF:  # zip64 extra: the 8-byte fields present, in order
            e = 0
            while e + 4 <= len(extra):
                tag, size = struct.unpack("<HH", extra[e:e + 4])
                if tag == 1:
                    vals = struct.unpack(f"<{size // 8}Q", extra[e + 4:e + 4 + size // 8 * 8])
                    sizes = struct.unpack("<II", head[20:28])
                    local = vals[sum(1 for s in sizes if s == 0xFFFFFFFF)]
                e += 4 + size
        out.append((pos, name, crc, local, struct.unpack("<I", head[24:28])[0] == 0))
        pos += 46 + n + m + k
    return out


def patch_zip_crcs(path: Path, records: dict[str, tuple[int, int, int]], crc: bool) -> None:
    """Finish a torch zip whose named records were laid out with ``write_record_metadata`` and filled by us:
    check each record's data offset, and (``crc``) write each record's CRC-32 into its data descriptor and
    central-directory entry and recompute the serialization id exactly as torch does — making the file equal
    byte for byte to what ``write_record`` writes."""
    with open(path, "r+b") as f:
        entries = _central_directory(f)
        for pos, name, _, local, _ in entries:
            if name not in records:
                continue
            offset, size, value = records[name]
            f.seek(local + 26)
            n, m = struct.unpack("<HH", f.read(4))
            if local + 30 + n + m != offset:
                raise InteropError(f"zip record {name} starts at {local + 30 + n + m}, expected {offset}", path=path)
            if crc:
                f.seek(offset + size)
                if f.read(4) != b"PK\x07\x08":
                    raise InteropError(f"zip record {name}: no data descriptor after its data", path=path)
                f.write(struct.pack("<I", value))
                f.seek(pos + 16)
                f.write(struct.pack("<I", value))
        if not crc:
            return
        pos, name, _, local, _ = entries[-1]
        if not name.endswith("/.data/serialization_id"):
            raise InteropError("zip does not end with torch's serialization id", path=path)
        combined = 0
        for _, n_, c, _, empty in entries[:-1]:
            if not empty:  # torch folds in the CRC of each data descriptor; empty records have none
                combined = _hash_combine(combined, records[n_][2] if n_ in records else c)
        f.seek(local + 26)
        n, m = struct.unpack("<HH", f.read(4))
        data_at = local + 30 + n + m
        f.seek(data_at)
        old = f.read(40)
        new = old[:20] + b"%020d" % combined
        value = zlib.crc32(new)
        f.seek(data_at)
        f.write(new)
        f.seek(data_at + 40 + 4)
        f.write(struct.pack("<I", value))
        f.seek(pos + 16)
        f.write(struct.pack("<I", value))

