"""Megatron-Core ``torch_dist`` checkpoints (docs/checkpoint-formats.md §6): PyTorch DCP files + ``common.pt`` + ``metadata.json``.

Read without torch.distributed: the ``.metadata`` pickle (through an allow-listing unpickler, DCP's dataclasses
read into stand-ins so that ``torch.distributed.checkpoint`` is not even imported) gives every key's global shape
and chunks; ``load(key, slices)`` reads only the chunks that overlap the wanted region, each an
independent ``torch.save`` blob at a byte range of a ``.distcp`` file.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch

from formats.checkpoint.blob_map import FileMaps, mapped_tensor
from formats.checkpoint.common import TensorInfo, read_json_object
from formats.checkpoint.crc import check_zip_blob
from formats.checkpoint.confine import check_files_inside, confined, confinement_root
from formats.checkpoint.dcp_metadata import MetadataUnpickler, kind
from formats.checkpoint.megatron import MegatronCheckpoint, layout_from_args, release_pages, resolve_iteration_dir
from formats.checkpoint.unpickle import load_megatron_pickle, load_megatron_pickle_bytes, weights_only_load
from formats.errors import FormatError

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
DCP_METADATA = ".metadata"
def is_torch_dist_dir(path: Path) -> bool:
    return (path / METADATA_JSON).is_file()


class TorchDistCheckpoint(MegatronCheckpoint):
    """A ``torch_dist`` iteration directory. Keys are global (stacked layers, TE norm names), shapes full."""

    def __init__(self, path: Path, common: dict, metadata, release: bool, backend: dict):
        args = common.get("args")
        version = common.get("checkpoint_version")
        self.common = common
        self.backend = backend
        self.metadata = metadata
        self._index: dict[str, list] = {}
        self._maps = FileMaps()  # data files, mapped on first read (see blob_map)
        self._files = _storage_files(path, metadata)  # relative_path -> checked path
        for idx, info in metadata.storage_data.items():
            self._index.setdefault(idx.fqn, []).append((tuple(idx.offset or ()), info))
        super().__init__(
            path=path,
            format="torch_dist",
            layout=layout_from_args(args),
            iteration=0 if release else int(common.get("iteration", 0) or 0),
            release=release,
            args=args,
            checkpoint_version=float(version) if version is not None else 0.0,
            # torch_dist always stores local-spec norms under TE names (docs/checkpoint-formats.md §6.3); only TE's attention
            # extra state tells the two specs apart
            key_style="mcore_te" if any("core_attention._extra_state" in k for k in metadata.state_dict_metadata)
            else "mcore",
        )
        self.optimizer_keys = sorted(k for k in metadata.state_dict_metadata if k.startswith("optimizer."))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TorchDistCheckpoint":
        it_dir, tracker = resolve_iteration_dir(Path(path))
        mj = it_dir / METADATA_JSON
        if not mj.is_file():
            raise FormatError(f"not a torch_dist checkpoint: {METADATA_JSON} missing", path=it_dir)
        check_files_inside(it_dir, (METADATA_JSON, COMMON, DCP_METADATA), confinement_root(it_dir))
        backend = read_json_object(mj)
        if backend.get("sharded_backend") not in ("torch_dist", "torch"):
            raise FormatError(f"unsupported sharded backend {backend.get('sharded_backend')!r} (only torch_dist is readable)", path=mj)
        for name in (COMMON, DCP_METADATA):
            if not (it_dir / name).is_file():
                raise FormatError(f"torch_dist checkpoint without {name}", path=it_dir)
        common = load_megatron_pickle(it_dir / COMMON, mmap=False)
        if not isinstance(common, dict):
            raise FormatError("common.pt must hold a dict", path=it_dir / COMMON)
        try:
            with open(it_dir / DCP_METADATA, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except Exception as exc:
            raise FormatError(f"cannot read DCP metadata: {exc}", path=it_dir / DCP_METADATA) from None
        release = tracker.release if tracker else it_dir.name == "release"
        return cls(it_dir, common, metadata, release, backend)

    # -- listing ----------------------------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        out = []
        for key, md in sorted(self.metadata.state_dict_metadata.items()):
            if kind(md) == "TensorStorageMetadata":
                files = sorted({info.relative_path for _, info in self._index.get(key, [])})
                out.append(TensorInfo(key, tuple(md.size), md.properties.dtype, ",".join(files), f"{len(md.chunks)} chunk(s)"))
        return out

    def objects(self) -> list[str]:
        """Keys of non-tensor (bytes) entries: ``…_extra_state/shard_i_L``, ``rng_state/…``, optimizer objects."""
        return sorted(k for k, md in self.metadata.state_dict_metadata.items() if kind(md) == "BytesStorageMetadata")

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, key: str, slices: tuple[slice, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key`` (or the region ``slices`` of its global shape), reading only overlapping chunks;
        into ``out`` where given (a reused buffer: fresh memory costs more than the copy on the VMs we measured)."""
        md = self.metadata.state_dict_metadata.get(key)
        if kind(md) != "TensorStorageMetadata":
            raise FormatError(f"no tensor {key!r} in torch_dist checkpoint", path=self.path)
        shape = tuple(md.size)
        region = _normalize(slices, shape, key, self.path)
        region_shape = [hi - lo for lo, hi in region]
        if out is None:
            out = torch.empty(region_shape, dtype=md.properties.dtype)
        elif list(out.shape) != region_shape or out.dtype != md.properties.dtype:
            raise ValueError(f"{key}: out is {tuple(out.shape)} {out.dtype}, the region is {tuple(region_shape)} "
                             f"{md.properties.dtype}")
        covered = 0
        chunk_sizes = {tuple(c.offsets): tuple(c.sizes) for c in md.chunks}  # (a linear search per chunk was
        for offsets, info in self._index.get(key, []):                    # quadratic in a key's chunk count)
            sizes = chunk_sizes.get(offsets)
            if sizes is None:
                continue
            inter = [(max(lo, o), min(hi, o + s)) for (lo, hi), o, s in zip(region, offsets, sizes)]
            if any(a >= b for a, b in inter):
                continue
            chunk, is_view = self._mapped_chunk(info) or (self._read_chunk(key, info), False)
            if tuple(chunk.shape) != sizes:
                raise FormatError(f"{key}: chunk at {offsets} has shape {tuple(chunk.shape)}, metadata says {sizes}", path=self._files[info.relative_path])
            src = tuple(slice(a - o, b - o) for (a, b), o in zip(inter, offsets))
            dst = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inter, region))
            out[dst] = chunk[src]
            if is_view:
                release_pages(chunk)  # the file pages this copy touched: reading stays at one tensor of RSS
            covered += math.prod(b - a for a, b in inter)
        if covered < out.numel():
            raise FormatError(f"{key}: stored chunks cover {covered} of {out.numel()} requested elements", path=self.path)
        return out

    def load_object(self, key: str, strict: bool = False) -> Any:
        """A bytes entry, unpickled with the same allow-list as ``common.pt`` (Megatron stores a list of objects)."""
        entries = self._index.get(key)
        if not entries:
            raise FormatError(f"no object {key!r} in torch_dist checkpoint", path=self.path)
        info = entries[0][1]
        raw = self._read_bytes(info)
        check_zip_blob(raw, self._files[info.relative_path])
        return load_megatron_pickle_bytes(raw, self._files[info.relative_path], strict=strict)

    def _read_bytes(self, info) -> bytes:
        if getattr(info, "transform_descriptors", None):
            raise FormatError(f"unsupported DCP storage transform {info.transform_descriptors}", path=self._files[info.relative_path])
        file = self._files[info.relative_path]
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not 0 <= info.offset <= info.offset + info.length <= size:  # never allocate a hostile length
                    raise FormatError(f"truncated data file: storage entry [{info.offset}, +{info.length}) lies "
                                      f"outside the file ({size} bytes)", path=file)
                f.seek(info.offset)
                raw = f.read(info.length)
        except OSError as exc:
            raise FormatError(f"cannot read data file: {exc.strerror}", path=file) from None
        if len(raw) != info.length:
            raise FormatError(f"truncated data file: needed {info.length} bytes at offset {info.offset}", path=file)
        return raw

    def _mapped_chunk(self, info) -> tuple[torch.Tensor, bool] | None:
        """``(chunk, is_view)`` from the mapped data file (see ``blob_map.mapped_tensor``), or None where that does
        not apply."""
        if getattr(info, "transform_descriptors", None):
            return None
        mapped = self._maps.get(self._files[info.relative_path])
        return None if mapped is None else mapped_tensor(mapped, info.offset, info.length, self._files[info.relative_path])

    def _read_chunk(self, key: str, info) -> torch.Tensor:
        raw = self._read_bytes(info)
        check_zip_blob(raw, self._files[info.relative_path])
        return weights_only_load(io.BytesIO(raw), allowed=[], where=self._files[info.relative_path],
                                 problem=f"{key}: corrupt chunk at offset {info.offset}")


