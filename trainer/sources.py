"""Where a run's model comes from: a checkpoint (HF or Megatron, any layout/format) or random init.

Checkpoints go through ``interop`` (its readers turn any checkpoint into the canonical tensor stream and
``interop.megatron_model`` builds and fills this rank's chunks); the trainer never parses checkpoint
files itself. Random init builds from :class:`trainer.config.ArchConfig`.
"""
from __future__ import annotations

from trainer.config import TrainConfig
from trainer.model import BuiltModel, build_random


def build_model(cfg: TrainConfig, world_size: int | None = None) -> BuiltModel:
    """This rank's chunks, the TransformerConfig and vocabulary sizes; ``built.eod`` set for the data."""
    if cfg.model:
        from trainer.pretrained import build_pretrained

        built = build_pretrained(cfg, world_size)
    else:
        cfg.validate(world_size, cfg.arch)
        built = build_random(cfg)
    built.eod = _eod(cfg)
    return built


def _eod(cfg: TrainConfig) -> int | None:
    if not cfg.tokenizer:
        return None
    from trainer.data import eod_id, load_tokenizer

    return eod_id(load_tokenizer(cfg.tokenizer))
