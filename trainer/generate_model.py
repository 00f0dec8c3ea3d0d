"""The model a generation engine steps: the caller's wrapper and the GPTModel inside it.

Both engines (Megatron-Core's path in :mod:`trainer.generate` and the static-shape engine in
:mod:`trainer.generate_fast`) need the same pair, so it lives here, below both: the two modules then import
in one direction only (``generate`` -> ``generate_fast`` -> this module).
"""
from __future__ import annotations

from trainer.errors import TrainConfigError


def model_and_gpt(model):
    """``(wrapper, gpt_model)``: the one model chunk (out of a one-element list) and the GPTModel under its
    DDP / Float16Module wrappers. Generation needs one chunk per rank, so virtual pipeline is refused."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise TrainConfigError("generation needs one model chunk per rank (virtual pipeline is not supported)")
        model = model[0]
    from interop.megatron_model import unwrap as gpt_model

    return model, gpt_model(model)
