"""Pieces shared by every checkpoint artifact: the tensor listing entry and safe output directories.

Why a listing type: readers must answer "what is in here" without touching tensor bytes (a 100 GB
checkpoint lists in seconds), so every reader produces ``TensorInfo`` rows from headers/pickles only.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from formats import staging
from formats.checkpoint.tracker import TRACKER
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


def read_json_object(path: Path) -> dict:
    """A small JSON file that must hold an object (``config.json``, ``metadata.json``): one-line ``FormatError``
    for bad UTF-8, bad JSON or another JSON type."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"invalid JSON ({exc})", path=path) from None
    if not isinstance(value, dict):
        raise FormatError(f"{path.name} must hold a JSON object, not {type(value).__name__}", path=path)
    return value


def require_file(path: Path, what: str) -> Path:
    """Raise a one-line ``FormatError`` when a file the checkpoint references is absent."""
    if not path.is_file():
        raise FormatError(f"missing {what}", path=path)
    return path


def looks_like_checkpoint(path: Path) -> bool:
    """Whether an existing ``path`` is something ``--force`` may replace: an empty directory or a checkpoint
    directory (HF ``config.json``, a Megatron tracker, ``metadata.json``, ``iter_*``/``release``/``mp_rank_*``).
    Anything else (a file, a home directory, a project tree) is never deleted, with or without ``--force``."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = os.listdir(path)
    return not names or any(
        n in ("config.json", TRACKER, "metadata.json", "release") or n.startswith(("iter_", "mp_rank_"))
        for n in names
    )


class StagedDir:
    """A temporary sibling of ``dst`` that becomes ``dst`` only on ``commit()``.

    The rules are :mod:`formats.staging`'s: ``dst`` must not overlap ``sources``; an existing ``dst`` is
    refused unless ``force`` and it looks like an output of ours (:func:`looks_like_checkpoint`); the final
    rename never replaces a ``dst`` that appeared meanwhile unless ``force``; the temporary is removed on any
    error (and SIGTERM, through the CLI), and dead runs' temporaries of ``dst`` are swept first.
    """

    def __init__(self, dst: str | os.PathLike, force: bool = False, sources=()):
        self.dst = Path(dst)
        self.force = force
        staging.check_output_location(self.dst, sources)
        staging.check_replaceable(self.dst, force, looks_like_checkpoint)
        staging.sweep_stale(self.dst)
        self.tmp = staging.temp_name(self.dst)
        staging.remove(self.tmp)
        with staging.disk_errors(self.dst):
            self.tmp.mkdir(parents=True)
        staging.register(self.tmp, self.dst)
        self.done = False

    def commit(self) -> Path:
        try:
            with staging.disk_errors(self.dst):
                if self.force:
                    old = staging.replace_swapping(self.tmp, self.dst)
                    if old is not None:
                        staging.remove(old)
                else:
                    staging.rename_noreplace(self.tmp, self.dst)
        except FileExistsError:
            self.abort()
            raise OutputExistsError("output appeared while this run was writing it; left it untouched "
                                    "(use --force to overwrite)", path=self.dst) from None
        except BaseException:
            self.abort()
            raise
        staging.unregister(self.tmp)
        self.done = True
        return self.dst

    def abort(self) -> None:
        if not self.done:
            staging.remove(self.tmp)
            staging.unregister(self.tmp)
            self.done = True


@contextmanager
def staged_output(dst: str | os.PathLike, force: bool = False, sources=()) -> Iterator[Path]:
    """``with staged_output(dst) as tmp: ...`` — write into ``tmp``; renamed onto ``dst`` if the block succeeds."""
    staged = StagedDir(dst, force, sources)
    try:
        with staging.disk_errors(dst):
            yield staged.tmp
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def check_expected(written: dict[str, tuple[int, ...]], expected, where: str | os.PathLike) -> None:
    """Compare the written key set (and shapes, when given) with what the target model needs (docs/checkpoint-formats.md trap T12).

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
