"""The ``args`` we store in every Megatron checkpoint we write (convert, reshape, train), in one place.

Goal (issue 25): ``pretrain_gpt.py --load DST --use-checkpoint-args`` of Megatron-LM 0.16.1 builds the same
model and tokenizer offline. What that can take from the checkpoint is fixed by Megatron-LM's own code (MLM16
``checkpointing.load_args_from_checkpoint``): it copies the architecture fields (layers, sizes, heads, GQA,
position embedding and RoPE base, biases, SwiGLU, tying, normalization), ``padded_vocab_size`` (when the command
line has none) and — because ``use_tokenizer_model_from_checkpoint_args`` defaults to True —
``tokenizer_type`` and ``tokenizer_model`` (forced). It does **not** copy ``vocab_size``, ``layernorm_epsilon``,
``transformer_impl``, ``no_persist_layer_norm``, RoPE scaling, ``bf16``/``fp16``: those we still record (so the
checkpoint describes itself and our own readers round-trip it), and :func:`megatron_lm_flags` lists the flags a
Megatron-LM user must add for them. Conventions chosen:

* source with a tokenizer: ``tokenizer_type=HuggingFaceTokenizer`` and ``tokenizer_model`` = the **absolute**
  path of ``<dst>/tokenizer`` at write time. Megatron-LM hands the string to ``AutoTokenizer.from_pretrained``
  (MLM16 ``_HuggingFaceTokenizer``), which resolves a relative name against the working directory and then as a
  Hub id, never against the checkpoint. When the checkpoint moves, pass ``--tokenizer-model NEW/tokenizer``
  together with ``--no-use-tokenizer-model-from-checkpoint-args`` (``interop inspect`` prints it).
* source without one: ``tokenizer_type=NullTokenizer`` and ``vocab_size = V - 1`` (MLM16 ``_NullTokenizer``
  appends EOD, so its ``vocab_size`` is ``V``); ``tokenizer_model`` None. Megatron-LM's NullTokenizer asserts
  ``args.vocab_size`` and does not take it from the checkpoint, so ``--vocab-size V-1`` is one of the flags.
* the local layer spec without apex (``WrappedTorchNorm`` asserts ``not persist_layer_norm``):
  ``transformer_impl=local``, ``no_persist_layer_norm=True``, ``persist_layer_norm=False``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from formats.layout import Layout
from interop.families.base import ModelConfig
from interop.vocab import TOKENIZER_DIR

# a folder holding any of these has a loadable tokenizer (one with only generation_config.json or
# tokenizer_config.json has not: AutoTokenizer needs a vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")

# Megatron-LM 0.16.1 defaults of the fields load_args_from_checkpoint does not copy (MLM16 arguments.py and
# TransformerConfig): what a flag must change when our args differ.
MLM_DEFAULTS = {"transformer_impl": "transformer_engine", "layernorm_epsilon": 1e-5, "use_rope_scaling": False,
                "rope_scaling_factor": 8.0, "bf16": False, "fp16": False}


def has_tokenizer(files: Iterable[os.PathLike | str]) -> bool:
    return any(Path(f).name in TOKENIZER_FILES for f in files)


def tokenizer_args(cfg: ModelConfig, tokenizer_dir: os.PathLike | str | None) -> dict[str, Any]:
    """``tokenizer_type``/``tokenizer_model``/``vocab_size`` for a checkpoint whose tokenizer files live in
    ``tokenizer_dir`` (its final location; None: the source had no tokenizer)."""
    if tokenizer_dir is not None:
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(Path(tokenizer_dir).resolve()),
                "vocab_size": None}
    return {"tokenizer_type": "NullTokenizer", "tokenizer_model": None, "vocab_size": cfg.vocab_size - 1}


def checkpoint_args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, *,
                    tokenizer_dir: os.PathLike | str | None = None, **extra: Any) -> argparse.Namespace:
    """The ``args`` Namespace of a checkpoint we write: the architecture (:meth:`ModelConfig.to_megatron_args`),
    the tokenizer convention above, the flags of the local spec, then ``extra`` (format, counters, …)."""
    args = cfg.to_megatron_args(layout, dtype)
    args.update(tokenizer_args(cfg, tokenizer_dir))
    args.update(transformer_impl="local", persist_layer_norm=False, no_persist_layer_norm=True,
                use_tokenizer_model_from_checkpoint_args=True)
    args.update(extra)
    return argparse.Namespace(**args)


def output_tokenizer_dir(dst: os.PathLike | str, side_files: Iterable[os.PathLike | str]) -> Path | None:
    """Where the tokenizer of a checkpoint written to save directory ``dst`` will be (None: no tokenizer)."""
    return Path(dst).resolve() / TOKENIZER_DIR if has_tokenizer(side_files) else None


def megatron_lm_flags(args: Any) -> list[str]:
    """Flags ``pretrain_gpt.py --load DIR --use-checkpoint-args`` (Megatron-LM 0.16.1) needs besides the
    checkpoint's args to build this model and tokenizer: exactly the recorded fields that
    ``load_args_from_checkpoint`` does not copy and whose Megatron-LM default differs."""
    get = (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    flags: list[str] = []
    impl = get("transformer_impl")
    if impl and impl != MLM_DEFAULTS["transformer_impl"]:
        flags += ["--transformer-impl", str(impl)]
    if get("no_persist_layer_norm") or get("persist_layer_norm") is False:
        flags.append("--no-persist-layer-norm")
    if get("use_legacy_models"):
        flags.append("--use-legacy-models")
    if get("ckpt_format") == "torch":  # per-rank files: only loadable at the layout they were written at
        flags += ["--ckpt-format", "torch", "--use-mp-args-from-checkpoint-args"]
    eps = get("layernorm_epsilon", get("norm_epsilon"))
    if eps is not None and float(eps) != MLM_DEFAULTS["layernorm_epsilon"]:
        flags += ["--norm-epsilon", repr(float(eps))]
    if get("use_rope_scaling"):
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(get("rope_scaling_factor", 8.0)))]
    if get("bf16"):
        flags.append("--bf16")
    elif get("fp16"):
        flags.append("--fp16")
    if get("tokenizer_type") == "NullTokenizer" and get("vocab_size") is not None:
        flags += ["--vocab-size", str(int(get("vocab_size")))]
    return flags


def moved_tokenizer_hint(args: Any, here: os.PathLike | str) -> str | None:
    """What to pass when a checkpoint with an absolute ``tokenizer_model`` has moved to save directory
    ``here`` (None: nothing to pass)."""
    model = getattr(args, "tokenizer_model", None)
    if getattr(args, "tokenizer_type", None) != "HuggingFaceTokenizer" or not model:
        return None
    local = Path(here).resolve() / TOKENIZER_DIR
    if Path(model).is_dir() or not local.is_dir():
        return None
    return f"--no-use-tokenizer-model-from-checkpoint-args --tokenizer-type HuggingFaceTokenizer --tokenizer-model {local}"
