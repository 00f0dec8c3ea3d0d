"""``distrib_optim.pt``: the distributed optimizer's per-(TP, PP) state file of the per-rank ``torch`` format
(docs/checkpoint-formats.md §7.1, current format since Megatron-Core 2024-04-30): ``{'buckets_coalesced': True, gbuf_idx: {(param
dtype, grad dtype): {'param', 'exp_avg', 'exp_avg_sq': fp32[N], 'numel_unpadded': N}}}``, the vectors being the
buckets' unpadded parts concatenated. Older layouts (per-bucket lists, per-DP-rank ``optim.pt``) are refused.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from formats.checkpoint.rangewrite import pwrite_all
from formats.errors import FormatError

OPTIM_FILE = "distrib_optim.pt"


def check_distrib_optim(state, path: Path) -> dict:
    """The state of one ``distrib_optim.pt`` after structural checks (one optimizer, coalesced buckets)."""
    if isinstance(state, list):
        raise FormatError("several chained optimizers (expert parallelism) are not supported", path=path)
    if not isinstance(state, dict):
        raise FormatError(f"expected a dict, found {type(state).__name__}", path=path)
    if not state.get("buckets_coalesced"):
        raise FormatError("pre-2024-04 distributed-optimizer layout (no 'buckets_coalesced'); re-save it with a "
                          "current Megatron-Core", path=path)
    for g, per_dtype in state.items():
        if g == "buckets_coalesced":
            continue
        if not isinstance(g, int) or not isinstance(per_dtype, dict):
            raise FormatError(f"unexpected entry {g!r}", path=path)
        for dtypes, entry in per_dtype.items():
            n = entry.get("numel_unpadded") if isinstance(entry, dict) else None
            if not isinstance(n, int):
                raise FormatError(f"buffer {g} {dtypes}: no numel_unpadded", path=path)
            for kind in ("param", "exp_avg", "exp_avg_sq"):
                t = entry.get(kind)
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
                    raise FormatError(f"buffer {g} {dtypes}: {kind} is not a vector of {n} elements", path=path)
    return state


def distrib_optim_entry(state: dict, gbuf: int, path: Path) -> tuple[tuple, dict]:
    """``(dtypes, {'param', 'exp_avg', 'exp_avg_sq', 'numel_unpadded'})`` of grad buffer ``gbuf``."""
    per_dtype = state.get(gbuf)
    if not per_dtype:
        raise FormatError(f"no grad buffer {gbuf}", path=path)
    if len(per_dtype) != 1:
        raise FormatError(f"grad buffer {gbuf} has {len(per_dtype)} dtypes; only one is supported", path=path)
    return next(iter(per_dtype.items()))


def save_distrib_optim(buffers: dict[int, tuple[tuple, dict[str, torch.Tensor]]], path: Path) -> None:
    """Write ``{gbuf: (dtypes, {'param', 'exp_avg', 'exp_avg_sq'})}`` as Megatron-Core does."""
    out: dict = {"buckets_coalesced": True}
    for g, (dtypes, tensors) in sorted(buffers.items()):
        out[g] = {tuple(dtypes): {**tensors, "numel_unpadded": int(tensors["param"].numel())}}
    torch.save(out, path)


KINDS = ("param", "exp_avg", "exp_avg_sq")


class DistribOptimFile:
    """A ``distrib_optim.pt`` filled in place, piece by piece (what :func:`save_distrib_optim` writes, without
    holding the flat vectors: for a 1.5B model at TP1 they are 18 GB).

    The archive is laid out by ``torch.save`` under ``torch.serialization.skip_data`` (every record sized, its
    bytes left as a hole: zeros, which is what the alignment gaps of the vectors hold), :meth:`write` puts a
    parameter's piece at its offset, and :meth:`close` reads each record back for its CRC-32 and puts the CRCs
    where ``torch.save`` would have (``patch_zip_crcs``), so the file equals :func:`save_distrib_optim`'s."""

    def __init__(self, path: Path, buffers: dict[int, tuple[tuple, int]]):
        """``buffers``: grad buffer index -> ``((param dtype, grad dtype), numel)``."""
        self.path = Path(path)
        out: dict = {"buckets_coalesced": True}
        order = []
        for g, (dtypes, n) in sorted(buffers.items()):
            # never touched, so never resident: skip_data writes no bytes of them
            out[g] = {tuple(dtypes): {**{k: torch.empty(n) for k in KINDS}, "numel_unpadded": int(n)}}
            order += [(g, k, n) for k in KINDS]
        with torch.serialization.skip_data():
            torch.save(out, self.path)
        del out
        self._records = self._locate(order)
        self._fd = os.open(self.path, os.O_RDWR)

    def _locate(self, order) -> dict[tuple[int, str], tuple[str, int, int]]:
        """``(gbuf, kind) -> (record name, data offset, bytes)``: torch numbers storages in pickling order, which
        is the dicts' insertion order above (checked against the record sizes)."""
        with zipfile.ZipFile(self.path) as z, open(self.path, "rb") as f:
            infos = {i.filename.rsplit("/data/", 1)[1]: i for i in z.infolist() if "/data/" in i.filename
                     and not i.filename.endswith("serialization_id")}
            found = {}
            for key, (g, kind, n) in enumerate(order):
                info = infos.get(str(key))
                if info is None or info.file_size != 4 * n:
                    raise FormatError(f"unexpected torch.save layout: record data/{key} is not {kind} of buffer {g}",
                                      path=self.path)
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                found[(g, kind)] = (info.filename, info.header_offset + 30 + name_len + extra_len, 4 * n)
        return found

    def write(self, gbuf: int, kind: str, offset: int, values: torch.Tensor) -> None:
        """fp32 ``values`` at element ``offset`` of vector ``kind`` of grad buffer ``gbuf``."""
        _, start, size = self._records[(gbuf, kind)]
        data = values.detach().to(torch.float32).contiguous().reshape(-1)
        if offset < 0 or 4 * (offset + data.numel()) > size:
            raise ValueError(f"{kind}[{offset}:+{data.numel()}] lies outside buffer {gbuf}")
        pwrite_all(self._fd, memoryview(data.numpy()).cast("B"), start + 4 * offset)

    def release(self) -> None:
        """Close without finishing (the caller discards the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self, piece: int = 64 << 20) -> None:
        """Put in the CRC-32s: the file is complete."""
        from formats.checkpoint.streaming import patch_zip_crcs

        records = {}
        for name, start, size in self._records.values():
            crc, pos = 0, start
            while pos < start + size:
                chunk = os.pread(self._fd, min(piece, start + size - pos), pos)
                if not chunk:
                    raise FormatError("file ended inside a record", path=self.path)
                crc = zlib.crc32(chunk, crc)
                pos += len(chunk)
            records[name] = (start, size, crc)
        self.release()
        patch_zip_crcs(self.path, records, torch.serialization.get_crc32_options())
