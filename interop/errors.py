"""User-facing errors of the interop layer (families, conversion, verification)."""
from formats.errors import InteropError


class ConversionError(InteropError):
    """A checkpoint cannot be converted or reshaped as asked (unknown family, bad shapes, bad layout)."""


class VerificationError(InteropError):
    """Two checkpoints that should compute the same function do not."""


class LayoutError(InteropError):
    """A parallel layout that cannot work for this world size or model (TP/PP/DP divisibility)."""
