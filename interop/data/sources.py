"""Where documents come from: JSONL files (one object per line, ``--json-keys``) and plain text files.

Inputs may be paths or globs; ``.gz`` is read transparently. A plain text file is one document by default
(a source file, a book), or one document per non-empty line with ``text_unit="line"``. Megatron's
preprocess_data.py reads only JSONL; the text modes spare users a conversion step.
"""
from __future__ import annotations

import glob
import gzip
import zlib
import io
import json
import os
from typing import Iterator

from formats.errors import FormatError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths and globs, in the order given, each glob sorted; an input matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FormatError("no such input file" if not glob.has_magic(pattern) else "glob matches no file",
                              path=pattern)
        files.extend(matches)
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_documents(files: list[str], keys: list[str], text_unit: str = "file") -> Iterator[tuple[list[str], int]]:
    """Yield ``(texts, nbytes)`` per document: one text per key (JSONL) or one text (plain files). A file that
    cannot be read (a corrupt or truncated ``.gz``, a directory, no permission) is a one-line ``FormatError``."""
    for path in files:
        try:
            yield from _file_documents(path, keys, text_unit)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; EOFError: truncated
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise FormatError(f"cannot read input: {reason}", path=path) from None


def _file_documents(path: str, keys: list[str], text_unit: str) -> Iterator[tuple[list[str], int]]:
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl(path, keys)
    elif text_unit == "line":
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    yield [line.rstrip("\n")] * len(keys), len(line)
    else:
        with _open_text(path) as f:
            text = f.read()
        yield [text] * len(keys), len(text)


def _jsonl(path: str, keys: list[str]) -> Iterator[tuple[list[str], int]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"line {lineno}: not JSON ({exc.msg})", path=path) from None
            try:
                texts = [obj[k] for k in keys]
            except (KeyError, TypeError):
                raise FormatError(f"line {lineno}: missing key(s) {[k for k in keys if k not in obj] if isinstance(obj, dict) else keys}",
                                  path=path) from None
            for k, t in zip(keys, texts):
                if not isinstance(t, str):
                    raise FormatError(f"line {lineno}: key {k!r} is {type(t).__name__}, expected a string", path=path)
            yield texts, len(line)
