"""Megatron checkpoints in the per-rank ``torch`` format (docs/checkpoint-formats.md §1–§3): ``iter_*/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``.

One class for legacy-key and Megatron-Core-key files; ``key_style`` says which. Rank files are memory-mapped
(``torch.load(mmap=True)``) through the allow-listing unpickler, so listing touches only the pickles and a
tensor's bytes are read when that tensor is loaded.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import mmap
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formats.checkpoint.common import TensorInfo
from formats.checkpoint.confine import check_inside, confinement_root
from formats.checkpoint.tracker import TRACKER, Tracker, parse_iteration_dirname, parse_rank_dirname, rank_dirname
from formats.checkpoint.unpickle import load_megatron_pickle, weights_only_load
from formats.errors import FormatError
from formats.layout import Layout

RANK_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
_CHUNK_RE = re.compile(r"^model(\d+)$")


def flatten_state(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten legacy nested dicts to dotted names (``language_model.encoder.layers.0.…``); mcore dicts pass through."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                out.update(flatten_state(value, name))
            else:
                out[name] = value
    return out


def detect_key_style(names) -> str:
    """``legacy`` (``language_model.*``), ``mcore_te`` (norms fused into ``linear_qkv``/``linear_fc1``) or ``mcore``."""
    names = list(names)
    if any(n.startswith(("language_model.", "word_embeddings_for_head.")) for n in names):
        return "legacy"
    if any(".linear_qkv.layer_norm_" in n or ".linear_fc1.layer_norm_" in n or "core_attention._extra_state" in n for n in names):
        return "mcore_te"
    return "mcore"


def arg(args: Any, *names: str, default: Any = None) -> Any:
    """First present attribute of ``args`` among ``names`` (field names changed over Megatron's history)."""
    for name in names:
        value = getattr(args, name, None) if args is not None else None
        if value is not None:
            return value
    return default


def layout_from_args(args: Any, chunks: int = 1, seen: tuple[int, int, int] = (1, 1, 1)) -> Layout:
    """The layout recorded in ``args``; sizes missing from args come from ``seen`` (the rank dirs present)."""
    tp = int(arg(args, "tensor_model_parallel_size", "model_parallel_size", default=seen[0]))
    pp = int(arg(args, "pipeline_model_parallel_size", default=seen[1]))
    ep = int(arg(args, "expert_model_parallel_size", default=seen[2]))
    dp = int(arg(args, "data_parallel_size", default=1))
    vpp = arg(args, "virtual_pipeline_model_parallel_size")
    vpp = int(vpp) if vpp else (chunks if chunks > 1 else None)
    return Layout(tp=tp, pp=pp, vpp=vpp if pp > 1 else None, dp=dp, ep=ep)


def resolve_iteration_dir(path: Path) -> tuple[Path, Tracker | None]:
    """Map a save dir (with tracker), an ``iter_*``/``release`` dir, or a rank dir/file to the iteration dir."""
    if path.is_file():
        path = path.parent
    if parse_rank_dirname(path.name) is not None:
        path = path.parent
    if (path / TRACKER).is_file():
        tracker = Tracker.read(path / TRACKER)
        it_dir = path / tracker.dirname
        if not it_dir.is_dir():
            raise FormatError(f"tracker names {tracker.dirname} but that directory is missing", path=path / TRACKER)
        return it_dir, tracker
    return path, parse_iteration_dirname(path.name)


@dataclass
class RankFile:
    """One loaded (memory-mapped) ``model_optim_rng.pt``: its flattened model chunks and top-level fields."""

    path: Path
    chunks: list[dict[str, Any]]  # per VPP chunk: flat name -> tensor (non-tensors kept for key_style)
    top: dict[str, Any]
    _crcs: "StorageCrcs | None" = None

    def check_crc(self, t: torch.Tensor) -> None:
        """Check the zip CRC-32 of the record holding ``t``'s storage (once per record) before its bytes are used."""
        if self._crcs is None:
            self._crcs = StorageCrcs(self.path, [*_all_tensors(self.chunks), *_all_tensors(self.top)])
        self._crcs.check(t)


class StorageCrcs:
    """Matches the storages of a memory-mapped ``torch.load`` to the file's zip records, to check their CRC-32.

    ``torch.load(mmap=True)`` maps the whole file once and gives each storage the slice at its record's data
    offset, so ``storage.data_ptr() - record offset`` is the same mapping base for every storage; the base
    comes from the lowest storage and the lowest data record. A legacy (non-zip) file has no CRCs: not checked."""

    def __init__(self, path: Path, tensors: list[torch.Tensor]):
        import zipfile

        from formats.checkpoint.crc import ZipRecords

        self.path = path
        self.records = ZipRecords(path) if zipfile.is_zipfile(path) else None
        self.base = None
        if self.records is not None:
            data = [start for name, (start, size, _) in self.records.records.items() if "/data/" in name and size]
            ptrs = [s.data_ptr() for t in tensors if (s := t.untyped_storage()).nbytes()]
            if data and ptrs:
                self.base = min(ptrs) - min(data)

    def check(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if self.records is None or self.base is None or not storage.nbytes():
            return
        data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        record = self.records.by_offset.get(storage.data_ptr() - self.base)
        if record is not None and record[1] == storage.nbytes():
            self.records.check(record[0], data)
            return
        # not memory-mapped after all (torch fell back to reading): match the storage by size and CRC instead
        from formats.checkpoint.crc import crc32

        got = crc32(data)
        if not any(size == storage.nbytes() and crc == got for size, crc in
                   ((size, crc) for _, (_, size, crc) in self.records.records.items())):
            raise FormatError(f"CRC-32 mismatch: no zip record of {storage.nbytes()} bytes has the CRC of this "
                              f"tensor's data ({got:08x}); the tensor data is corrupt", path=self.path)


def _all_tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _all_tensors(item)]
    return []


@dataclass
class MegatronCheckpoint:
    """Common face of Megatron checkpoints (``torch`` and ``torch_dist``)."""

    path: Path  # the iteration directory
    format: str
    layout: Layout
    iteration: int
    release: bool
    args: argparse.Namespace | None
    checkpoint_version: float
    key_style: str
    kind: str = "megatron"
    optimizer_files: list[str] = field(default_factory=list)

    def arg(self, *names: str, default: Any = None) -> Any:
        return arg(self.args, *names, default=default)


class MegatronTorchCheckpoint(MegatronCheckpoint):
    """Per-rank ``torch`` format. Names are per rank and chunk, stage-local and TP-local, exactly as stored."""

    def __init__(self, path: Path, ranks: dict[tuple[int, int, int], Path], first: RankFile, release: bool):
        self._ranks = ranks  # (tp, pp, ep) -> file
        self._loaded: dict[tuple[int, int, int], RankFile] = {}
        key0 = min(ranks)
        self._loaded[key0] = first
        top = first.top
        args = top.get("args")
        version = top.get("checkpoint_version")
        iteration = top.get("iteration", top.get("total_iters", 0))
        super().__init__(
            path=path,
            format="torch",
            layout=layout_from_args(args, len(first.chunks), tuple(max(k[i] for k in ranks) + 1 for i in range(3))),
            iteration=0 if release else int(iteration or 0),
            release=release,
            args=args,
            checkpoint_version=float(version) if version is not None else 0.0,
            key_style=detect_key_style(first.chunks[0].keys()),
            optimizer_files=sorted(str(p.relative_to(path)) for p in path.glob(f"mp_rank_*/{OPTIM_FILE}")),
        )
        if args is not None:
            lost = sorted((t, p) for t in range(self.layout.tp) for p in range(self.layout.pp)
                          if not any(k[:2] == (t, p) for k in ranks))
            if lost:
                t, p = lost[0]
                raise FormatError(
                    f"args say {self.layout} but rank file {self.rank_dir(t, p)}/{RANK_FILE} is missing", path=path
                )

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "MegatronTorchCheckpoint":
        given = Path(path)
        if given.is_file() and parse_rank_dirname(given.parent.name) is None:
            # a lone model_optim_rng.pt outside the usual tree: one rank
            first = _load_rank(given)
            return cls(given.parent, {(0, 0, 0): given}, first, release=False)
        it_dir, tracker = resolve_iteration_dir(given)
        dirs = sorted(p for p in it_dir.glob("mp_rank_*") if p.is_dir() and parse_rank_dirname(p.name) is not None)
        files = [d / RANK_FILE for d in dirs if (d / RANK_FILE).is_file()]
        root = confinement_root(it_dir)
        for f in files:  # a rank dir or file linked to elsewhere is not part of this checkpoint
            check_inside(f, f"rank file {f.parent.name}/{RANK_FILE}", root)
        if not files:
            raise FormatError(
                f"not a Megatron torch checkpoint: expected mp_rank_*/{RANK_FILE} (or metadata.json for torch_dist)",
                path=it_dir,
            )
        first = _load_rank(files[0])
        args = first.top.get("args")
        pp = int(arg(args, "pipeline_model_parallel_size", default=0))
        ep = int(arg(args, "expert_model_parallel_size", default=1))
        ranks: dict[tuple[int, int, int], Path] = {}
        for f in files:
            fields = parse_rank_dirname(f.parent.name)
            ranks[_rank_key(fields, pp, ep, f)] = f
        release = tracker.release if tracker else it_dir.name == "release"
        return cls(it_dir, ranks, first, release)

    # -- per-rank access ------------------------------------------------------------------------------
    def rank_dir(self, tp: int, pp: int, ep: int = 0) -> str:
        return rank_dirname(tp, pp if self.layout.pp > 1 else None, ep if self.layout.ep > 1 else None)

    def rank_file(self, tp: int, pp: int, ep: int = 0) -> RankFile:
        key = (tp, pp, ep)
        if key not in self._loaded:
            path = self._ranks.get(key)
            if path is None:
                raise FormatError(f"no rank file for tp={tp} pp={pp} ep={ep} ({self.rank_dir(tp, pp, ep)}/{RANK_FILE})", path=self.path)
            self._loaded[key] = _load_rank(path)
        return self._loaded[key]

    def rank_state(self, tp: int, pp: int, chunk: int = 0, ep: int = 0) -> dict[str, Any]:
        """The flat (memory-mapped) state dict of one rank and chunk, non-tensor entries included."""
        chunks = self.rank_file(tp, pp, ep).chunks
        if not 0 <= chunk < len(chunks):
            raise FormatError(f"rank tp={tp} pp={pp} has {len(chunks)} model chunk(s), asked for chunk {chunk}", path=self.path)
        return chunks[chunk]

    def check_crc(self, t: torch.Tensor, tp: int, pp: int, ep: int = 0) -> torch.Tensor:
        """``t`` (a tensor of rank ``tp``/``pp``'s state) after checking its record's zip CRC-32; readers call this
        before using a tensor's bytes (``load_rank_tensor`` does)."""
        self.rank_file(tp, pp, ep).check_crc(t)
        return t

    def rank_tensors(self, tp: int, pp: int, chunk: int = 0, ep: int = 0) -> list[TensorInfo]:
        rf = self.rank_file(tp, pp, ep)
        loc = str(rf.path.relative_to(self.path)) if rf.path.is_relative_to(self.path) else rf.path.name
        shard = self._shard_tag(tp, pp, chunk, ep)
        return [
            TensorInfo(n, tuple(t.shape), t.dtype, loc, shard)
            for n, t in self.rank_state(tp, pp, chunk, ep).items()
            if isinstance(t, torch.Tensor)
        ]

    def load_rank_tensor(self, name: str, tp: int, pp: int, chunk: int = 0, ep: int = 0) -> torch.Tensor:
        state = self.rank_state(tp, pp, chunk, ep)
        t = state.get(name)
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"no tensor {name!r} in {self.rank_dir(tp, pp, ep)} chunk {chunk}", path=self.path)
        self.rank_file(tp, pp, ep).check_crc(t)
        out = t.clone()  # reads exactly this tensor's bytes from the mapped file
        release_pages(t)
        return out

    def optimizer_state(self, tp: int, pp: int, ep: int = 0) -> Any:
        """The ``distrib_optim.pt`` of one rank dir (docs/checkpoint-formats.md §7; plain tensors, so ``weights_only`` loads it), or None."""
        path = self.path / self.rank_dir(tp, pp, ep) / OPTIM_FILE
        if not path.is_file():
            return None
        check_inside(path, f"optimizer file {self.rank_dir(tp, pp, ep)}/{OPTIM_FILE}", confinement_root(self.path))
        return weights_only_load(path, allowed=[], mmap=True)

    def rank_keys(self) -> list[tuple[int, int, int]]:
        return sorted(self._ranks)

    @property
    def num_chunks(self) -> int:
        return len(self.rank_file(*self.rank_keys()[0]).chunks)

    # -- common API -----------------------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        """All ranks' tensors; ``shard`` is ``tpT.ppP[.epE][.chunkC]`` (names repeat across shards)."""
        out: list[TensorInfo] = []
        for tp, pp, ep in self.rank_keys():
            for chunk in range(len(self.rank_file(tp, pp, ep).chunks)):
                out.extend(self.rank_tensors(tp, pp, chunk, ep))
        return out

    def load(self, name: str, tp: int = 0, pp: int = 0, chunk: int = 0, ep: int = 0) -> torch.Tensor:
        return self.load_rank_tensor(name, tp, pp, chunk, ep)

    def _shard_tag(self, tp: int, pp: int, chunk: int, ep: int) -> str:
        tag = f"tp{tp}.pp{pp}"
        if self.layout.ep > 1:
            tag += f".ep{ep}"
        if self.layout.interleaved:
            tag += f".chunk{chunk}"
        return tag


