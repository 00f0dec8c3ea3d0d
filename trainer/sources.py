"""Where a run's model comes from: a checkpoint (HF or Megatron, any layout/format) or random init.

Checkpoints go through ``interop``: ``interop.conversion.canonical_source`` opens any kind (through the format
registry of ``formats.checkpoint``) as (``ModelConfig``, canonical tensor stream, side files) and
``interop.megatron_model.load_canonical`` copies this rank's shards into the freshly built chunks. The trainer never parses checkpoint files itself.
"""
from __future__ import annotations

import os

from interop.conversion import canonical_source
from trainer.config import TrainConfig
from trainer.model import BuiltModel, build_chunks


def model_config_for(cfg: TrainConfig):
    """The architecture only (used to validate a layout before ranks are spawned); None for T5 (checked when
    built: :mod:`trainer.model_t5`)."""
    from trainer.model_t5 import is_t5_run

    if is_t5_run(cfg):
        return None
    if cfg.model:
        return canonical_source(cfg.model).config
    return cfg.arch.to_model_config()


def build_model(cfg: TrainConfig, world_size: int | None = None) -> BuiltModel:
    """This rank's chunks (weights loaded when ``cfg.model`` is set) and ``built.eod`` for the data."""
    from interop.megatron_model import load_canonical
    from trainer.model_t5 import build_t5, is_t5_run

    if is_t5_run(cfg):
        return build_t5(cfg, world_size)
    if cfg.model:
        model_config, stream, side = canonical_source(cfg.model)
    else:
        model_config, stream, side = cfg.arch.to_model_config(), None, []
    cfg.validate(world_size, model_config)
    built = build_chunks(model_config, cfg)
    if stream is not None:
        load_canonical(built.chunks, stream(), model_config)
    built.side_files = side
    built.eod = _eod(cfg, side)
    return built


def shipped_tokenizer(side_files) -> str | None:
    """The ``tokenizer.json`` among a checkpoint's side files, if one travels with it."""
    return next((str(p) for p in side_files or [] if os.path.basename(str(p)) == "tokenizer.json"), None)


def _eod(cfg: TrainConfig, side_files) -> int | None:
    from interop.data.tokenizer import load_tokenizer

    path = cfg.tokenizer or shipped_tokenizer(side_files)
    return load_tokenizer(path).eod_id if path else None
