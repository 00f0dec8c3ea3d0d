"""The checkpoint formats this project reads and writes, in detection order, and the one way to open or write one.

Why a registry: a format is one module (``format_<name>.py``) whose ``FORMAT`` object says how to recognise,
open and write it; :func:`open_checkpoint` asks each registered format in turn, :func:`writer_for` finds one by
name, and callers above ``formats`` ask the format object (``kind``, ``per_rank_files``) instead of comparing
name strings. Adding a format is that module plus one line in :data:`FORMATS` (or :func:`register` at run time).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from formats.checkpoint import format_hf, format_torch, format_torch_dist
from formats.checkpoint.protocol import CheckpointFormat, CheckpointReader, CheckpointWriter
from formats.errors import FormatError


FORMATS: list[CheckpointFormat] = [format_hf.FORMAT, format_torch_dist.FORMAT, format_torch.FORMAT]  # detection order


def register(fmt: CheckpointFormat, *, first: bool = False) -> None:
    """Add a format (replacing one of the same name); ``first`` makes it win detection over the built-in ones."""
    unregister(fmt.name)
    if first:
        FORMATS.insert(0, fmt)
    else:
        FORMATS.append(fmt)


def unregister(name: str) -> None:
    FORMATS[:] = [f for f in FORMATS if f.name != name]


def format_names(kind: str | None = None) -> list[str]:
    """Registered format names (of one ``kind`` if given), in detection order: e.g. a CLI choice list."""
    return [f.name for f in FORMATS if kind is None or f.kind == kind]


def format_named(name: str) -> CheckpointFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise FormatError(f"unknown checkpoint format {name!r} (known: {', '.join(format_names())})")


def format_of(ckpt: CheckpointReader) -> CheckpointFormat:
    """The registry entry of an opened checkpoint (by its reader's ``.format``)."""
    for fmt in FORMATS:
        if ckpt.format in fmt.stored_as:
            return fmt
    raise FormatError(f"no registered format stores {ckpt.format!r}", path=ckpt.path)


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open the checkpoint at ``path`` lazily with the first registered format that recognises it."""
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or directory", path=p)
    for fmt in FORMATS:
        if fmt.detect(p):
            return fmt.open(p)
    raise FormatError("not a checkpoint: expected " + "; ".join(f.expects for f in FORMATS), path=p)


def writer_for(name: str, dst: str | os.PathLike, **options: Any) -> CheckpointWriter:
    """A streaming writer of format ``name`` into ``dst`` (``options`` as that format's writer takes them)."""
    return format_named(name).writer(dst, **options)