def release_pages(t: torch.Tensor) -> None:
    """Drop the file-backed pages a copied tensor touched, so reading a checkpoint tensor by tensor keeps the
    resident set at one tensor instead of growing to the file size.

    Rank files are loaded with ``mmap=True`` (a private, read-only-in-practice file mapping): ``MADV_DONTNEED``
    only discards clean cached pages there, and a later access re-reads them from the file. Linux only;
    elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        libc = _libc()
        page = mmap.PAGESIZE
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first, last = start - start % page, end - end % page  # whole pages only, inside the mapping
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except Exception:  # pragma: no cover - advisory only
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _rank_key(fields: tuple[int, ...], pp: int, ep: int, f: Path) -> tuple[int, int, int]:
    """Decode ``mp_rank_*`` fields into (tp, pp, ep) using args (docs/checkpoint-formats.md trap T21: a 2-field name is PP or EP)."""
    if len(fields) == 1:
        return fields[0], 0, 0
    if len(fields) == 3:
        return fields
    if pp > 1:
        return fields[0], fields[1], 0
    if ep > 1:
        return fields[0], 0, fields[1]
    if pp == 0:  # no args to decide with: Megatron's own probe order puts PP before EP
        return fields[0], fields[1], 0
    raise FormatError("rank directory name has two fields but args say PP=1 and EP=1", path=f.parent)


def _load_rank(path: Path) -> RankFile:
    top = load_megatron_pickle(path)
    if not isinstance(top, dict):
        raise FormatError("expected a dict with 'model' or 'model0…' (a Megatron rank file)", path=path)
    if "model" in top:
        chunks = [top["model"]]
    else:
        numbered = sorted((int(m.group(1)), k) for k in top if isinstance(k, str) and (m := _CHUNK_RE.match(k)))
        if not numbered:
            raise FormatError(f"no 'model' or 'model0' entry (found keys: {sorted(map(str, top))[:8]})", path=path)
        chunks = [top[k] for _, k in numbered]
    flat = []
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise FormatError("model entry is not a state dict", path=path)
        flat.append(flatten_state(chunk))
    return RankFile(path=path, chunks=flat, top={k: v for k, v in top.items() if not (k == "model" or (isinstance(k, str) and _CHUNK_RE.match(k)))})
