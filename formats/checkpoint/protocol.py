"""What a checkpoint format implements (see :mod:`formats.checkpoint.registry` and docs/architecture.md, "A checkpoint
format"): the reader and writer interfaces every format offers, and :class:`FormatSpec`, the plain record a format
module declares itself with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from formats.checkpoint.common import TensorInfo
from formats.layout import Layout


class CheckpointReader(Protocol):
    """What every opened checkpoint offers: listing without loading, and one tensor at a time."""

    path: Path
    kind: str  # which canonical source reads it: "hf" | "megatron"
    format: str  # how it is stored (one of its format's ``stored_as``)

    @property
    def layout(self) -> Layout: ...  # the parallel layout it was saved at (TP = PP = 1 for HF)

    def tensors(self) -> list[TensorInfo]: ...  # names, shapes, dtypes, locations; nothing loaded

    def load(self, name: str, *where: Any, **kw: Any) -> torch.Tensor: ...


class CheckpointWriter(Protocol):
    """What every writer offers: stream tensors into a temporary sibling of ``dst``, then rename on finalize."""

    dst: Path

    @property
    def tmp(self) -> Path: ...  # the staging directory (side files may be copied in before ``finalize``)

    def add(self, name: str, tensor: Any, *where: Any, **kw: Any) -> None: ...

    def finalize(self) -> Path: ...  # validates the key set, renames into place, returns ``dst``

    def abort(self) -> None: ...

    def __enter__(self) -> "CheckpointWriter": ...

    def __exit__(self, *exc: Any) -> bool: ...


class CheckpointFormat(Protocol):
    """One registry entry (see :mod:`formats.checkpoint.format_hf` for an example)."""

    name: str  # as the CLI spells it
    kind: str  # "hf" | "megatron": which canonical source reads it, which target writes it
    stored_as: tuple[str, ...]  # the ``.format`` values its reader reports
    per_rank_files: bool  # loadable only at the layout it was saved at
    expects: str  # what a path must look like, for the "not a checkpoint" message

    def detect(self, path: Path) -> bool: ...  # from names and headers only; may raise FormatError

    def open(self, path: Path) -> CheckpointReader: ...

    def writer(self, dst: str | os.PathLike, **options: Any) -> CheckpointWriter: ...


@dataclass(frozen=True)
class FormatSpec:
    """A :class:`CheckpointFormat` as data: a format module's ``FORMAT = FormatSpec(...)``."""

    name: str
    kind: str
    stored_as: tuple[str, ...]
    per_rank_files: bool
    expects: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], CheckpointReader]
    writer: Callable[..., CheckpointWriter]
