"""Model families: one declarative file per family (``gpt2.py``, ``llama.py``) on top of :mod:`.base`.

Adding a family = one new module here that defines a :class:`~interop.families.base.Family` subclass decorated
with :func:`~interop.families.base.register`; it is discovered automatically.
"""
from interop.families.base import (
    Family,
    ModelConfig,
    TensorRule,
    families,
    family_for_hf,
    get_family,
    layer_of,
)

__all__ = ["Family", "ModelConfig", "TensorRule", "families", "family_for_hf", "get_family", "layer_of"]
