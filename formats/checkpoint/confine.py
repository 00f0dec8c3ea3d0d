"""Keep every path a checkpoint names inside the checkpoint.

Why: an HF index's ``weight_map``, a DCP ``_StorageInfo.relative_path`` and the files of a checkpoint directory
are data from the checkpoint's author. Followed as given, ``../x``, ``/abs/x`` or a symlink pointing elsewhere make
a conversion read (and copy into its output) any file the user can read. Each such path is resolved (symlinks
included) and must stay inside the checkpoint's own directory.

The one legitimate outside target is the Hugging Face hub cache, where ``snapshots/<rev>/`` holds symlinks into
the repository's ``blobs/``: there the confinement root is the ``models--*`` repository directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from formats.errors import FormatError


def confinement_root(directory: Path) -> Path:
    """The directory files of ``directory`` may resolve into: itself, or a hub cache snapshot's repository."""
    real = Path(directory).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def confined(directory: Path, name: str | os.PathLike, what: str, root: Path | None = None) -> Path:
    """``directory / name`` after checking that ``name`` is a relative path that, symlinks resolved, stays under
    ``root`` (default :func:`confinement_root` of ``directory``); else a one-line error naming ``what``."""
    directory = Path(directory)
    text = os.fspath(name)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise FormatError(f"{what} names an invalid path {text!r}", path=directory)
    if os.path.isabs(text) or ".." in Path(text).parts:
        raise FormatError(f"{what} names {text!r}, outside the checkpoint directory (refused)", path=directory)
    path = directory / text
    check_inside(path, what, root if root is not None else confinement_root(directory))
    return path


def check_inside(path: Path, what: str, root: Path) -> None:
    """Refuse ``path`` when it resolves (through symlinks) to a place outside ``root``."""
    real = Path(path).resolve()
    if real != root and not real.is_relative_to(root):
        raise FormatError(f"{what} resolves outside the checkpoint directory (to {real}; refused)", path=path)


def check_files_inside(directory: Path, names, root: Path) -> None:
    """:func:`check_inside` for each of ``names`` present in ``directory`` (before any of them is read)."""
    for name in names:
        if (directory / name).exists():
            check_inside(directory / name, f"file {name!r}", root)
