"""Bounded-memory HF I/O for conversions: a ``pread`` safetensors reader and a streaming safetensors writer.

Why not the generic ``formats.checkpoint`` HF reader/writer here: the reader memory-maps shards, and every page
a conversion touches stays in the process's resident set until the mapping closes (peak RSS = model size);
the writer buffers a whole shard (5 GB by default) before writing it. A conversion knows every output name,
shape and dtype before the first byte (from the family rules), so it can write each shard's header first and
then stream the tensors straight to disk in order — memory is one tensor. (Candidates to move into
``formats.checkpoint`` — see the convert area's report.)
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from formats.checkpoint.common import StagedDir
from formats.checkpoint.hf import SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES, read_safetensors_header
from formats.errors import FormatError
from interop.errors import ConversionError

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class PreadSafetensors:
    """Read single tensors of an HF checkpoint's safetensors shards with plain reads (no mmap)."""

    def __init__(self, ckpt):
        if ckpt.format != "safetensors":
            raise ValueError("PreadSafetensors needs safetensors shards")
        self.ckpt = ckpt
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, file: str) -> tuple[int, dict]:
        cached = self._headers.get(file)
        if cached is None:
            path = self.ckpt.path / file
            header = read_safetensors_header(path)  # validates; we still need the data start
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            cached = self._headers[file] = (8 + n, header)
        return cached

    def load(self, name: str) -> torch.Tensor:
        file = self.ckpt.weight_map.get(name)
        if file is None:
            raise FormatError(f"no tensor named {name!r}", path=self.ckpt.path)
        start, header = self._header(file)
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        buf = bytearray(end - begin)
        with open(self.ckpt.path / file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise FormatError(f"truncated data for {name!r}", path=self.ckpt.path / file)
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def hf_loader(ckpt):
    """``load(name)`` for an HF checkpoint: pread for safetensors, the generic reader otherwise."""
    if ckpt.format == "safetensors":
        return PreadSafetensors(ckpt).load
    return ckpt.load


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Group tensors (in stream order) into shards the way Transformers does: a shard closes when the next
    tensor would pass ``max_shard_size``; a larger tensor gets a shard of its own."""
    shards: list[list[int]] = []
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = dtype.itemsize
        for s in shape:
            n *= s
        if not shards or (shards[-1] and size + n > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class StreamingHFWriter:
    """Safetensors shards written tensor by tensor from a known plan ``[(name, shape, dtype), …]`` (stream order).

    Each shard's header (``{"format": "pt"}`` metadata, padded to 8 bytes) is written when the shard opens; the
    tensors must then arrive in plan order. ``finalize()`` writes the index (when sharded), ``config.json`` and
    side files, then renames the temporary directory onto ``dst``.
    """

    def __init__(self, dst, config: dict, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int, side_files: Iterable[Path] = (), force: bool = False):
        self._stage = StagedDir(dst, force)
        self.tmp = self._stage.tmp
        self.config = config
        self.plan = plan
        self.side_files = list(side_files)
        self.shards = plan_shards(plan, max_shard_size)
        n = len(self.shards)
        self.files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {i: s for s, idx in enumerate(self.shards) for i in idx}
        self._next = 0
        self._fh = None
        self._open_shard = -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self._fh:
                self._fh.close()
            self._stage.abort()
        return False

    def _start_shard(self, s: int) -> None:
        if self._fh:
            self._fh.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[s]:
            name, shape, dtype = self.plan[i]
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self._fh = open(self.tmp / self.files[s], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._open_shard = s

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise ConversionError(f"unexpected extra tensor {name}")
        want, shape, dtype = self.plan[self._next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrived where {want} {tuple(shape)} {dtype} "
                "was planned"
            )
        s = self._shard_of[self._next]
        if s != self._open_shard:
            self._start_shard(s)
        t = tensor.detach().contiguous()
        if t.numel():
            self._fh.write(t.view(torch.uint8).reshape(-1).numpy().data)
        self._next += 1

    def finalize(self) -> Path:
        if self._next != len(self.plan):
            missing = self.plan[self._next][0]
            raise ConversionError(f"stream ended before {missing} ({len(self.plan) - self._next} tensors missing)")
        if self._fh:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            weight_map, total, params = {}, 0, 0
            for s, idx in enumerate(self.shards):
                for i in idx:
                    name, shape, dtype = self.plan[i]
                    n = 1
                    for d in shape:
                        n *= d
                    weight_map[name] = self.files[s]
                    total += n * dtype.itemsize
                    params += n
            index = {"metadata": {"total_size": total, "total_parameters": params},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        for f in self.side_files:
            if f.name not in ("config.json", SAFE_INDEX) and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, self.tmp / f.name)
        return self._stage.commit()


def hf_plan(family, cfg, dtype: torch.dtype, canonical_shape) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The HF tensors (name, shape, dtype) a canonical stream of ``cfg`` turns into, in stream order."""
    from interop.convert_stream import canonical_to_hf

    metas = ((name, torch.empty(canonical_shape(name, cfg), device="meta"))
             for name, _ in family.canonical_names(cfg))
    return [(n, tuple(t.shape), dtype) for n, t in canonical_to_hf(family, cfg, metas)]


def write_stream(writer: StreamingHFWriter, pairs: Iterator[tuple[str, torch.Tensor]]) -> tuple[int, int]:
    count = nbytes = 0
    for name, tensor in pairs:
        writer.add(name, tensor)
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    return count, nbytes


__all__ = ["PreadSafetensors", "StreamingHFWriter", "hf_loader", "hf_plan", "plan_shards", "write_stream"]
