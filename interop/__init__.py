"""Model knowledge: families, tensor maps, TP split rules, convert/reshape, equivalence checks, the CLI.

``interop.convert``, ``interop.reshape`` and ``interop.verify`` are functions (from ``interop.conversion``,
``interop.reshaping``, ``interop.verification``), imported on first use so ``import interop`` stays free of torch.
"""
from formats.errors import InteropError
from interop.errors import ConversionError, VerificationError

__version__ = "0.1.0"

__all__ = ["InteropError", "ConversionError", "VerificationError", "__version__", "convert", "reshape", "verify"]

_API = {"convert": "interop.conversion", "reshape": "interop.reshaping", "verify": "interop.verification"}


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'interop' has no attribute {name!r}")
    import importlib

    fn = getattr(importlib.import_module(module), name)
    globals()[name] = fn  # later lookups skip this hook
    return fn
