"""The Megatron-Core ``torch_dist`` checkpoint format (dist_checkpointing on PyTorch DCP, docs/checkpoint-formats.md
§6): its streaming writer and its registry entry.

The reader is :class:`formats.checkpoint.torch_dist.TorchDistCheckpoint`. Each tensor (or chunk of a stacked
tensor) is appended as a ``torch.save`` blob to a ``.distcp`` file; the DCP ``.metadata`` is built from those
records at the end. Memory: one tensor.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from formats.checkpoint import dcp_metadata
from formats.checkpoint.blob_zip import tensor_blob
from formats.checkpoint.common import check_expected
from formats.checkpoint.protocol import FormatSpec
from formats.checkpoint.megatron import resolve_iteration_dir
from formats.checkpoint.rangewrite import RangeWriter, pwrite_all
from formats.checkpoint.streaming import RefPickler, StagedWriter, StorageRef, TensorRef, owned_tensor, plain_args
from formats.checkpoint.torch_dist import TorchDistCheckpoint, is_torch_dist_dir
from formats.checkpoint.tracker import Tracker
from formats.errors import InteropError

TORCH_DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                       "common_backend": "torch", "common_backend_version": 1}

_LAYER_MODULES_LOCAL = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_keys(num_layers: int, transformer_impl: str = "local", prefix: str = "decoder.layers.") -> list[str]:
    """Keys of the ``_extra_state`` ShardedObjects Megatron-Core's transformer layers request on load (docs/checkpoint-formats.md §6.3/§6.6).

    Value to store for each: ``[None]`` (what Megatron writes for modules without FP8 state).
    """
    modules = list(_LAYER_MODULES_LOCAL)
    if transformer_impl == "transformer_engine":
        modules.append("self_attention.core_attention")
    return [f"{prefix}{m}._extra_state/shard_{i}_{num_layers}" for m in modules for i in range(num_layers)]


class TorchDistWriter(StagedWriter):
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
        RefPickler(buf, protocol=2).dump(TensorRef(StorageRef("0", t.dtype, t.numel()), tuple(t.shape)))
        try:
            blob = tensor_blob(buf.getvalue(), t.numel() * t.element_size())
        except ValueError:  # 4 GiB or more: torch.save writes the zip64 archive (in memory, then out)
            return self._save_object(owned_tensor(t))
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


def is_torch_dist_path(path: Path) -> bool:
    it_dir, _ = resolve_iteration_dir(path)
    return is_torch_dist_dir(it_dir)


FORMAT = FormatSpec(  # global keys: loadable at any layout
    name="torch_dist", kind="megatron", stored_as=("torch_dist",), per_rank_files=False,
    expects="a Megatron save dir (latest_checkpointed_iteration.txt) or iter_*/release dir with metadata.json",
    detect=is_torch_dist_path, open=TorchDistCheckpoint.open, writer=TorchDistWriter,
)
