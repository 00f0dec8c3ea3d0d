"""Hugging Face checkpoint directories (docs/checkpoint-formats.md §5.5): ``config.json`` + safetensors (single or sharded) or ``.bin``.

Listing reads only the safetensors JSON headers (or memory-maps the ``.bin`` pickle), so it costs
kilobytes whatever the model size; ``load`` reads one tensor with a plain read (no memory mapping: a mapping
keeps every touched page resident until it closes, so a conversion's peak RSS would be the model size), or a
slice of one through ``safe_open``.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from formats.checkpoint.common import TensorInfo, read_json_object, require_file
from formats.checkpoint.confine import check_files_inside, check_inside, confined, confinement_root
from formats.checkpoint.unpickle import weights_only_load
from formats.errors import FormatError
from formats.layout import Layout

MAP_MIN_BYTES = 1 << 20  # below this, a read costs less than setting up a mapping

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in WEIGHT_FILES)


MAX_HEADER_SIZE = 100_000_000  # safetensors' own limit


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without touching tensor data, by safetensors' own rules (its Rust
    ``read_metadata`` and ``Metadata::validate``): header length within the file and at most 100 MB, a UTF-8 JSON
    object starting with ``{``, every entry a known dtype, a shape of non-negative integers and integer
    ``data_offsets`` ``[begin, end]`` with ``end - begin == numel × itemsize``; sorted by offset the tensors tile
    the data area from 0 to the end of the file exactly (no gap, no overlap, nothing after). Anything else is a
    one-line :class:`FormatError` naming the file and the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError("truncated safetensors file (no header length)", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            raise FormatError(f"corrupt safetensors file: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit",
                              path=path)
        if n > size - 8:
            raise FormatError(f"truncated or corrupt safetensors file (header of {n} bytes, file of {size})", path=path)
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"corrupt safetensors header ({exc})", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header (not a JSON object)", path=path)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError("corrupt safetensors header: __metadata__ must map strings to strings", path=path)
    spans = sorted((_checked_entry(name, entry, path), name) for name, entry in header.items())
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise FormatError(f"invalid data_offsets for tensor {name!r}: [{begin}, {end}] {problem}", path=path)
        position = end
    if position > size - 8 - n:
        raise FormatError(f"truncated safetensors file: tensors need {position} data bytes, the file has "
                          f"{size - 8 - n}", path=path)
    if position < size - 8 - n:
        raise FormatError(f"corrupt safetensors file: {size - 8 - n - position} bytes after the last tensor's data",
                          path=path)
    return header


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(name: str, entry, path: Path) -> tuple[int, int]:
    """``(begin, end)`` of one header entry after checking its fields (safetensors' ``TensorInfo`` + validate)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"corrupt safetensors header entry for tensor {name!r} (needs exactly dtype, shape, "
                          "data_offsets)", path=path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise FormatError(f"unsupported safetensors dtype {dtype!r} for tensor {name!r}", path=path)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"invalid shape {shape!r} for tensor {name!r} (non-negative integers)", path=path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"invalid data_offsets {offsets!r} for tensor {name!r} (two non-negative integers)",
                          path=path)
    begin, end = offsets
    if end < begin:
        raise FormatError(f"invalid data_offsets for tensor {name!r}: [{begin}, {end}] is reversed", path=path)
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise FormatError(f"tensor {name!r} spans {end - begin} bytes but {dtype} x {shape} needs {nbytes}", path=path)
    return begin, end


def _header_with_base(path: Path) -> tuple[int, dict]:
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, header


