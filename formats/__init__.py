"""On-disk artifacts: Megatron indexed datasets, Hugging Face and Megatron checkpoints, layouts.

Depends on numpy, torch and safetensors only. Nothing here knows about model families or Megatron-Core.
"""
from formats.errors import FormatError, InteropError, OutputExistsError
from formats.layout import Layout

__all__ = ["FormatError", "InteropError", "OutputExistsError", "Layout"]
