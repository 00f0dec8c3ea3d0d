"""Opening a checkpoint of any kind and describing it: the part of a conversion that verification needs too.

Kept apart from :mod:`interop.conversion` (which calls :mod:`interop.verification` for ``--verify``) so that
verification does not import the converter back.
"""
from __future__ import annotations

import os

import torch

from interop.families.base import ModelConfig, get_family


def open_source(path: str | os.PathLike):
    """The checkpoint at ``path`` (HF or Megatron, any format): :func:`formats.checkpoint.open_checkpoint`."""
    from formats.checkpoint import open_checkpoint

    return open_checkpoint(path)


def first_dtype(ckpt) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (its weight dtype)."""
    for info in ckpt.tensors():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


def config_of(ckpt, vocab_size: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an opened checkpoint (HF config or Megatron args)."""
    from interop.config_checks import checked_hf_config, checked_megatron_config

    return checked_hf_config(ckpt) if ckpt.kind == "hf" else checked_megatron_config(ckpt, vocab_size)


def describe(path, vocab_size: int | None = None) -> tuple[object, ModelConfig, torch.dtype]:
    """(checkpoint, ModelConfig, weight dtype) of ``path``."""
    ckpt = open_source(path)
    return ckpt, config_of(ckpt, vocab_size), first_dtype(ckpt)


def require_capability(path, capability: str) -> None:
    """Raise a one-line :class:`~interop.errors.ConversionError` naming ``path`` when its model family cannot do
    ``capability`` (e.g. ``generate`` on an encoder-only BERT)."""
    from interop.errors import ConversionError

    try:
        get_family(config_of(open_source(path)).family).require(capability)
    except ConversionError as exc:
        if exc.path is not None:
            raise
        raise ConversionError(str(exc), path=path) from None


def model_summary(ckpt) -> dict:
    """What ``interop inspect`` adds from the family layer: the family, its model kind and its heads."""
    cfg = config_of(ckpt)
    family = get_family(cfg.family)
    return {"model_family": family.name, "model_kind": family.kind, "heads": list(family.heads(cfg))}
