"""The Hugging Face checkpoint format (docs/checkpoint-formats.md §5.5): its streaming writer and its registry entry.

The reader is :class:`formats.checkpoint.hf.HFCheckpoint`. The writer produces ``config.json`` + safetensors
(single or sharded with an index, as Transformers shards) + side files, staged and renamed on ``finalize()``.
With a ``plan`` of (name, shape, dtype) it writes each shard's header first, then each tensor straight to disk
through the same threads (memory: one tensor plus what is queued); without one, one shard (``max_shard_size``)
is buffered, then written.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch

from formats.checkpoint.hf import BIN_INDEX, SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES, HFCheckpoint, is_hf_dir
from formats.checkpoint.common import check_expected
from formats.checkpoint.protocol import FormatSpec
from formats.checkpoint.rangewrite import RangeWriter
from formats.checkpoint.streaming import StagedWriter, owned_tensor
from formats.checkpoint.tracker import TRACKER
from formats.errors import InteropError

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


class HFCheckpointWriter(StagedWriter):
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
        t = owned_tensor(tensor)
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


def is_hf_path(path: Path) -> bool:
    """A directory with weights or with a ``config.json`` and no Megatron tracker (opening then names the missing
    weights precisely), or one of the HF files itself."""
    if path.is_file():
        return path.suffix in (".safetensors", ".bin") or path.name in ("config.json", SAFE_INDEX, BIN_INDEX)
    return is_hf_dir(path) or (path / "config.json").is_file() and not (path / TRACKER).exists()


FORMAT = FormatSpec(
    name="hf", kind="hf", stored_as=("safetensors", "bin"), per_rank_files=False,
    expects="a Hugging Face dir (config.json + model*.safetensors / pytorch_model*.bin)",
    detect=is_hf_path, open=HFCheckpoint.open, writer=HFCheckpointWriter,
)