def _storage_files(path: Path, metadata) -> dict[str, Path]:
    """Check the structure of DCP metadata and every storage entry: its ``relative_path`` names a file inside the
    checkpoint, its byte range lies inside that file. Returns ``relative_path -> path``."""
    where = path / DCP_METADATA
    if kind(metadata) != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(metadata, "storage_data", None) or {}, dict):
        raise FormatError("DCP metadata is not a Metadata with state_dict_metadata and storage_data dicts", path=where)
    if metadata.storage_data is None:
        metadata.storage_data = {}
    root = confinement_root(path)
    files: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    for idx, info in metadata.storage_data.items():
        fqn = getattr(idx, "fqn", None)
        rel, offset, length = (getattr(info, f, None) for f in ("relative_path", "offset", "length"))
        if not isinstance(fqn, str) or not isinstance(rel, str):
            raise FormatError(f"DCP storage entry {fqn!r} has no valid key or relative_path", path=where)
        if rel not in files:
            files[rel] = confined(path, rel, f"DCP storage entry {fqn!r} (relative_path)", root)
            try:
                sizes[rel] = files[rel].stat().st_size
            except OSError:
                raise FormatError(f"DCP storage entry {fqn!r} names missing data file {rel!r}", path=where) from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise FormatError(f"DCP storage entry {fqn!r} has an invalid byte range offset={offset!r} "
                              f"length={length!r}", path=where)
        if offset + length > sizes[rel]:
            raise FormatError(f"truncated data file: DCP storage entry {fqn!r} needs bytes [{offset}, "
                              f"{offset + length}), the file has {sizes[rel]}", path=files[rel])
    return files


def _normalize(slices, shape, key, path) -> list[tuple[int, int]]:
    if slices is None:
        slices = ()
    if not isinstance(slices, tuple):
        slices = (slices,)
    if len(slices) > len(shape):
        raise FormatError(f"{key}: {len(slices)} slices for a {len(shape)}-d tensor", path=path)
    region = []
    for dim, size in enumerate(shape):
        s = slices[dim] if dim < len(slices) else slice(None)
        if isinstance(s, int):
            s = slice(s, s + 1)
        lo, hi, step = s.indices(size)
        if step != 1:
            raise FormatError(f"{key}: only step-1 slices are supported", path=path)
        region.append((lo, max(lo, hi)))
    return region
