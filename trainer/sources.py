"""Where a run's model comes from: a checkpoint (HF or Megatron, any layout/format) or random init.

Checkpoints go through ``interop``: ``formats.checkpoint.open_checkpoint`` sniffs the kind, ``interop.conversion``
turns it into (``ModelConfig``, canonical tensor stream) and ``interop.megatron_model.load_canonical`` copies
this rank's shards into the freshly built chunks. The trainer never parses checkpoint files itself.
"""
from __future__ import annotations

from trainer.config import TrainConfig
from trainer.model import BuiltModel, build_chunks


def open_model_source(cfg: TrainConfig):
    """(ModelConfig, canonical stream factory, side files) for ``cfg.model``."""
    from interop.conversion import hf_source, megatron_source, open_source, tokenizer_files

    ckpt = open_source(cfg.model)
    if ckpt.kind == "hf":
        model_config, _ = hf_source(ckpt)
        return model_config, (lambda: hf_source(ckpt)[1]), tokenizer_files(ckpt)
    model_config, _ = megatron_source(ckpt)
    return model_config, (lambda: megatron_source(ckpt)[1]), tokenizer_files(ckpt)


def model_config_for(cfg: TrainConfig):
    """The architecture only (used to validate a layout before ranks are spawned)."""
    if cfg.model:
        return open_model_source(cfg)[0]
    return cfg.arch.to_model_config()


def build_model(cfg: TrainConfig, world_size: int | None = None) -> BuiltModel:
    """This rank's chunks (weights loaded when ``cfg.model`` is set) and ``built.eod`` for the data."""
    from interop.megatron_model import load_canonical

    if cfg.model:
        model_config, stream, side = open_model_source(cfg)
    else:
        model_config, stream, side = cfg.arch.to_model_config(), None, []
    cfg.validate(world_size, model_config)
    built = build_chunks(model_config, cfg)
    if stream is not None:
        load_canonical(built.chunks, stream(), model_config)
    built.side_files = side
    built.eod = _eod(cfg, side)
    return built


def _eod(cfg: TrainConfig, side_files) -> int | None:
    from interop.data.tokenizer import load_tokenizer

    path = cfg.tokenizer or next((str(p) for p in side_files or [] if str(p).endswith("tokenizer.json")), None)
    return load_tokenizer(path).eod_id if path else None
