"""A T5 run's model: Megatron-Core's ``T5Model`` with :mod:`interop.t5`'s HF-exact specs, from an HF T5 directory.

T5 has no family (converter integration) yet, so its weights come through :mod:`interop.t5.tensor_map` directly
(``hf_to_megatron`` + ``load_into_model``, this rank's TP shards), not through ``interop.conversion``. Megatron-Core
0.16's ``T5Model`` runs at PP=1 only (see :mod:`interop.t5`); TP and DP (with the distributed optimizer) work.
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


def megatron_t5_args(t5, layout, dtype) -> dict:
    """The architecture fields Megatron-LM's ``pretrain_t5.py`` stores in a checkpoint's ``args`` (plus the HF
    config, so the run can be read back); the trainer adds its training fields."""
    return dict(
        num_layers=t5.num_layers, encoder_num_layers=t5.num_layers, decoder_num_layers=t5.num_decoder_layers,
        hidden_size=t5.hidden_size, ffn_hidden_size=t5.ffn_hidden_size, num_attention_heads=t5.num_attention_heads,
        kv_channels=t5.kv_channels, max_position_embeddings=t5.max_sequence_length,
        position_embedding_type="relative", relative_attention_num_buckets=t5.relative_attention_num_buckets,
        relative_attention_max_distance=t5.relative_attention_max_distance, normalization="RMSNorm",
        norm_epsilon=t5.norm_epsilon, add_bias_linear=False, swiglu=False, gated_linear_unit=t5.gated,
        untie_embeddings_and_output_weights=not t5.tie_word_embeddings, vocab_size=t5.vocab_size,
        make_vocab_size_divisible_by=t5.make_vocab_size_divisible_by, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp, params_dtype=dtype, transformer_impl="local",
        interop_hf_config=t5.to_hf(),
    )


def t5_config_of(path: str):
    """(T5 architecture, the opened HF checkpoint) of an HF T5 directory. The architecture is an
    ``interop.t5.T5Config`` that also answers ``to_megatron_args`` (what the trainer's checkpoints store)."""
    import dataclasses

    from formats.checkpoint.hf import HFCheckpoint
    from interop.t5 import T5Config

    @dataclasses.dataclass
    class TrainedT5Config(T5Config):
        def to_megatron_args(self, layout, dtype) -> dict:
            return megatron_t5_args(self, layout, dtype)

    ckpt = HFCheckpoint.open(path)
    t5 = T5Config.from_hf(ckpt.config, untied_lm_head="lm_head.weight" in ckpt.weight_map)
    return TrainedT5Config(**{f.name: getattr(t5, f.name) for f in dataclasses.fields(t5)}), ckpt


def build_t5(cfg: TrainConfig, world_size: int | None = None) -> BuiltModel:
    """This rank's ``T5Model`` (one chunk) with the HF weights of ``cfg.model`` loaded."""

    from interop.t5.spec import build_t5_model
    from interop.t5.tensor_map import hf_to_megatron, load_into_model

    if cfg.pp_degree != 1 or cfg.vpp_degree != 1:
        raise TrainConfigError("T5 trains at pp_degree 1 (Megatron-Core 0.16's T5Model has no pipeline split)")
    if cfg.sequence_parallelism:
        raise TrainConfigError("T5 training does not support sequence_parallelism (interop.t5's norms are not SP-aware)")
    t5, ckpt = t5_config_of(cfg.model)
    cfg.validate(world_size)
    overrides = {k: v for k, v in train_overrides(cfg).items() if k not in ("recompute_granularity",)}
    if cfg.recompute_activations != "none":
        raise TrainConfigError("T5 training does not support recompute_activations yet")
    model = build_t5_model(t5, **overrides)
    state = {name: ckpt.load(name) for name in ckpt.weight_map if "embed_tokens" not in name}
    load_into_model(model, hf_to_megatron(state, t5), t5)
    bias = getattr(getattr(getattr(model, "lm_head", None), "output_layer", None), "bias", None)
    if bias is not None:  # Megatron-Core's T5 LM head has an output bias, a Transformers T5 none: keep it at zero
        bias.requires_grad_(False)
    return BuiltModel([model], model.config, t5, eod=None, side_files=list(ckpt.side_files))
