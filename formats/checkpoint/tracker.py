"""Megatron-LM's directory conventions (docs/checkpoint-formats.md §1.1): tracker file, ``iter_XXXXXXX``/``release`` and ``mp_rank_*`` names.

Kept apart from the readers so the writers produce exactly the names the readers (and Megatron) probe.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from formats import staging
from formats.errors import FormatError

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7,18})$")
MAX_ITERATION_DIGITS = 18  # an iteration count fits int64 (Megatron stores it as a tensor); a file name stays short
MAX_TRACKER_BYTES = 64  # Megatron writes the bare number; whitespace tolerated, megabytes refused unread
_DIGITS_RE = re.compile(rf"^\d{{1,{MAX_ITERATION_DIGITS}}}$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


@dataclass(frozen=True)
class Tracker:
    """The content of ``latest_checkpointed_iteration.txt``: an iteration or ``release``."""

    iteration: int
    release: bool = False

    @property
    def dirname(self) -> str:
        return iteration_dirname(self.iteration, self.release)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Tracker":
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_TRACKER_BYTES + 1)
        except OSError as exc:
            raise FormatError(f"cannot read tracker: {exc.strerror}", path=path) from None
        text = raw.decode("ascii", errors="replace").strip()
        if text == "release":
            return cls(0, True)
        if len(raw) > MAX_TRACKER_BYTES or not _DIGITS_RE.match(text):
            raise FormatError(f"tracker must hold an iteration number or 'release' (at most {MAX_ITERATION_DIGITS} "
                              f"digits), found {text[:40]!r}{'...' if len(text) > 40 else ''}", path=path)
        return cls(int(text), False)

    def write(self, directory: str | os.PathLike) -> None:
        """Write the tracker atomically (temp + rename), without a newline, as Megatron does."""
        target = Path(directory) / TRACKER
        tmp = staging.temp_name(target)  # swept after a crash like every other temporary (formats.staging)
        try:
            tmp.write_text("release" if self.release else str(self.iteration))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def iteration_dirname(iteration: int, release: bool = False) -> str:
    return "release" if release else f"iter_{iteration:07d}"


def parse_iteration_dirname(name: str) -> Tracker | None:
    if name == "release":
        return Tracker(0, True)
    m = _ITER_RE.match(name)
    return Tracker(int(m.group(1))) if m else None


def rank_dirname(tp_rank: int, pp_rank: int | None = None, ep_rank: int | None = None) -> str:
    """``mp_rank_TT[_PPP][_EEE]``; ``pp_rank``/``ep_rank`` are given only when that world size is > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_rank is not None:
        name += f"_{pp_rank:03d}"
    if ep_rank is not None:
        name += f"_{ep_rank:03d}"
    return name


def parse_rank_dirname(name: str) -> tuple[int, ...] | None:
    """The numeric fields of an ``mp_rank_*`` name (1 to 3 of them), or None; their meaning depends on args (T21)."""
    m = _RANK_RE.match(name)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)
