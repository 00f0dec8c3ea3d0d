"""A layer spec that works with sequence parallelism without apex or Transformer Engine.

Megatron-Core's local spec uses ``WrappedTorchNorm``, which refuses ``sequence_parallel=True``: under SP
each TP rank normalises only its slice of the sequence, so the norm's weight/bias gradients are partial
sums that must be all-reduced over the TP group. Megatron-Core's ``finalize_model_grads`` does exactly
that for every parameter carrying ``param.sequence_parallel = True`` (TE and apex norms set it). The norm
here is plain ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` with that attribute set, so the rest of
Megatron-Core (DDP, finalize, distributed optimizer) treats it like the fused norms. Where the
``norm_kernel`` kernel is on (:mod:`trainer.kernels`) the modules are Triton subclasses of the same torch norms
(:mod:`trainer.kernels.norm`).
"""
from __future__ import annotations

import dataclasses

import torch


class SequenceParallelNorm:
    """Factory with Megatron-Core's norm signature: returns a torch LayerNorm/RMSNorm whose params are
    marked ``sequence_parallel`` when the config runs sequence parallel."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # noqa: ARG003 - Megatron-Core passes these
        zero_centered_gamma: bool = False,  # noqa: ARG003
        normalization: str | None = None,
    ):
        from trainer import kernels
        from trainer.kernels import norm

        kind = normalization or config.normalization
        if kernels.norm_kernel_on(config):
            classes = norm.TritonLayerNorm, norm.TritonRMSNorm
        else:
            classes = torch.nn.LayerNorm, torch.nn.RMSNorm
        if kind == "LayerNorm":
            module = classes[0](hidden_size, eps=eps)
        elif kind == "RMSNorm":
            module = classes[1](hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {kind!r} is not supported (LayerNorm, RMSNorm)")
        for param in module.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return module


def layer_spec(normalization: str = "LayerNorm", attention: str = "sdpa", core_attention=None):
    """Megatron-Core's local GPT layer spec with :class:`SequenceParallelNorm` as both layer norms and, unless
    ``attention == "local"``, :class:`trainer.attention.SDPAttention` as the core attention (Megatron-Core's
    local one materialises the [s, s] scores of every head). A family's own ``core_attention`` (ALiBi) wins."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from trainer.attention import SDPAttention
    from trainer.config import ATTENTION

    if attention not in ATTENTION:
        raise ValueError(f"attention backend must be one of {ATTENTION}, got {attention!r}")
    spec = get_gpt_layer_local_spec(normalization=normalization)
    submodules = dataclasses.replace(
        spec.submodules,
        input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm,
    )
    if attention == "sdpa" or core_attention is not None:
        attn = submodules.self_attention
        attn_sub = dataclasses.replace(attn.submodules, core_attention=core_attention or SDPAttention)
        submodules = dataclasses.replace(submodules, self_attention=dataclasses.replace(attn, submodules=attn_sub))
    return dataclasses.replace(spec, submodules=submodules)


def block_spec(config, vp_stage: int | None = None, attention: str = "sdpa", core_attention=None):
    """The decoder block spec for this pipeline stage: our layer spec for every layer and our norm as the
    final layer norm (Megatron-Core otherwise picks ``WrappedTorchNorm`` for it)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = layer_spec(config.normalization, attention, core_attention)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=SequenceParallelNorm),
    )
