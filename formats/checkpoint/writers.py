"""Streaming checkpoint writers: Hugging Face safetensors, Megatron per-rank ``torch`` files and ``torch_dist``.

All three take tensors one at a time, already named and shaped for the target (the converter decides names
and splits), write into ``<dst>.tmp-<pid>`` and rename on ``finalize()``. Memory stays bounded:
* HF: with a ``plan`` of (name, shape, dtype), header first then each tensor straight to disk through the
  same threads (memory: one tensor plus what is queued); without one, one shard (``max_shard_size``) is buffered, then written.
* Megatron torch: each tensor goes straight into its rank's zip archive as a storage record (torch's zip
  format stores records independently); only the small pickle is written at the end. The record bytes are
  written by :class:`~formats.checkpoint.rangewrite.RangeWriter` threads (O_DIRECT), files byte-identical to
  torch's own ``write_record``. Memory: one tensor plus at most 128 MiB queued for the threads.
* torch_dist: each tensor (or chunk of a stacked tensor) is appended as a ``torch.save`` blob to a
  ``.distcp`` file; the DCP ``.metadata`` is built from those records at the end. Memory: one tensor.
Use them as context managers to clean up the temporary directory when something raises.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch

from formats import staging
from formats.checkpoint import dcp_metadata
from formats.checkpoint.blob_zip import tensor_blob
from formats.checkpoint.common import StagedDir, check_expected
from formats.checkpoint.rangewrite import RangeWriter, pwrite_all
from formats.checkpoint.hf import BIN_INDEX, SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES
from formats.checkpoint.tracker import Tracker, rank_dirname
from formats.errors import InteropError
from formats.layout import Layout

_SAFE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """``5_000_000_000`` or ``"5GB"``/``"500MiB"`` -> bytes (Transformers' decimal units)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise InteropError(f"invalid size {size!r} (use e.g. 5GB, 500MB)")


class _Writer:
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


def _with_layout(args: argparse.Namespace | None, layout: Layout, where) -> argparse.Namespace | None:
    """Record the layout in ``args`` (Megatron checks TP/PP of torch-format files against it, docs/checkpoint-formats.md §1.5)."""
    if args is None:
        return None
    fields = {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp}
    if layout.interleaved:
        fields["virtual_pipeline_model_parallel_size"] = layout.vpp
    if layout.ep > 1:
        fields["expert_model_parallel_size"] = layout.ep
    for name, value in fields.items():
        have = getattr(args, name, None)
        if have is not None and int(have) != value:
            raise InteropError(f"args.{name}={have} contradicts the layout {layout} being written", path=where)
        setattr(args, name, value)
    return args


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes (no shared or oversized storage is ever written)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        return t.contiguous()  # a fresh tensor of exactly its bytes: one copy, not two
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


# ------------------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------------------
def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape, start=dtype.itemsize)


