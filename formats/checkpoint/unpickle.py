"""Loading Megatron's pickles (``model_optim_rng.pt``, ``common.pt``) without Megatron and without trusting them.

``torch.load(weights_only=True)`` refuses these files because they reference a few non-tensor classes
(spec §1.3). Instead of falling back to full unpickling we list the file's globals first
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and allow exactly:

* ``argparse.Namespace`` (the ``args``), ``types.SimpleNamespace``, ``collections.OrderedDict``, ``signal.Signals``
  (``args.exit_signal``), ``pathlib.PosixPath``, ``io.BytesIO`` (TE extra state), ``_codecs.encode`` and the numpy
  pieces of ``np_rng_state`` — the same non-Megatron types Megatron-Core itself registers in
  ``megatron/core/safe_globals.py``;
* classes from ``megatron.*``, ``transformer_engine.*``, ``apex.*`` (enums such as ``ModelType``/``AttnBackend``),
  which load as inert placeholders holding their constructor arguments — nothing from them is executed.

Anything else makes the load fail with a one-line error naming the file and the globals found.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

import torch

from formats.errors import FormatError

PLACEHOLDER_PREFIXES = ("megatron.", "transformer_engine.", "apex.")

_NUMPY_ALLOWED = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
}


class Placeholder:
    """Stands in for a Megatron/TE/apex class; keeps what the pickle passed so a value (e.g. an enum's) stays visible."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state = None

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):
        return self.args[0] if len(self.args) == 1 else self.args

    def __repr__(self) -> str:
        return f"<{self._qualname} {self.value!r}>"

    def __eq__(self, other):
        return isinstance(other, Placeholder) and (self._qualname, self.args) == (other._qualname, other.args)

    def __hash__(self):
        return hash((self._qualname, repr(self.args)))


@functools.lru_cache(maxsize=None)
def _placeholder(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    return type(name, (Placeholder,), {"_qualname": qualname, "__module__": module})


def _resolve(qualname: str) -> Any | None:
    """The real object for an allow-listed stdlib/numpy global, or None when it is not allowed."""
    import argparse
    import codecs
    import collections
    import pathlib
    import signal
    import types

    fixed = {
        "argparse.Namespace": argparse.Namespace,
        "types.SimpleNamespace": types.SimpleNamespace,
        "collections.OrderedDict": collections.OrderedDict,
        "signal.Signals": signal.Signals,
        "_codecs.encode": codecs.encode,
        "pathlib.PosixPath": pathlib.PosixPath,
        "_io.BytesIO": io.BytesIO,  # Transformer Engine ``_extra_state`` values (older TE)
        "io.BytesIO": io.BytesIO,
    }
    if qualname in fixed:
        return fixed[qualname]
    if qualname in _NUMPY_ALLOWED or qualname.startswith("numpy.dtypes.") and qualname.endswith("DType"):
        import importlib

        module, _, name = qualname.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    return None


def safe_globals_for(path: str | os.PathLike) -> list:
    """The allow-list entries ``torch.load(weights_only=True)`` needs for ``path``; raises on anything else."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a torch zip archive, truncated, ...
        raise FormatError(f"not a readable torch checkpoint ({type(exc).__name__}: {exc})", path=path) from None
    return _allow(found, path)


def _allow(found: list[str], path) -> list:
    allowed, refused = [], []
    for qualname in found:
        if qualname.startswith(PLACEHOLDER_PREFIXES):
            allowed.append((_placeholder(qualname), qualname))
            continue
        obj = _resolve(qualname)
        if obj is None:
            refused.append(qualname)
        else:
            allowed.append((obj, qualname) if _qualname_of(obj) != qualname else obj)
    if any(q == "numpy.dtype" for q in found):
        allowed.extend(_numpy_dtype_classes())  # unpickled dtypes are instances of numpy.dtypes.*DType
    if refused:
        raise FormatError(
            "refusing to unpickle: the file references globals outside the allow-list "
            f"({', '.join(sorted(refused))}); allowed are argparse/types namespaces, OrderedDict, signal.Signals, "
            "PosixPath, BytesIO, numpy arrays and placeholder classes for megatron/transformer_engine/apex",
            path=path,
        )
    return allowed


def _numpy_dtype_classes() -> list:
    try:
        import numpy.dtypes as npd
    except ImportError:  # numpy < 1.25
        return []
    return [getattr(npd, n) for n in dir(npd) if n.endswith("DType") and isinstance(getattr(npd, n), type)]


def _qualname_of(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def load_megatron_pickle(path: str | os.PathLike, mmap: bool = True) -> Any:
    """``torch.load`` a Megatron pickle with the allow-list above; tensors are memory-mapped (nothing is read yet)."""
    path = Path(path)
    allowed = safe_globals_for(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FormatError:
        raise
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the doc"))]
        msg = (detail or lines or [type(exc).__name__])[0]
        raise FormatError(f"cannot load torch checkpoint: {msg}", path=path) from None


def load_megatron_pickle_bytes(raw: bytes, where: str | os.PathLike) -> Any:
    """Same as :func:`load_megatron_pickle` for an in-memory ``torch.save`` blob (torch_dist bytes entries)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    except Exception as exc:
        raise FormatError(f"corrupt object blob ({type(exc).__name__})", path=where) from None
    allowed = _allow(found, where)
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
