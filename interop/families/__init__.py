"""Model families: one declarative file per family (``gpt2.py``, ``llama.py``, ``bert.py``) on top of :mod:`.base`
(the declaration vocabulary) and :mod:`.provider` (how a Megatron-Core model is built and run). See
``docs/families.md``.

Adding a family = one new module here that defines a :class:`~interop.families.base.Family` subclass decorated
with :func:`~interop.families.base.register`; it is discovered automatically.
"""
from interop.families.base import (
    KINDS,
    Family,
    LayerStack,
    ModelConfig,
    Output,
    TensorRule,
    families,
    family_for_hf,
    get_family,
    layer_of,
)

__all__ = ["KINDS", "Family", "LayerStack", "ModelConfig", "Output", "TensorRule", "families", "family_for_hf",
           "get_family", "layer_of"]
