"""A T5 run's model: Megatron-Core's ``T5Model`` with :mod:`interop.t5`'s HF-exact specs, from an HF T5 directory
or randomly initialised from the config's ``arch:`` (``family: t5``).

The weights of an HF directory come through :mod:`interop.t5.tensor_map` directly (``hf_to_megatron`` +
``load_into_model``, this rank's TP shards). A random init takes its shape from ``arch:`` in Transformers' terms
(:class:`trainer.config.ArchConfig`) and its vocabulary from the tokenizer, sentinels included, so the trained
checkpoint converts to a Transformers T5 whose config names the tokenizer's pad/EOS ids. Megatron-Core 0.16's
``T5Model`` runs at PP=1 only (see :mod:`interop.t5`); TP and DP (with the distributed optimizer) work.
"""
from __future__ import annotations

import os

from trainer.config import TrainConfig
from trainer.errors import TrainConfigError
from trainer.model import BuiltModel, train_overrides


def is_hf_t5(path: str | None) -> bool:
    """Whether ``path`` is an HF directory whose ``config.json`` names a T5/mT5 model."""
    import json

    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("model_type") in ("t5", "mt5")
    except (OSError, ValueError, AttributeError):
        return False


def is_t5_run(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains a T5: from an HF T5 directory, or from ``arch.family: t5`` without a checkpoint."""
    return is_hf_t5(cfg.model) or (not cfg.model and cfg.arch.family == "t5")


def megatron_t5_args(t5, layout, dtype) -> dict:
    """The ``args`` a T5 checkpoint of ours stores: the T5 family's (:mod:`interop.families.t5`: Megatron-LM's
    ``pretrain_t5.py`` architecture fields plus the HF config as ``interop_hf``), so ``interop convert`` reads the
    trainer's checkpoints; the trainer adds its training fields."""
    from interop.families import get_family

    return get_family("t5").from_t5(t5).to_megatron_args(layout, dtype)


def _trained(t5):
    """``t5`` as a config that also answers ``to_megatron_args`` (what the trainer's checkpoints store)."""
    import dataclasses

    from interop.t5 import T5Config

    @dataclasses.dataclass
    class TrainedT5Config(T5Config):
        def to_megatron_args(self, layout, dtype) -> dict:
            return megatron_t5_args(self, layout, dtype)

    return TrainedT5Config(**{f.name: getattr(t5, f.name) for f in dataclasses.fields(t5)})


def t5_config_of(path: str):
    """(T5 architecture, the opened HF checkpoint) of an HF T5 directory."""
    from formats.checkpoint.hf import HFCheckpoint
    from interop.t5 import T5Config

    ckpt = HFCheckpoint.open(path)
    return _trained(T5Config.from_hf(ckpt.config, untied_lm_head="lm_head.weight" in ckpt.weight_map)), ckpt


def t5_arch_config(cfg: TrainConfig):
    """The T5 architecture of ``cfg.arch`` (random init): its fields in Transformers' terms, the vocabulary
    the tokenizer's (sentinels included) unless ``arch.vocab_size`` asks for more rows, as Transformers' T5 has
    (32,128 rows for 32,100 tokens)."""
    from interop.errors import ConversionError
    from interop.t5 import T5Config
    from trainer.data_encoders import T5SpecialTokens, t5_special_tokens

    arch = cfg.arch
    if not cfg.tokenizer:  # synthetic data: T5's own pad 0 and EOS 1
        if arch.vocab_size is None:
            raise TrainConfigError("arch.family t5 needs a tokenizer (the vocabulary, with its <extra_id_N> "
                                   "sentinels, is the tokenizer's) or arch.vocab_size")
        vocab, special = {}, T5SpecialTokens(pad=0, eos=1, sentinels=())
    else:
        vocab, special = t5_special_tokens(cfg.tokenizer)
    size = len(vocab) if arch.vocab_size is None else arch.vocab_size
    if size < len(vocab):
        raise TrainConfigError(f"arch.vocab_size {size} is smaller than the tokenizer's vocabulary ({len(vocab)} "
                               "tokens with its sentinels)", path=cfg.tokenizer)
    hf = dict(
        model_type="t5", d_model=arch.hidden_size, num_heads=arch.num_attention_heads,
        d_kv=arch.kv_channels or arch.hidden_size // arch.num_attention_heads,
        d_ff=arch.ffn_hidden_size or 4 * arch.hidden_size, num_layers=arch.num_layers,
        num_decoder_layers=arch.num_decoder_layers or arch.num_layers, vocab_size=size,
        relative_attention_num_buckets=arch.relative_attention_num_buckets,
        relative_attention_max_distance=arch.relative_attention_max_distance, layer_norm_epsilon=arch.norm_epsilon,
        feed_forward_proj=arch.feed_forward_proj, tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=special.pad, eos_token_id=special.eos, decoder_start_token_id=special.pad,
    )
    try:
        return _trained(T5Config.from_hf(hf, untied_lm_head=not arch.tie_word_embeddings))
    except ConversionError as exc:
        raise TrainConfigError(f"arch: {exc}") from None


def build_t5(cfg: TrainConfig, world_size: int | None = None) -> BuiltModel:
    """This rank's ``T5Model`` (one chunk) with the HF weights of ``cfg.model`` loaded, or randomly initialised
    (Megatron-Core's init) from ``cfg.arch``."""

    from interop.t5.spec import build_t5_model
    from interop.t5.tensor_map import hf_to_megatron, load_into_model

    if cfg.pp_degree != 1 or cfg.vpp_degree != 1:
        raise TrainConfigError("T5 trains at pp_degree 1 (Megatron-Core 0.16's T5Model has no pipeline split)")
    if cfg.sequence_parallelism:
        raise TrainConfigError("T5 training does not support sequence_parallelism (interop.t5's norms are not SP-aware)")
    t5, ckpt = t5_config_of(cfg.model) if cfg.model else (t5_arch_config(cfg), None)
    cfg.validate(world_size)
    overrides = {k: v for k, v in train_overrides(cfg).items() if k not in ("recompute_granularity",)}
    if cfg.recompute_activations != "none":
        raise TrainConfigError("T5 training does not support recompute_activations yet")
    model = build_t5_model(t5, **overrides)
    if ckpt is not None:
        state = {name: ckpt.load(name) for name in ckpt.weight_map if "embed_tokens" not in name}
        load_into_model(model, hf_to_megatron(state, t5), t5)
    bias = getattr(getattr(getattr(model, "lm_head", None), "output_layer", None), "bias", None)
    if bias is not None:  # Megatron-Core's T5 LM head has an output bias, a Transformers T5 none: keep it at zero
        bias.requires_grad_(False)
    return BuiltModel([model], model.config, t5, eod=None, side_files=list(ckpt.side_files) if ckpt else [])
