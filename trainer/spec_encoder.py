"""Layer specs of the encoder models the trainer builds (BERT), beside the decoder one of :mod:`trainer.spec`.

Megatron-Core's ``bert_layer_local_spec`` (padding mask, local ``DotProductAttention``) with the trainer's
:class:`trainer.spec.SequenceParallelNorm` as every norm, the final one included, so sequence parallelism works
without apex/Transformer Engine. The core attention stays Megatron-Core's: ``BertModel`` decides the mask shape
from it (``[b, 1, s, s]`` for the local one), and SDPA would turn the fully masked rows of padding queries into NaN
where the local attention gives a uniform row.
"""
from __future__ import annotations

import contextlib
import dataclasses


def _block_submodules_class():
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    @dataclasses.dataclass
    class EncoderBlockSubmodules(TransformerBlockSubmodules):
        """A block spec that also answers ``.self_attention`` like a layer spec: ``BertModel`` inspects its
        ``transformer_layer_spec`` that way, and a block spec is the only way to choose the final norm."""

        layer: object = None  # the layer spec (a stage may build no layers)

        @property
        def self_attention(self):
            return self.layer.submodules.self_attention

    return EncoderBlockSubmodules


def bert_block_spec(config, vp_stage: int | None = None):
    """The BERT encoder block of this pipeline stage (see the module docstring)."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build

    from trainer.spec import SequenceParallelNorm

    layer = dataclasses.replace(bert_layer_local_spec, submodules=dataclasses.replace(
        bert_layer_local_spec.submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm))
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    submodules = _block_submodules_class()(layer_specs=[layer] * count, layer_norm=SequenceParallelNorm, layer=layer)
    return ModuleSpec(module=TransformerBlock, submodules=submodules)


def spec_for(model_config, config, vp_stage: int | None, attention: str, core_attention=None):
    """The layer/block spec the trainer builds ``model_config``'s family with (``core_attention``: the family
    provider's own core attention, e.g. ALiBi's, or None for the trainer's)."""
    from trainer.spec import block_spec

    if model_config.family == "bert":
        return bert_block_spec(config, vp_stage)
    return block_spec(config, vp_stage, attention, core_attention)


@contextlib.contextmanager
def head_norms(model_config):
    """While BERT chunks are built, their LM head's LayerNorm is :class:`trainer.spec.SequenceParallelNorm`.

    Why: ``BertLMHead`` takes its norm class from a module global chosen at import (apex's ``FusedLayerNorm``, else
    ``WrappedTorchNorm``, which refuses sequence parallelism); no spec reaches it. The head runs on this rank's
    sequence shard under SP, exactly like the layers' norms, so it needs the same norm (whose weight gradients
    Megatron-Core's ``finalize_model_grads`` all-reduces over TP)."""
    if model_config.family != "bert":
        yield
        return
    from megatron.core.models.bert import bert_lm_head

    from trainer.spec import SequenceParallelNorm

    saved = bert_lm_head.LNImpl
    bert_lm_head.LNImpl = SequenceParallelNorm
    try:
        yield
    finally:
        bert_lm_head.LNImpl = saved
