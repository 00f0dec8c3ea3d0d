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

BERT and T5 (``pretrain_bert.py`` / ``pretrain_t5.py`` of the same tag, read and run by
``tests/test_megatron_args_mlm.py``):

* ``pretrain_bert.py`` chooses its layer spec from ``args.spec``, not ``transformer_impl``: None is the Transformer
  Engine spec, ``['local']`` ``bert_layer_local_spec``. ``load_args_from_checkpoint`` copies ``spec`` (forced), so
  a BERT checkpoint records ``spec=['local']`` (a GPT one must not: ``gpt_builder`` imports any ``spec`` as a
  module path). ``bert_binary_head`` (default True) is not copied: ``--bert-no-binary-head`` is a flag, and the
  token-type table follows it (``num_tokentypes = 2 if bert_binary_head else 0``), whatever ``num_tokentypes``
  says.
* ``pretrain_t5.py`` builds T5 from ``num_layers`` for both stacks (``validate_args`` sets ``encoder_num_layers =
  num_layers`` and refuses both flags), with relative positions only with Transformer Engine (``validate_args``
  refuses ``relative`` with ``--transformer-impl local``), so no ``--transformer-impl local`` for it;
  ``relative_attention_num_buckets``/``_max_distance`` are not copied (flags when not 32/128). Its MLP can only be
  GELU, SwiGLU, squared ReLU or quick-GEGLU: T5's ReLU and gated-GELU have no Megatron-LM argument.

What Megatron-LM cannot build from any flags is listed by :func:`megatron_lm_limits` (``interop inspect``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from formats.errors import InteropError
from formats.layout import Layout
from interop.families.base import ModelConfig
from interop.vocab import TOKENIZER_DIR

# a folder holding any of these has a loadable tokenizer (one with only generation_config.json or
# tokenizer_config.json has not: AutoTokenizer needs a vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")

# Megatron-LM 0.16.1 defaults of the fields load_args_from_checkpoint does not copy (MLM16 arguments.py and
# TransformerConfig): what a flag must change when our args differ.
MLM_DEFAULTS = {"transformer_impl": "transformer_engine", "layernorm_epsilon": 1e-5, "use_rope_scaling": False,
                "rope_scaling_factor": 8.0, "bf16": False, "fp16": False, "bert_binary_head": True,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}


def _getter(args: Any):
    return (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))


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
    # validate_args refuses add_position_embedding=False unless RoPE ("--no-position-embedding is deprecated"):
    # the position embedding is position_embedding_type's job (T5's relative positions keep the default True)
    args.update(add_position_embedding=args.get("position_embedding_type") != "rope")
    if args.get("interop_family") == "bert":  # pretrain_bert.py: the local spec iff spec == ['local'] (copied)
        args.update(spec=["local"])
    args.update(extra)
    return argparse.Namespace(**args)


def output_tokenizer_dir(dst: os.PathLike | str, side_files: Iterable[os.PathLike | str]) -> Path | None:
    """Where the tokenizer of a checkpoint written to save directory ``dst`` will be (None: no tokenizer)."""
    return Path(dst).resolve() / TOKENIZER_DIR if has_tokenizer(side_files) else None


def megatron_lm_flags(args: Any) -> list[str]:
    """Flags ``pretrain_{gpt,bert,t5}.py --load DIR --use-checkpoint-args`` (Megatron-LM 0.16.1) needs besides the
    checkpoint's args to build this model and tokenizer: exactly the recorded fields that
    ``load_args_from_checkpoint`` does not copy and whose Megatron-LM default differs."""
    get = _getter(args)
    flags: list[str] = []
    impl = get("transformer_impl")
    relative = get("position_embedding_type") == "relative"  # Megatron-LM: Transformer Engine only
    if impl and impl != MLM_DEFAULTS["transformer_impl"] and not relative:
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
    if get("bias_gelu_fusion") is False and get("add_bias_linear") and not get("swiglu"):
        flags.append("--no-bias-gelu-fusion")  # the default fuses the bias with the *tanh* GELU (trap T7)
    if get("bert_binary_head") is False:
        flags.append("--bert-no-binary-head")
    if relative:
        for name in ("relative_attention_num_buckets", "relative_attention_max_distance"):
            if get(name) is not None and int(get(name)) != MLM_DEFAULTS[name]:
                flags += ["--" + name.replace("_", "-"), str(int(get(name)))]
    return flags


def megatron_lm_limits(args: Any) -> list[str]:
    """Why ``pretrain_{gpt,bert,t5}.py`` of Megatron-LM 0.16.1 cannot build exactly this model from the
    checkpoint's args and any flags (empty: it can, with :func:`megatron_lm_flags`)."""
    get = _getter(args)
    if not get("interop_family"):
        return []  # written by Megatron-LM itself: it built it
    try:
        cfg = ModelConfig.from_megatron_args(args)
    except InteropError:  # args we cannot read: inspect says so elsewhere
        return []
    why = []
    mlp = (cfg.activation, cfg.gated_linear_unit)
    tanh_ok = cfg.add_bias_linear  # bias_gelu_fusion: the tanh GELU only exists fused with a bias
    if mlp not in {("gelu", False), ("silu", True)} and not (mlp == ("gelu_tanh", False) and tanh_ok):
        why.append(f"its MLP ({'gated ' if cfg.gated_linear_unit else ''}{cfg.activation}) has no Megatron-LM "
                   "argument (GELU, SwiGLU, squared ReLU, quick-GEGLU only)")
    if cfg.family == "bert" and cfg.num_tokentypes != (2 if cfg.add_binary_head else 0):
        why.append(f"pretrain_bert.py builds {2 if cfg.add_binary_head else 0} token types with the binary head "
                   f"{'on' if cfg.add_binary_head else 'off'}, this model has {cfg.num_tokentypes}")
    if cfg.family == "t5":
        if cfg.encoder_num_layers not in (None, cfg.num_layers):
            why.append(f"pretrain_t5.py builds both stacks with num_layers={cfg.num_layers} (encoder has "
                       f"{cfg.encoder_num_layers})")
        if get("ckpt_format") == "torch":
            why.append("the torch format holds the local spec's norm names (input_layernorm, pre_mlp_layernorm): "
                       "the Transformer-Engine T5 expects linear_qkv/linear_fc1.layer_norm_weight and would load "
                       "them non-strict, silently; write torch_dist")
    return why


def moved_tokenizer_hint(args: Any, here: os.PathLike | str) -> str | None:
    """What to pass when a checkpoint with an absolute ``tokenizer_model`` has moved to save directory
    ``here`` (None: nothing to pass)."""
    model = getattr(args, "tokenizer_model", None)
    if getattr(args, "tokenizer_type", None) != "HuggingFaceTokenizer" or not model:
        return None
    local = Path(here).resolve() / TOKENIZER_DIR
    if Path(model).is_dir() or not local.is_dir():
        return None
    return ("--no-use-tokenizer-model-from-checkpoint-args --tokenizer-type HuggingFaceTokenizer "
            f"--tokenizer-model {local}")
