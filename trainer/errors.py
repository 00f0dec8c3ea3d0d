"""User-facing errors of the trainer layer."""
from formats.errors import InteropError


class TrainConfigError(InteropError):
    """A training or runtime configuration that cannot work (layout, batch sizes, model shape)."""