def plan_shards(plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Group planned tensors (in order) into shards the way Transformers does: a shard closes when the next
    tensor would pass ``max_shard_size``; a larger tensor gets a shard of its own."""
    shards: list[list[int]] = []
    size = 0
    for i, (_, shape, dtype) in enumerate(plan):
        n = _nbytes(shape, dtype)
        if not shards or (shards[-1] and size + n > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _write_safetensors_header(f, entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """The safetensors header (``{"format": "pt"}`` metadata, padded to 8 bytes) for tensors stored in order;
    returns its length (the file offset of the first tensor)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": _SAFE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)
    return 8 + len(raw)


class HFCheckpointWriter(_Writer):
    """``config.json`` + ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, side files copied.

    Shards close when the next tensor would pass ``max_shard_size`` (as Transformers does); a tensor larger
    than the limit gets a shard of its own.

    With ``plan`` — ``[(name, shape, dtype), …]`` in the order ``add`` will be called, as a conversion knows
    from its family rules — each shard's header is written when the shard opens and every tensor goes straight
    to disk: memory is one tensor. Without a plan the writer cannot know a shard's header before its last
    tensor, so it buffers one shard (``max_shard_size``) and writes it with ``safetensors``.
    """

    def __init__(self, dst, config: dict, max_shard_size: int | str = "5GB", side_files: Iterable = (),
                 force: bool = False, expected=None,
                 plan: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        super().__init__(dst, force)
        self.config = dict(config)
        self.max_shard_size = parse_size(max_shard_size)
        self.side_files = [Path(p) for p in side_files]
        self.expected = expected
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._total_size = 0
        self._total_params = 0
        # buffered mode
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[list[str]] = []
        # streamed mode
        self.plan = [(n, tuple(s), d) for n, s, d in plan] if plan is not None else None
        self._io: RangeWriter | None = None
        if self.plan is not None:
            self._io = RangeWriter()  # tensor bytes at their planned offsets, from threads (see rangewrite)
            self._offset = 0
            self._shards = plan_shards(self.plan, self.max_shard_size)
            self._shard_of = {i: k for k, idx in enumerate(self._shards) for i in idx}
            self._open_shard = -1

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._shapes:
            raise InteropError(f"tensor {name!r} written twice", path=self.dst)
        if self.plan is not None:
            self._stream(name, tensor)
            return
        t = _owned(tensor)
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self._record(name, t)

    def _record(self, name: str, t: torch.Tensor) -> None:
        self._shapes[name] = tuple(t.shape)
        self._total_size += t.numel() * t.element_size()
        self._total_params += t.numel()

    def _stream(self, name: str, tensor: torch.Tensor) -> None:
        i = len(self._shapes)
        if i >= len(self.plan):
            raise InteropError(f"unexpected extra tensor {name!r} (the plan has {len(self.plan)})", path=self.dst)
        want, shape, dtype = self.plan[i]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise InteropError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrived where {want} {shape} "
                               f"{dtype} was planned", path=self.dst)
        k = self._shard_of[i]
        if k != self._open_shard:
            path = self.tmp / f"part-{k}.safetensors"
            with open(path, "wb") as fh:
                self._offset = _write_safetensors_header(fh, [self.plan[j] for j in self._shards[k]])
            self._io.open(k, path)
            self._parts.append([self.plan[j][0] for j in self._shards[k]])
            self._open_shard = k
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._io.write(k, self._offset, t)
            self._offset += t.numel() * t.element_size()
        self._record(name, t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        save_file(self._pending, str(self.tmp / f"part-{len(self._parts)}.safetensors"), metadata={"format": "pt"})
        self._parts.append(sorted(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def _close(self) -> None:
        if self._io is not None:
            self._io.close()

    def finalize(self) -> Path:
        if self._io is not None:
            self._io.wait()  # a failed write surfaces here, before anything is committed
        if self.plan is not None and len(self._shapes) != len(self.plan):
            missing = self.plan[len(self._shapes)][0]
            raise InteropError(f"stream ended before {missing} ({len(self.plan) - len(self._shapes)} planned tensors "
                               "missing)", path=self.dst)
        check_expected(self._shapes, self.expected, self.dst)
        self._flush()
        self._close()
        n = len(self._parts)
        if n == 0:
            raise InteropError("no tensors were written", path=self.dst)
        if n == 1:
            (self.tmp / "part-0.safetensors").rename(self.tmp / SAFE_SINGLE)
        else:
            weight_map = {}
            for i, names in enumerate(self._parts):
                shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"part-{i}.safetensors").rename(self.tmp / shard)
                weight_map.update({name: shard for name in names})
            index = {"metadata": {"total_size": self._total_size, "total_parameters": self._total_params},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        for side in self.side_files:
            if side.name in ("config.json", SAFE_INDEX, BIN_INDEX) or side.name.endswith((".safetensors", ".bin")):
                continue
            shutil.copy2(side, self.tmp / side.name)
        return self._stage.commit()


# ------------------------------------------------------------------------------------------------------
# Megatron per-rank torch format
# ------------------------------------------------------------------------------------------------------
def _storage_type(dtype: torch.dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(torch, torch.TypedStorage(0, dtype=dtype)._pickle_storage_type())


class _StorageRef:
    """Pickled by persistent id as a storage record already written to the archive."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a CPU tensor (``_rebuild_tensor_v2``) whose bytes were streamed earlier."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        if isinstance(obj, torch.Tensor):
            raise TypeError("tensors must be added with add(), not passed inside extra values")
        return None


ZIP32_LIMIT = 0xFFFFFFFF  # past this file offset miniz writes zip64 fields: torch lays those records out itself


class _StreamingTorchFile:
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

    def add_tensor(self, tensor: torch.Tensor) -> _TensorRef:
        t = tensor.detach().cpu()  # strided views go to ``io`` as they are: its thread copies them once
        key = str(self._next)
        self._next += 1
        nbytes = t.numel() * t.element_size()
        name = f"data/{key}"
        offset = self._data_offset(name, nbytes)
        if offset is None:
            self._cursor = None  # a record torch lays out: later offsets are no longer ours to compute
            t = _owned(t)
            self._zip.write_record(name, t.untyped_storage(), nbytes)
        else:
            self._zip.write_record_metadata(name, nbytes)
            self._records[self._prefix + name] = (offset, nbytes, self._io.write(self, offset, t, crc=self._crc))
            self._cursor = offset + nbytes + 16  # data descriptor: signature, CRC, two 32-bit sizes
        return _TensorRef(_StorageRef(key, t.dtype, t.numel()), tuple(t.shape))

    def finish(self, obj: Any) -> None:
        buf = io.BytesIO()
        _RefPickler(buf, protocol=2).dump(obj)
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


def nest_legacy(flat: dict[str, Any]) -> dict[str, Any]:
    """Legacy (pre-mcore) nesting of dotted names (docs/checkpoint-formats.md §2.1): ``language_model.embedding.word_embeddings.weight``
    -> ``{'language_model': {'embedding': {'word_embeddings': {'weight': …}}}}``; ``encoder``/``decoder``/``pooler``
    and top-level heads keep flat keys inside (``{'encoder': {'layers.0.input_norm.weight': …}}``)."""
    out: dict[str, Any] = collections.OrderedDict()
    for name, value in flat.items():
        head, _, rest = name.partition(".")
        if head == "language_model":
            section, _, rest = rest.partition(".")
            node = out.setdefault("language_model", collections.OrderedDict()).setdefault(section, collections.OrderedDict())
            if section == "embedding":
                sub, _, leaf = rest.partition(".")
                node.setdefault(sub, collections.OrderedDict())[leaf] = value
            else:
                node[rest] = value
        elif rest:
            out.setdefault(head, collections.OrderedDict())[rest] = value
        else:
            out[head] = value
    return out


class MegatronTorchWriter(_Writer):
    """Megatron-LM per-rank ``torch`` checkpoint: ``<dst>/iter_XXXXXXX|release/mp_rank_TT[_PPP]/model_optim_rng.pt``.

    ``add(name, tensor, tp, pp, chunk=0)`` streams the tensor into that rank's file; ``add(name, None, …)`` or any
    picklable non-tensor value is kept in the pickle (``_extra_state`` entries). Names starting with
    ``language_model.`` are nested the legacy way. ``set_top(key, value, tp, pp)`` adds other top-level entries
    (``optimizer``, ``rng_state``, …). A weights-only checkpoint should be ``release=True`` (docs/checkpoint-formats.md §1.5, T14).
    ``expected`` maps ``(tp, pp, chunk)`` to the names (or name -> shape) that chunk must hold (docs/checkpoint-formats.md trap T12).
    """

    def __init__(self, dst, layout: Layout, iteration: int | None = None, release: bool = False,
                 args: argparse.Namespace | dict | None = None, checkpoint_version: float = 3.0,
                 force: bool = False, expected: dict | None = None):
        if iteration is None and not release:
            raise InteropError("MegatronTorchWriter needs an iteration or release=True")
        super().__init__(dst, force)
        self.layout = layout
        self.tracker = Tracker(0 if release else int(iteration), release)
        self.args = _with_layout(plain_args(args), layout, self.dst)
        self.checkpoint_version = checkpoint_version
        self.expected = expected
        self._files: dict[tuple[int, int, int], _StreamingTorchFile] = {}
        self._io = RangeWriter()  # rank files' tensor bytes, written by threads while the caller goes on
        self._models: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        self._top: dict[tuple[int, int, int], dict[str, Any]] = {}
        (self.tmp / self.tracker.dirname).mkdir()

    def _rank(self, tp: int, pp: int, ep: int = 0) -> tuple[int, int, int]:
        key = (tp, pp, ep)
        if not (0 <= tp < self.layout.tp and 0 <= pp < self.layout.pp and 0 <= ep < self.layout.ep):
            raise InteropError(f"rank tp={tp} pp={pp} ep={ep} is outside layout {self.layout}", path=self.dst)
        if key not in self._files:
            d = self.tmp / self.tracker.dirname / rank_dirname(
                tp, pp if self.layout.pp > 1 else None, ep if self.layout.ep > 1 else None
            )
            d.mkdir()
            self._files[key] = _StreamingTorchFile(d / "model_optim_rng.pt", self._io)
            self._models[key] = [collections.OrderedDict() for _ in range(self.layout.virtual_chunks)]
            self._top[key] = {}
        return key

    def add(self, name: str, tensor: Any, tp: int = 0, pp: int = 0, chunk: int = 0, ep: int = 0) -> None:
        key = self._rank(tp, pp, ep)
        if not 0 <= chunk < self.layout.virtual_chunks:
            raise InteropError(f"chunk {chunk} outside layout {self.layout}", path=self.dst)
        model = self._models[key][chunk]
        if name in model:
            raise InteropError(f"tensor {name!r} written twice to tp={tp} pp={pp} chunk={chunk}", path=self.dst)
        model[name] = self._files[key].add_tensor(tensor) if isinstance(tensor, torch.Tensor) else tensor

    def set_top(self, key: str, value: Any, tp: int = 0, pp: int = 0, ep: int = 0) -> None:
        if key in ("model", "args", "iteration", "checkpoint_version") or key.startswith("model"):
            raise InteropError(f"top-level entry {key!r} is managed by the writer", path=self.dst)
        rank = self._rank(tp, pp, ep)
        self._top[rank][key] = self._stream_nested(value, self._files[rank])

    @classmethod
    def _stream_nested(cls, value: Any, file: "_StreamingTorchFile") -> Any:
        """Tensors inside a top-level value (RNG states, optimizer state) streamed as records of the rank file."""
        if isinstance(value, torch.Tensor):
            return file.add_tensor(value)
        if isinstance(value, dict):
            return type(value)((k, cls._stream_nested(v, file)) for k, v in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(cls._stream_nested(v, file) for v in value)
        return value

    def finalize(self) -> Path:
        ranks = {(t, p, e) for t in range(self.layout.tp) for p in range(self.layout.pp) for e in range(self.layout.ep)}
        missing = sorted(ranks - set(self._files))
        if missing:
            raise InteropError(f"no tensors were written for rank(s) (tp, pp, ep) {missing[:4]}", path=self.dst)
        for (tp, pp, ep), chunks in self._models.items():
            for c, model in enumerate(chunks):
                exp = (self.expected or {}).get((tp, pp, c))
                written = {n: tuple(v.shape) if isinstance(v, _TensorRef) else () for n, v in model.items()}
                check_expected(written, exp, f"{self.dst} (tp={tp} pp={pp} chunk={c})")
        for key, file in self._files.items():
            chunks = self._models[key]
            chunks = [nest_legacy(m) if any(n.startswith("language_model.") for n in m) else m for m in chunks]
            top: dict[str, Any] = {}
            if self.args is not None:
                top["args"] = self.args
            top["checkpoint_version"] = self.checkpoint_version
            top["iteration"] = self.tracker.iteration
            if len(chunks) == 1:
                top["model"] = chunks[0]
            else:
                top.update({f"model{i}": m for i, m in enumerate(chunks)})
            top.update(self._top[key])
            file.finish(top)
        if self._io is not None:
            self._io.close()
        self.tracker.write(self.tmp)  # last, so a reader never sees a tracker without files
        return self._stage.commit()

    def _close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        if self._io is not None:
            self._io.close()


# ------------------------------------------------------------------------------------------------------
# torch_dist (Megatron-Core dist_checkpointing on PyTorch DCP)
# ------------------------------------------------------------------------------------------------------
TORCH_DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                       "common_backend": "torch", "common_backend_version": 1}

_LAYER_MODULES_LOCAL = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_keys(num_layers: int, transformer_impl: str = "local", prefix: str = "decoder.layers.") -> list[str]:
    """Keys of the ``_extra_state`` ShardedObjects Megatron-Core's GPT layers request on load (docs/checkpoint-formats.md §6.3/§6.6).

    Value to store for each: ``[None]`` (what Megatron writes for modules without FP8 state).
    """
    modules = list(_LAYER_MODULES_LOCAL)
    if transformer_impl == "transformer_engine":
        modules.append("self_attention.core_attention")
    return [f"{prefix}{m}._extra_state/shard_{i}_{num_layers}" for m in modules for i in range(num_layers)]


class TorchDistWriter(_Writer):
    """A ``torch_dist`` checkpoint that ``megatron.core.dist_checkpointing.load`` accepts at any TP/PP.

    ``add(key, tensor)`` stores a full tensor under its global key; for stacked layer tensors pass one layer at a
    time with ``add(key, t[None], global_shape=(L, *t.shape), offset=(i, 0, …))`` so the stack is never built in
    memory; a chunk is written from its tensor by writer threads, so it must not change until ``finalize()``
    (any strides: views are copied there). ``add_object(key, obj)`` stores a bytes entry
    (``_extra_state/shard_i_L`` -> ``[None]``). ``args`` go to ``common.pt``; for a weights-only checkpoint set
    ``no_save_optim``/``no_save_rng`` in them (docs/checkpoint-formats.md §1.5). ``finalize()`` checks every tensor is fully covered by its chunks and (with ``expected``) the key set.
    """

    DATA_FILE = "__0_0.distcp"
    BLOB_ALIGN = 64  # torch's record alignment (``_get_storage_alignment``)

    def __init__(self, dst, iteration: int | None = None, release: bool = False,
                 args: argparse.Namespace | dict | None = None, checkpoint_version: float = 3.0,
                 common: dict | None = None, force: bool = False, expected=None):
        if iteration is None and not release:
            raise InteropError("TorchDistWriter needs an iteration or release=True")
        super().__init__(dst, force)
        self.tracker = Tracker(0 if release else int(iteration), release)
        self.args = plain_args(args)
        self.checkpoint_version = checkpoint_version
        self.common = dict(common or {})
        self.expected = expected
        self.iter_dir = self.tmp / self.tracker.dirname
        self.iter_dir.mkdir()
        # Each tensor chunk's archive is laid out at once (blob_zip): its bytes go to their offset through
        # RangeWriter threads (strided views copied there, CRC-32 there, mostly O_DIRECT: buffered writes of a
        # checkpoint's size stall on fresh page-cache pages), the archive records around them — with the CRC
        # filled in — are written by ``finalize`` once those threads are done. ``torch.save`` on this thread did
        # the copy, the CRC and the write one after another (~1 GB/s here).
        self._path = self.iter_dir / self.DATA_FILE
        self._io = RangeWriter()
        self._io.open(self.DATA_FILE, self._path)
        self._end = 0  # where the next blob may start
        self._records: list[tuple[int, Any, Any]] = []  # (offset, TensorBlob, CRC future) or (offset, bytes, None)
        self._tensors: dict[str, dict] = {}  # key -> {"shape", "dtype", "chunks": [(offsets, sizes)], "covered"}
        self._objects: set[str] = set()
        self._storage: dict = {}

    def _place(self, length: int) -> int:
        """The offset of a new ``length``-byte blob: blobs start ``BLOB_ALIGN``-aligned (their aligned records
        then map as tensors, see ``blob_map``)."""
        offset = -(-self._end // self.BLOB_ALIGN) * self.BLOB_ALIGN
        self._end = offset + length
        return offset

    def _save_tensor(self, t: torch.Tensor):
        """Lay out ``t``'s archive, queue its bytes (any strides: copied in the writer threads); DCP reads it back
        by byte range."""
        buf = io.BytesIO()
        _RefPickler(buf, protocol=2).dump(_TensorRef(_StorageRef("0", t.dtype, t.numel()), tuple(t.shape)))
        try:
            blob = tensor_blob(buf.getvalue(), t.numel() * t.element_size())
        except ValueError:  # 4 GiB or more: torch.save writes the zip64 archive (in memory, then out)
            return self._save_object(_owned(t))
        offset = self._place(blob.length)
        future = self._io.write(self.DATA_FILE, offset + len(blob.head), t, crc=True)
        self._records.append((offset, blob, future))
        return dcp_metadata.storage_info(self.DATA_FILE, offset, blob.length)

    def _save_object(self, obj: Any):
        """``torch.save(obj)`` as a blob of the data file (written by ``finalize``)."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        offset = self._place(len(data))
        self._records.append((offset, data, None))
        return dcp_metadata.storage_info(self.DATA_FILE, offset, len(data))

    def _write_records(self) -> None:
        """Once every tensor's bytes are out: the archives' own records (CRCs filled in) and the object blobs."""
        self._io.wait()  # a failed write raises here
        with open(self._path, "r+b", buffering=0) as f:
            for offset, blob, future in self._records:
                if future is None:
                    pwrite_all(f.fileno(), memoryview(blob), offset)
                    continue
                blob.set_crc(future.result())
                pwrite_all(f.fileno(), memoryview(blob.head), offset)
                pwrite_all(f.fileno(), memoryview(blob.tail), offset + len(blob.head) + blob.nbytes)
            f.truncate(self._end)
        self._records = []

    def add(self, key: str, tensor: torch.Tensor, global_shape: tuple[int, ...] | None = None,
            offset: tuple[int, ...] | None = None) -> None:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        shape = tuple(global_shape) if global_shape is not None else tuple(t.shape)
        offs = tuple(offset) if offset is not None else (0,) * len(shape)
        if len(offs) != len(shape) or t.dim() != len(shape):
            raise InteropError(f"{key}: chunk of rank {t.dim()} / offset {offs} do not match global shape {shape}", path=self.dst)
        if any(o < 0 or o + s > g for o, s, g in zip(offs, t.shape, shape)):
            raise InteropError(f"{key}: chunk {tuple(t.shape)} at {offs} exceeds global shape {shape}", path=self.dst)
        entry = self._tensors.setdefault(key, {"shape": shape, "dtype": t.dtype, "chunks": [], "covered": 0})
        if entry["shape"] != shape or entry["dtype"] != t.dtype:
            raise InteropError(f"{key}: chunk disagrees with earlier ones on global shape/dtype", path=self.dst)
        if any(c[0] == offs for c in entry["chunks"]):
            raise InteropError(f"{key}: chunk at offset {offs} written twice", path=self.dst)
        self._storage[dcp_metadata.index(key, offs)] = self._save_tensor(t)
        entry["chunks"].append((offs, tuple(t.shape)))
        entry["covered"] += t.numel()

    def add_object(self, key: str, obj: Any) -> None:
        if key in self._objects or key in self._tensors:
            raise InteropError(f"object {key!r} written twice", path=self.dst)
        self._storage[dcp_metadata.index(key)] = self._save_object(obj)
        self._objects.add(key)

    def finalize(self) -> Path:
        for key, e in self._tensors.items():
            n = math.prod(e["shape"])
            if e["covered"] != n:
                raise InteropError(f"{key}: chunks cover {e['covered']} of {n} elements of {e['shape']}", path=self.dst)
        written = {k: e["shape"] for k, e in self._tensors.items()}
        written.update({k: None for k in self._objects})
        if self.expected is not None:
            exp = self.expected if isinstance(self.expected, dict) else {k: None for k in self.expected}
            check_expected({k: (v if exp.get(k) is not None else ()) for k, v in written.items()},
                           {k: v for k, v in exp.items()} if any(v is not None for v in exp.values()) else list(exp), self.dst)
        self._write_records()  # every blob on disk (a failed write raises here)
        self._io.close()
        state_md: dict = {key: dcp_metadata.tensor_metadata(e["dtype"], e["shape"], e["chunks"])
                          for key, e in self._tensors.items()}
        state_md.update({key: dcp_metadata.bytes_metadata() for key in self._objects})
        with open(self.iter_dir / ".metadata", "wb") as f:
            dcp_metadata.dump_metadata(state_md, self._storage, f)
        common = {"checkpoint_version": self.checkpoint_version, "iteration": self.tracker.iteration}
        if self.args is not None:
            common["args"] = self.args
        common.update(self.common)
        torch.save(common, self.iter_dir / "common.pt")
        (self.iter_dir / "metadata.json").write_text(json.dumps(TORCH_DIST_METADATA))
        self.tracker.write(self.tmp)
        return self._stage.commit()

    def _close(self) -> None:
        self._io.close()
