"""Megatron-Core layer/block specs that make ``T5Model`` an exact Transformers T5 without Transformer Engine.

Megatron-Core 0.16.1's local T5 specs (``megatron.core.models.T5.t5_spec``) miss two things (docs/checkpoint-formats.md §10.3):
the core attention refuses the relative position bias, and the block specs take the final norm from
``TENorm``, which is ``None`` without TE, so the encoder's and decoder's final norms silently vanish. These
specs are the local ones with :class:`~interop.attention.SDPACoreAttention` (it takes the relative-position bias) as every core attention and
a torch norm (``RMSNorm`` per the config, T5LayerNorm's maths) as the input, cross-attention, MLP *and final*
norms. Parameter names are those of a TE-built model where TE has its own modules (relative bias tables,
``{encoder,decoder}.final_layernorm``, ``pre_cross_attn_layernorm``), and dist-checkpoint keys map the fused
norms to TE's names (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``),
as Megatron-Core's own local specs do.
"""
from __future__ import annotations

from typing import Any

from interop.attention import SDPACoreAttention
from interop.t5.config import T5Config

# TE fuses the pre-attention / pre-MLP norms into the following linear; dist checkpoints use its names
_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _self_attention(mask_type):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention, linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp, k_layernorm=IdentityOp,
        ),
    )


def _cross_attention():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(
        module=CrossAttention,
        params={"attn_mask_type": AttnMaskType.padding},
        submodules=CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
            core_attention=SDPACoreAttention, linear_proj=RowParallelLinear,
        ),
    )


def _layer_spec(decoder: bool):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    cross = dict(pre_cross_attn_layernorm=WrappedTorchNorm, cross_attention=_cross_attention(),
                 cross_attn_bda=get_bias_dropout_add) if decoder else {}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=_self_attention(AttnMaskType.causal if decoder else AttnMaskType.padding),
            self_attn_bda=get_bias_dropout_add,
            **cross,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_TE_NORM_KEYS),
        ),
    )


def encoder_layer_spec():
    """One encoder layer: RMSNorm -> self-attention (padding mask + bidirectional bias) -> RMSNorm -> MLP."""
    return _layer_spec(decoder=False)


def decoder_layer_spec():
    """One decoder layer: causal self-attention with the causal bias, cross-attention (``linear_q`` and
    ``linear_kv``, no bias), MLP; each behind its own RMSNorm."""
    return _layer_spec(decoder=True)


def encoder_block_spec(num_layers: int):
    """The encoder stack, *with* its final norm (``encoder.final_layernorm``)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules([encoder_layer_spec()] * num_layers, layer_norm=WrappedTorchNorm)


def decoder_block_spec(num_layers: int):
    """The decoder stack, *with* its final norm (``decoder.final_layernorm``)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules([decoder_layer_spec()] * num_layers, layer_norm=WrappedTorchNorm)


def build_t5_model(cfg: T5Config, *, parallel_output: bool = True, **config_overrides: Any):
    """A ``T5Model`` with these specs for the current rank (TP from Megatron-Core's parallel state, PP = 1).

    ``config_overrides`` go to both stacks' ``TransformerConfig`` (e.g. ``params_dtype``).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.T5 import T5Model

    tp = ps.get_tensor_model_parallel_world_size()
    cfg.check_layout(tp, ps.get_pipeline_model_parallel_world_size())
    overrides = dict(tensor_model_parallel_size=tp, **config_overrides)
    model = T5Model(
        config=cfg.transformer_config(cfg.num_decoder_layers, **overrides),
        encoder_config=cfg.transformer_config(cfg.num_layers, **overrides),
        transformer_encoder_layer_spec=encoder_block_spec(cfg.num_layers),
        transformer_decoder_layer_spec=decoder_block_spec(cfg.num_decoder_layers),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_sequence_length,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="relative",
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
    )
    dtype = model.config.params_dtype
    if dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)  # torch norms and the relative bias tables ignore params_dtype
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
