"""Model knowledge: families, tensor maps, TP split rules, convert/reshape, equivalence checks, the CLI."""
from formats.errors import InteropError
from interop.errors import ConversionError, VerificationError

__version__ = "0.1.0"

__all__ = ["InteropError", "ConversionError", "VerificationError", "__version__", "convert", "reshape", "verify"]


def __getattr__(name: str):
    """``interop.convert(...)`` / ``interop.reshape(...)`` / ``interop.verify(...)``, imported on first use (keeps
    ``import interop`` free of torch); those modules are callable and run their function of the same name."""
    if name in ("convert", "reshape", "verify"):
        import importlib

        return importlib.import_module(f"interop.{name}")
    raise AttributeError(f"module 'interop' has no attribute {name!r}")
