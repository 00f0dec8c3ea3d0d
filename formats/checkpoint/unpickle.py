"""Loading Megatron's pickles (``model_optim_rng.pt``, ``common.pt``) without Megatron and without trusting them.

``torch.load(weights_only=True)`` refuses these files because they reference a few non-tensor classes
(docs/checkpoint-formats.md §1.3). Instead of falling back to full unpickling we list the file's globals first
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and allow exactly:

* ``argparse.Namespace`` (the ``args``), ``types.SimpleNamespace``, ``collections.OrderedDict``, ``signal.Signals``
  (``args.exit_signal``), ``pathlib.PosixPath``, ``io.BytesIO`` (TE extra state), ``_codecs.encode`` and the numpy
  pieces of ``np_rng_state`` — the same non-Megatron types Megatron-Core itself registers in
  ``megatron/core/safe_globals.py``;
* classes from ``megatron.*``, ``transformer_engine.*``, ``apex.*`` (enums such as ``ModelType``/``AttnBackend``),
  which load as inert placeholders holding their constructor arguments — nothing from them is executed. A file
  that Megatron-Core will unpickle itself (``train --load``, ``verify``) is checked with ``strict=True``: then only
  the exact class names of :data:`MEGATRON_CLASSES` pass, as Megatron-Core resolves them for real.

Every name is matched whole (torch's weights-only unpickler looks up ``module.name`` exactly, so a protocol-4
``STACK_GLOBAL`` with a dotted name never reaches an attribute). Anything else makes the load fail with a one-line
error naming the file and the refused globals.
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

# The Megatron/TE classes real checkpoints reference, exactly (Megatron-Core 0.16.1's
# ``megatron/core/safe_globals.py`` plus the enum paths of older Megatron-LM releases). Our own readers turn any
# well-formed ``megatron.*``/``transformer_engine.*``/``apex.*`` name into an inert placeholder; a file handed to
# Megatron-Core (which unpickles the real classes) may name only these.
MEGATRON_CLASSES = frozenset({
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.model.enums.AttnMaskType",
    "megatron.model.enums.AttnType",
    "megatron.model.enums.LayerType",
    "megatron.model.enums.ModelType",
    "megatron.model.enums.PositionEmbeddingType",
})

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
    """The real object for an allow-listed stdlib/numpy global (exact names only), or None when it is not allowed."""
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
    module, _, name = qualname.rpartition(".")
    if qualname in _NUMPY_ALLOWED:
        import importlib

        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    if module == "numpy.dtypes":
        return next((cls for cls in _numpy_dtype_classes() if cls.__name__ == name), None)
    return None


def _is_placeholder_name(qualname: str, strict: bool) -> bool:
    """A Megatron/TE/apex class name that loads as an inert placeholder: under ``strict`` (the file goes on to
    Megatron-Core, which resolves it for real) only the exact :data:`MEGATRON_CLASSES`."""
    if strict:
        return qualname in MEGATRON_CLASSES
    *modules, name = qualname.split(".")
    # a class (CamelCase) under lower-case module names: ``megatron.core.enums.os.system`` is no placeholder
    return (qualname.startswith(PLACEHOLDER_PREFIXES) and name.isidentifier() and name[:1].isupper()
            and all(part.isidentifier() and part == part.lower() for part in modules))


def safe_globals_for(path: str | os.PathLike, strict: bool = False) -> list:
    """The allow-list entries ``torch.load(weights_only=True)`` needs for ``path``; raises on anything else."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a torch zip archive, truncated, a pickle torch cannot scan, ...
        raise FormatError(f"not a readable torch checkpoint ({_first_line(exc)}){_globals_named(path)}",
                          path=path) from None
    return _allow(found, path, strict)


def _globals_named(source) -> str:
    """``; it names globals a, b`` for the pickle of a torch zip that torch's scanner could not list (e.g. protocol 4
    framing): found by walking the opcodes, nothing is executed. Empty when there is nothing to add."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        names, pushed, memo = [], [], {}
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
                pushed.append(None)
            elif op.name == "STACK_GLOBAL":
                if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                    names.append(f"{pushed[-2]}.{pushed[-1]}")
                pushed.append(None)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name not in ("FRAME", "PROTO", "STOP"):
                pushed.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
        try:
            from torch._weights_only_unpickler import _get_allowed_globals

            torch_allowed = set(_get_allowed_globals())
        except Exception:
            torch_allowed = set()
    except Exception:
        return ""
    refused = sorted({n for n in names if n not in torch_allowed and _resolve(n) is None
                      and not _is_placeholder_name(n, False)})
    return f"; refused global {', '.join(refused)}" if refused else ""


def _allow(found: list[str], path, strict: bool = False) -> list:
    allowed, refused = [], []
    for qualname in found:
        if _is_placeholder_name(qualname, strict):
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
            f"refused global {', '.join(sorted(refused))}: refusing to unpickle a global outside the allow-list "
            "(argparse/types namespaces, OrderedDict, signal.Signals, PosixPath, BytesIO, numpy arrays and "
            "Megatron/Transformer-Engine/apex classes as placeholders)",
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


def load_megatron_pickle(path: str | os.PathLike, mmap: bool = True, strict: bool = False) -> Any:
    """``torch.load`` a Megatron pickle with the allow-list above; tensors are memory-mapped (nothing is read yet).
    ``strict``: Megatron classes only from :data:`MEGATRON_CLASSES` (for files Megatron-Core will load itself)."""
    path = Path(path)
    return weights_only_load(path, safe_globals_for(path, strict), mmap=mmap)


def load_megatron_pickle_bytes(raw: bytes, where: str | os.PathLike, strict: bool = False) -> Any:
    """Same as :func:`load_megatron_pickle` for an in-memory ``torch.save`` blob (torch_dist bytes entries)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    except Exception as exc:
        raise FormatError(f"corrupt object blob ({type(exc).__name__}){_globals_named(raw)}", path=where) from None
    return weights_only_load(io.BytesIO(raw), _allow(found, where, strict), where=where)


def weights_only_load(source, allowed: list | None = None, mmap: bool = False, where=None,
                      problem: str = "cannot load torch checkpoint") -> Any:
    """``torch.load(weights_only=True)`` (torch's restricted unpickler) with ``allowed`` extra globals; a refused
    global or a corrupt file is a one-line :class:`FormatError` naming ``where`` (default: ``source``) and, for a
    global, its name. With ``allowed`` None the file's globals are checked against the allow-list first."""
    where = source if where is None else where
    if allowed is None:
        allowed = safe_globals_for(source) if isinstance(source, (str, os.PathLike)) else []
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                # legacy (non-zip) torch.save files cannot be memory-mapped
                return torch.load(source, map_location="cpu", weights_only=True)
    except FormatError:
        raise
    except Exception as exc:
        named = _globals_named(source)
        raise FormatError(f"{problem}: {named[2:] if named else _first_line(exc)}", path=where) from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the doc",
                                                        "In PyTorch 2.6", "(1) ", "(2) ", "WeightsUnpickler error"))]
    first = (detail or lines or [type(exc).__name__])[0]
    for ln in lines:  # torch names a refused global on a line of its own
        if ln.startswith("WeightsUnpickler error"):
            first = ln.split(":", 1)[-1].strip()
            break
    return first[:300]
