"""Model knowledge: families, tensor maps, TP split rules, convert/reshape, equivalence checks, the CLI."""
from formats.errors import InteropError
from interop.errors import ConversionError, VerificationError

__version__ = "0.1.0"

__all__ = ["InteropError", "ConversionError", "VerificationError", "__version__"]
