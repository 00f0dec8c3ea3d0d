"""Build the Megatron-Core GPT model chunks of this rank for a training run.

The architecture comes either from a checkpoint (through ``interop.megatron_model``, which also loads
the weights from the canonical tensor stream) or from :class:`trainer.config.ArchConfig` for random
init. Either way the layer spec is :func:`trainer.spec.block_spec` (sequence-parallel-capable norms) and
the training knobs (SP, recompute, precision, VPP) are set on the ``TransformerConfig`` here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import ArchConfig, TrainConfig

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab: int, tp: int) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of 128 * tp."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab // multiple) * multiple


def train_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig fields a training run sets on top of the architecture."""
    from megatron.core import parallel_state

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    out = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=cfg.vpp_degree if cfg.vpp_degree > 1 else None,
        sequence_parallel=cfg.sequence_parallelism,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
    )
    if cfg.recompute_activations == "selective":
        out.update(recompute_granularity="selective")
    elif cfg.recompute_activations == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def transformer_config(arch: ArchConfig, cfg: TrainConfig):
    """A ``TransformerConfig`` for random init from :class:`ArchConfig` (GPT-2 or Llama-family)."""
    from megatron.core.transformer import TransformerConfig

    llama = arch.is_llama
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_size(),
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else functools.partial(F.gelu, approximate="tanh"),
        add_bias_linear=not llama,
        init_method_std=0.02,
        **train_overrides(cfg),
    )


@dataclass
class BuiltModel:
    """This rank's model chunks (one per virtual stage), their config and the vocabulary sizes."""

    chunks: list
    config: object
    vocab_size: int
    padded_vocab_size: int
    arch: ArchConfig
    eod: int | None = None


def build_random(cfg: TrainConfig, arch: ArchConfig | None = None) -> BuiltModel:
    """Randomly initialised chunks for this rank (Megatron-Core's own init, CPU init on CPU)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from trainer.spec import block_spec

    arch = arch or cfg.arch
    config = transformer_config(arch, cfg)
    padded = padded_vocab_size(arch.vocab_size, 1)  # layout-independent: same init at every TP
    padded = -(-padded // config.tensor_model_parallel_size) * config.tensor_model_parallel_size
    chunks = []
    vpp = cfg.vpp_degree if cfg.vpp_degree > 1 else None
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, vp_stage=vp_stage),
            vocab_size=padded,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope" if arch.is_llama else "learned_absolute",
            rotary_base=int(arch.rotary_base),
            vp_stage=vp_stage,
        )
        chunks.append(model)
    return BuiltModel(chunks, config, arch.vocab_size, padded, arch)


def to_device(chunks: list) -> list:
    """Move chunks to the current GPU (Megatron-Core builds on CPU with ``use_cpu_initialization``)."""
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks
