"""Sanity checks of model configurations read from disk, before anything is built from them.

A Hugging Face ``config.json`` or a Megatron ``args`` is input like any other: ``n_head: 0`` divided by zero,
``n_layer: 2.5`` or ``vocab_size: "lots"`` failed deep inside a family with a traceback, and
``n_layer: 1e9`` made ``convert`` enumerate a billion layers. Families declare how fields map; this module
only says whether the values can describe a model at all, and whether the model fits the tensors the
checkpoint actually stores (a config cannot ask for more parameters than the files hold).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from interop.errors import ConversionError

# HF config fields that are sizes or counts, across the families Transformers ships (absent/None is fine)
SIZE_KEYS = (
    "n_layer", "num_hidden_layers", "num_layers", "n_head", "num_attention_heads", "num_key_value_heads",
    "num_heads", "n_embd", "hidden_size", "d_model", "intermediate_size", "n_inner", "d_ff", "d_kv", "head_dim",
    "vocab_size", "n_positions", "max_position_embeddings", "n_ctx", "num_decoder_layers", "type_vocab_size",
)
# fields that must be finite positive numbers
POSITIVE_FLOAT_KEYS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "rope_theta")
# ModelConfig fields every family sets (from whichever config field it reads them)
MODEL_SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings")
MAX_SIZE = 1 << 31  # any single dimension/count above this is not a model this tool can hold


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hf_config(config: Any, path: str | os.PathLike) -> None:
    """Raise a one-line :class:`ConversionError` naming ``path`` for a value no model can have."""
    if not isinstance(config, Mapping):
        raise ConversionError(f"must hold a JSON object, found {type(config).__name__}", path=path)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConversionError(f"model_type must be a string, got {model_type!r}", path=path)
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not _is_int(value):
            raise ConversionError(f"{key} must be a whole number, got {value!r}", path=path)
        if not 1 <= value <= MAX_SIZE:
            raise ConversionError(f"{key} must be between 1 and {MAX_SIZE}, got {value}", path=path)
    for key in POSITIVE_FLOAT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConversionError(f"{key} must be a finite positive number, got {value!r}", path=path)


def hf_model_config(family, config: Mapping[str, Any], path: str | os.PathLike):
    """``family.config_from_hf(config)`` after :func:`check_hf_config`; a field the family needs but the file
    lacks (or holds in a form it cannot use) is a one-line error instead of a ``KeyError`` traceback."""
    check_hf_config(config, path)
    try:
        return family.config_from_hf(config)
    except ConversionError as exc:
        raise exc if exc.path else type(exc)(str(exc), path=path) from None
    except KeyError as exc:
        raise ConversionError(f"missing field {exc.args[0]!r} (needed for model_type "
                              f"{config.get('model_type')!r})", path=path) from None
    except (TypeError, ValueError, ZeroDivisionError, ArithmeticError) as exc:
        raise ConversionError(f"inconsistent values: {exc}", path=path) from None


def hf_config_path(ckpt) -> Path:
    """Where an HF checkpoint's ``config.json`` is (its path may be a weights file)."""
    path = Path(ckpt.path)
    return path / "config.json" if path.is_dir() else path.parent / "config.json"


def minimum_parameters(cfg) -> int:
    """A lower bound on the weights a model of ``cfg`` stores: the MLP matrices of every layer plus one
    embedding table (attention, norms, biases and a second table only add to it)."""
    mlp = 2 * cfg.hidden_size * (cfg.ffn_hidden_size or cfg.hidden_size)
    return cfg.num_layers * mlp + cfg.vocab_size * cfg.hidden_size


def check_model_size(cfg, stored_elements: int, path: str | os.PathLike) -> None:
    """Refuse a configuration that describes a model larger than the tensors on disk (``n_layer: 1e9``
    would otherwise enumerate a billion layers' tensor names before failing)."""
    for name in MODEL_SIZE_FIELDS:
        value = getattr(cfg, name, None)
        if not _is_int(value) or not 1 <= value <= MAX_SIZE:
            raise ConversionError(f"{name} must be a positive whole number, got {value!r}", path=path)
    need = minimum_parameters(cfg)
    if need > stored_elements * 1.01 + 4096:
        raise ConversionError(
            f"the configuration describes at least {need:,} parameters ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size}) but the checkpoint stores {stored_elements:,} values",
            path=path)


def checked_hf_config(ckpt):
    """The ``ModelConfig`` of an HF checkpoint, every value checked (the one place HF configs are read)."""
    from interop.families.base import family_for_hf

    path = hf_config_path(ckpt)
    check_hf_config(ckpt.config, path)
    try:
        family = family_for_hf(ckpt.config)
    except ConversionError as exc:
        raise exc if exc.path else type(exc)(str(exc), path=path) from None
    cfg = hf_model_config(family, ckpt.config, path)
    check_model_size(cfg, sum(t.numel for t in ckpt.tensors()), path)
    return cfg


def checked_megatron_config(ckpt, vocab_size: int | None = None):
    """The ``ModelConfig`` of a Megatron checkpoint from its ``args``, every value checked."""
    from interop.convert_megatron import megatron_config

    try:
        cfg = megatron_config(ckpt, vocab_size)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, ArithmeticError) as exc:
        raise ConversionError(f"args hold values no model can have: {exc}", path=ckpt.path) from None
    check_model_size(cfg, sum(t.numel for t in ckpt.tensors()), ckpt.path)
    return cfg
