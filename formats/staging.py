"""Outputs that appear whole or not at all, and never replace what they must not.

Every writer of this project (checkpoints, indexed datasets, training checkpoints) writes into a temporary
sibling ``<name>.tmp-<pid>`` and publishes it with one rename at the end. This module holds the pieces they
share, so the rules are the same everywhere:

* **No replace without ``--force``.** The final rename is ``renameat2(RENAME_NOREPLACE)`` (Linux >= 3.15),
  so a ``DST`` that appeared while we were writing (a second run to the same place) is never replaced; where
  the call or the file system lacks it, files use ``link`` + ``unlink`` and directories an ``mkdir`` lock, both
  no-replace too. With ``--force`` an existing output is swapped out with ``RENAME_EXCHANGE`` (or two renames)
  and deleted only after the new one is in place.
* **``--force`` deletes only an output of ours.** A ``DST`` that equals, contains or lies inside a source is
  refused with or without ``--force``; an existing ``DST`` is replaced only when the caller recognises it as
  the kind of output it writes (a checkpoint, a dataset pair, an empty directory).
* **Nothing half-written stays.** Temporaries are registered while they exist; an error, Ctrl-C or SIGTERM
  (the CLI turns it into an exception) removes them, and the next run sweeps siblings named like ours whose
  PID is no longer alive (a SIGKILL or power loss cannot be cleaned up by the process itself).
* **A full disk is one line.** ``ENOSPC``/``EDQUOT``/``EROFS``/``EACCES``/``EPERM``/``EFBIG`` become an
  :class:`OutputError` naming the file (or the output being written when the OS does not say which).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from formats.errors import InteropError, OutputExistsError

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(InteropError):
    """An output cannot be written (disk full, read-only, no permission) or must not be replaced."""


# ------------------------------------------------------------------------------------------------ renames
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def _rename2(src: str | os.PathLike, dst: str | os.PathLike, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the kernel, libc or file system does not support ``flags``."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(dst))


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with ``FileExistsError`` when ``dst`` exists."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if not os.path.isdir(src):
        os.link(src, dst)  # EEXIST when dst exists: no window in which it could be replaced
        os.unlink(src)
        return
    lock = f"{os.fspath(dst)}.rename-lock"
    os.mkdir(lock)  # concurrent renamers of ours serialise here (EEXIST for the second)
    try:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
        os.rename(src, dst)
    finally:
        os.rmdir(lock)


def replace_swapping(src: str | os.PathLike, dst: str | os.PathLike) -> Path | None:
    """Put ``src`` at ``dst``; an existing ``dst`` is moved aside first and its new path returned (the caller
    deletes it once ``src`` is in place). Atomic with ``RENAME_EXCHANGE``; two renames otherwise."""
    dst = Path(dst)
    if not os.path.lexists(dst):
        try:
            rename_noreplace(src, dst)
            return None
        except FileExistsError:
            pass  # appeared meanwhile: --force replaces it too
    if _rename2(src, dst, _RENAME_EXCHANGE):
        return Path(src)  # src now holds the old output
    old = temp_name(dst, tag=OLD_TAG)
    os.rename(dst, old)
    os.rename(src, dst)
    return old


def remove(path: str | os.PathLike) -> None:
    """Remove a file or directory tree if it exists (best effort: cleanup must not mask the real error)."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ temporaries
def temp_name(path: str | os.PathLike, pid: int | None = None, tag: str = TMP_TAG) -> Path:
    """``<path>.tmp-<pid>``: the temporary sibling this process writes ``path`` through."""
    path = Path(path)
    return path.with_name(f"{path.name}{tag}{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists but not ours (or not a pid at all): leave it
    return True


def sweep_stale(path: str | os.PathLike, suffixes: Iterable[str] = ("",)) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run (SIGKILL, power loss).

    Only siblings named ``<path><suffix>.tmp-<pid>[.*]`` (or ``.old-<pid>``) whose ``pid`` is dead are
    touched. A dead run's ``.old-`` (the previous output moved aside by a ``--force`` that was killed
    between its two renames) is put back when ``path`` is missing, instead of being deleted."""
    path = Path(path)
    names = "|".join(re.escape(path.name + s) for s in suffixes)
    return sweep_matching(path.parent if str(path.parent) else Path("."), names)


def sweep_matching(directory: str | os.PathLike, base_regex: str) -> list[Path]:
    """:func:`sweep_stale` for every output in ``directory`` whose name matches ``base_regex``."""
    parent = Path(directory)
    pattern = re.compile(rf"^(?P<base>{base_regex})(?P<tag>\.tmp-|\.old-)(?P<pid>\d{{1,9}})(?:\.[\w.-]*)?$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        stale = parent / entry.name
        if m["tag"] == OLD_TAG and not os.path.lexists(parent / m["base"]):
            try:
                rename_noreplace(stale, parent / m["base"])
                continue
            except OSError:
                pass
        remove(stale)
        removed.append(stale)
    return removed


_LIVE: dict[str, str] = {}  # temporary -> final output, while it exists
_LAST_OUTPUT: list[str] = []


def register(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Record a temporary so that :func:`abort_all` (SIGTERM, fatal error) can remove it."""
    _LIVE[os.fspath(tmp)] = os.fspath(dst)
    _LAST_OUTPUT[:] = [os.fspath(dst)]


def unregister(tmp: str | os.PathLike) -> None:
    _LIVE.pop(os.fspath(tmp), None)


def abort_all() -> list[str]:
    """Remove every registered temporary of this process; returns what was removed."""
    gone = []
    for tmp in list(_LIVE):
        if os.path.lexists(tmp):
            remove(tmp)
            gone.append(tmp)
        _LIVE.pop(tmp, None)
    return gone


def last_output() -> str | None:
    """The output this process started writing last (names the file in a disk error without a file name)."""
    return _LAST_OUTPUT[0] if _LAST_OUTPUT else None


# ------------------------------------------------------------------------------------------------ checks
def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_location(dst: str | os.PathLike, sources: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that equals, contains or lies inside one of its sources (``--force`` would delete
    the source; writing inside it changes what is being read). Symlinks are resolved first."""
    out = Path(dst).resolve()
    for src in sources:
        if src is None:
            continue
        s = Path(src).resolve()
        if _within(s, out):
            what = "is" if s == out else "contains"
            raise OutputError(f"output {what} the source {os.fspath(src)}; choose another output path", path=dst)
        if _within(out, s) and Path(src).is_dir():
            raise OutputError(f"output lies inside the source {os.fspath(src)}; choose another output path",
                              path=dst)


def check_replaceable(dst: str | os.PathLike, force: bool, ours: Callable[[Path], bool]) -> None:
    """An existing ``dst``: refused without ``force``; with it, refused unless ``ours(dst)`` recognises it as
    an output of the kind being written (``--force`` never deletes anything else)."""
    dst = Path(dst)
    if not os.path.lexists(dst):
        return
    if not force:
        raise OutputExistsError("output exists (use --force to overwrite)", path=dst)
    if dst.is_symlink() or not ours(dst):
        raise OutputError("exists and is not an output of this kind; --force replaces only such outputs "
                          "(remove it yourself if it should go)", path=dst)


# ------------------------------------------------------------------------------------------------ disk errors
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^'\n\]]+)")
# what C++ writers (torch's zip writer) say when a write fails; they carry no errno
_WRITER_FAILURES = ("PytorchStreamWriter failed", "iostream error", "file write failed", "unexpected pos")


def disk_error(exc: BaseException, fallback: str | os.PathLike | None = None) -> OutputError | None:
    """The one-line error for a full/read-only/forbidden disk, or None for other exceptions.

    Looks through the exception's causes and, for wrappers that keep only text (Megatron-Core's
    ``CheckpointException`` of its writer processes), at the ``[Errno N]`` they quote."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            where = current.filename or fallback or last_output()
            return OutputError(f"cannot write: {current.strerror or os.strerror(current.errno)}", path=where)
        current = current.__cause__ or current.__context__
    if isinstance(exc, OSError):
        return None
    text = str(exc)
    for m in _ERRNO_TEXT.finditer(text):
        if int(m[1]) in DISK_ERRNOS:
            return OutputError(f"cannot write: {os.strerror(int(m[1]))}", path=fallback or last_output())
    if isinstance(exc, RuntimeError) and any(s in text for s in _WRITER_FAILURES):
        return OutputError(f"cannot write (disk full, quota or file-size limit?): {' '.join(text.split())[:120]}",
                           path=fallback or last_output())
    return None


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk error inside the block into :class:`OutputError` naming ``path`` when the OS names none."""
    try:
        yield
    except OSError as exc:
        err = disk_error(exc, path)
        if err is None:
            raise
        raise err from None
