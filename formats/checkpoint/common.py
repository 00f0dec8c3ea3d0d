"""Pieces shared by every checkpoint artifact: the tensor listing entry and safe output directories.

Why a listing type: readers must answer "what is in here" without touching tensor bytes (a 100 GB
checkpoint lists in seconds), so every reader produces ``TensorInfo`` rows from headers/pickles only.
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from formats.errors import FormatError, OutputExistsError


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, described without loading it.

    ``location`` is the file (relative to the checkpoint root) holding it; ``shard`` says which part of
    a distributed checkpoint it is (``"tp0.pp1"``, ``"chunk0"``; ``None`` for unsharded files).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    location: str
    shard: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(map(int, self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "location": self.location}
        if self.shard is not None:
            out["shard"] = self.shard
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_file(path: Path, what: str) -> Path:
    """Raise a one-line ``FormatError`` when a file the checkpoint references is absent."""
    if not path.is_file():
        raise FormatError(f"missing {what}", path=path)
    return path


class StagedDir:
    """A temporary sibling of ``dst`` that becomes ``dst`` only on ``commit()``.

    Refuses an existing ``dst`` up front unless ``force`` (then it is replaced once the new one is
    complete), so a crash never leaves a half-written checkpoint under the final name.
    """

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = Path(dst)
        if self.dst.exists() and not force:
            raise OutputExistsError("output exists (use --force to overwrite)", path=self.dst)
        self.tmp = self.dst.with_name(f"{self.dst.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.done = False

    def commit(self) -> Path:
        if self.dst.exists():
            old = self.dst.with_name(f"{self.dst.name}.old-{os.getpid()}")
            self.dst.rename(old)
            self.tmp.rename(self.dst)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            self.tmp.rename(self.dst)
        self.done = True
        return self.dst

    def abort(self) -> None:
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True


@contextmanager
def staged_output(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """``with staged_output(dst) as tmp: ...`` — write into ``tmp``; renamed onto ``dst`` if the block succeeds."""
    staged = StagedDir(dst, force)
    try:
        yield staged.tmp
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def check_expected(written: dict[str, tuple[int, ...]], expected, where: str | os.PathLike) -> None:
    """Compare the written key set (and shapes, when given) with what the target model needs (trap T12).

    Megatron silently falls back to ``strict=False`` on a key mismatch, so a writer must catch it.
    ``expected`` is an iterable of names or a mapping name -> shape.
    """
    if expected is None:
        return
    exp = dict(expected) if isinstance(expected, dict) else {k: None for k in expected}
    missing = sorted(set(exp) - set(written))
    extra = sorted(set(written) - set(exp))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s) e.g. {extra[:3]}")
        raise FormatError("written key set differs from the expected one: " + "; ".join(parts), path=where)
    for name, shape in exp.items():
        if shape is not None and tuple(shape) != tuple(written[name]):
            raise FormatError(f"{name}: shape {tuple(written[name])} != expected {tuple(shape)}", path=where)