@dataclass
class HFCheckpoint:
    """A Hugging Face model directory. ``config`` is ``config.json``; ``side_files`` are files to carry along
    (tokenizer, ``generation_config.json``, …): everything that is neither weights, index nor config."""

    path: Path
    format: str  # "safetensors" | "bin"
    config: dict
    weight_map: dict[str, str]  # tensor name -> file name (relative to path)
    side_files: list[Path] = field(default_factory=list)
    kind: str = "hf"

    def __post_init__(self):
        self._infos: list[TensorInfo] | None = None
        self._bin_cache: dict[str, dict] = {}
        self._handles: dict[str, object] = {}
        self._headers: dict[str, tuple[int, dict]] = {}

    @property
    def layout(self) -> Layout:
        """HF weights are whole tensors: the layout of one rank (part of the common reader interface)."""
        return Layout()

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "HFCheckpoint":
        path = Path(path)
        if path.is_file():
            path = path.parent
        config_path = path / "config.json"
        require_file(config_path, "config.json (a Hugging Face checkpoint needs it)")
        root = confinement_root(path)
        check_files_inside(path, ("config.json", *WEIGHT_FILES), root)
        config = read_json_object(config_path)
        if (path / SAFE_INDEX).is_file():
            fmt, weight_map = "safetensors", cls._read_index(path / SAFE_INDEX)
        elif (path / SAFE_SINGLE).is_file():
            fmt = "safetensors"
            weight_map = {name: SAFE_SINGLE for name in read_safetensors_header(path / SAFE_SINGLE)}
        elif (path / BIN_INDEX).is_file():
            fmt, weight_map = "bin", cls._read_index(path / BIN_INDEX)
        elif (path / BIN_SINGLE).is_file():
            fmt, weight_map = "bin", None
        else:
            raise FormatError(f"no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}", path=path)
        weights = {SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE, "config.json"}
        if weight_map:
            weights |= set(weight_map.values())
        side = sorted(p for p in path.iterdir() if p.is_file() and p.name not in weights and not p.name.startswith("."))
        for p in side:  # tokenizer files are copied into outputs: a link to elsewhere must not be
            check_inside(p, f"file {p.name!r}", root)
        ckpt = cls(path=path, format=fmt, config=config, weight_map=weight_map or {}, side_files=side)
        if weight_map is None:
            ckpt.weight_map = {name: BIN_SINGLE for name in ckpt._bin(BIN_SINGLE)}
        return ckpt

    @staticmethod
    def _read_index(index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"invalid index (needs a 'weight_map' object): {exc}", path=index) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError("index has an empty or invalid 'weight_map'", path=index)
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise FormatError(f"weight_map entry {bad!r} is not a file name", path=index)
        for shard in sorted(set(weight_map.values())):
            if not confined(index.parent, shard, f"weight_map entry {shard!r}").is_file():
                raise FormatError(f"index points at missing shard {shard}", path=index)
        return dict(weight_map)

    # -- listing and loading -------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def tensors(self) -> list[TensorInfo]:
        """Every stored tensor (name, shape, dtype, file) read from headers only."""
        if self._infos is None:
            infos = []
            for file in self.files:
                if self.format == "safetensors":
                    header = read_safetensors_header(self.path / file)
                    for name, e in header.items():
                        infos.append(TensorInfo(name, tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]], file))
                else:
                    for name, t in self._bin(file).items():
                        if isinstance(t, torch.Tensor):
                            infos.append(TensorInfo(name, tuple(t.shape), t.dtype, file))
            names = {i.name for i in infos}
            missing = sorted(set(self.weight_map) - names)
            if missing:
                raise FormatError(f"index lists {len(missing)} tensor(s) absent from their shards, e.g. {missing[0]!r}", path=self.path)
            self._infos = sorted(infos, key=lambda i: i.name)
        return list(self._infos)

    def load(self, name: str, slices: tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor (optionally a slice of it, reading only those bytes for safetensors)."""
        file = self.weight_map.get(name)
        if file is None:
            raise FormatError(f"no tensor named {name!r}", path=self.path)
        if self.format == "bin":
            t = self._bin(file)[name]
            return (t[slices] if slices else t).clone()
        if not slices:
            return self._pread(file, name)
        handle = self._safe(file)
        try:
            return handle.get_slice(name)[slices].clone()
        except Exception as exc:
            raise FormatError(f"cannot read tensor {name!r}: {exc}", path=self.path / file) from None

    def map(self, name: str) -> torch.Tensor:
        """One tensor as a private (copy-on-write) mapping of its bytes in the safetensors file: no copy and no
        fresh memory — its pages are the page cache's until written to. The mapping is dropped with the
        tensor. Small tensors, ``.bin`` files and byte ranges not aligned for the dtype are read (:meth:`load`)."""
        file = self.weight_map.get(name)
        if file is None or self.format == "bin":
            return self.load(name)
        base, header = self._header(file)
        entry = header.get(name)
        if entry is None:
            return self.load(name)
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        start = base + begin
        if end - begin < MAP_MIN_BYTES or start % dtype.itemsize:
            return self.load(name)
        import mmap

        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path / file, "rb") as f:
            if os.fstat(f.fileno()).st_size < base + end:
                raise FormatError(f"truncated data for tensor {name!r}", path=self.path / file)
            mm = mmap.mmap(f.fileno(), base + end - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        raw = torch.frombuffer(mm, dtype=torch.uint8)[start - aligned:]
        return raw.view(dtype).reshape(entry["shape"])

    def _header(self, file: str):
        headers = self._headers.get(file)
        if headers is None:
            headers = self._headers[file] = _header_with_base(self.path / file)
        return headers

    def _pread(self, file: str, name: str) -> torch.Tensor:
        """Read one tensor's bytes with a plain read (no mapping kept: resident memory is this tensor only)."""
        base, header = self._header(file)
        entry = header.get(name)
        if entry is None:
            raise FormatError(f"tensor {name!r} is not in this shard", path=self.path / file)
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)  # uninitialised: the read fills it (no zero-fill pass)
        with open(self.path / file, "rb", buffering=0) as f:
            f.seek(base + begin)
            view, got = memoryview(buf.numpy()), 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise FormatError(f"truncated data for tensor {name!r}", path=self.path / file)
                got += n
        return buf.view(dtype).reshape(entry["shape"])

    def _safe(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as exc:
                raise FormatError(f"cannot open safetensors file: {exc}", path=self.path / file) from None
            self._handles[file] = handle
        return handle

    def _bin(self, file: str) -> dict:
        cached = self._bin_cache.get(file)
        if cached is None:
            p = self.path / file
            require_file(p, "weights file")
            cached = weights_only_load(p, allowed=[], mmap=True)  # plain tensors: torch's own allow-list
            if not isinstance(cached, dict):
                raise FormatError("expected a state dict (name -> tensor)", path=p)
            self._bin_cache[file] = cached
        return cached
