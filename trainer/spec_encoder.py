"""Layer specs and model class of the encoder models the trainer builds (BERT), beside the decoder one of
:mod:`trainer.spec`.

Megatron-Core's ``bert_layer_local_spec`` with the trainer's :class:`trainer.spec.SequenceParallelNorm` as every
norm, the final one included, so sequence parallelism works without apex/Transformer Engine, and (unless
``attention_backend: local``) :class:`trainer.attention.SDPAttention` as the core attention: PyTorch's fused
attention kernels instead of Megatron-Core's unfused ``DotProductAttention`` (a ``[b, heads, s, s]`` score tensor,
a masked softmax and a batched GEMM per layer, all kept for the backward pass).

Why a ``BertModel`` subclass (:func:`bert_model_class`, given to a built model by :func:`use_trainer_bert`):
``BertModel`` hands its layers a padding mask whose shape it picks from the spec — ``[b, 1, s, s]`` (query *and*
key padding) for the local core, and for any other core it asks Transformer Engine's version (a ``TypeError``
without it). With the square mask, SDPA turns the fully masked rows of padding queries into NaN. The subclass hands the **key** mask
``[b, 1, 1, s]`` (Transformers' BERT mask): a padding query attends to the real keys and gives a finite value that
no loss reads, every real position is computed exactly as before, and a batch without padding passes no mask at
all (``attention_mask=None``), so SDPA can take its flash kernel. It also runs the masked-LM head only where the
step asks for it (``lm_positions``, see :class:`trainer.steps.bert.BertTrainStep`): the head's dense + GELU +
LayerNorm and the ``[tokens, vocabulary]`` output GEMM, bias, fp32 upcast and cross entropy over the 15 % of
positions that carry a loss instead of all of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools


def _block_submodules_class():
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    @dataclasses.dataclass
    class EncoderBlockSubmodules(TransformerBlockSubmodules):
        """A block spec that also answers ``.self_attention`` like a layer spec: ``BertModel`` inspects its
        ``transformer_layer_spec`` that way, and a block spec is the only way to choose the final norm.
        ``seen_by_bert``: the attention spec ``BertModel``'s mask check is shown instead of the layer's (the local
        one, so it picks ``[b, 1, s, s]`` without probing Transformer Engine; :func:`use_trainer_bert` then
        switches the built model to the key mask)."""

        layer: object = None  # the layer spec (a stage may build no layers)
        seen_by_bert: object = None

        @property
        def self_attention(self):
            return self.seen_by_bert or self.layer.submodules.self_attention

    return EncoderBlockSubmodules


def bert_block_spec(config, vp_stage: int | None = None, attention: str = "sdpa"):
    """The BERT encoder block of this pipeline stage (see the module docstring)."""
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build

    from trainer.attention import SDPAttention
    from trainer.spec import SequenceParallelNorm

    submodules = dataclasses.replace(bert_layer_local_spec.submodules, input_layernorm=SequenceParallelNorm,
                                     pre_mlp_layernorm=SequenceParallelNorm)
    if attention == "sdpa":
        attn = submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SDPAttention))
        submodules = dataclasses.replace(submodules, self_attention=attn)
    layer = dataclasses.replace(bert_layer_local_spec, submodules=submodules)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    submodules = _block_submodules_class()(
        layer_specs=[layer] * count, layer_norm=SequenceParallelNorm, layer=layer,
        seen_by_bert=bert_layer_local_spec.submodules.self_attention if attention == "sdpa" else None)
    return ModuleSpec(module=TransformerBlock, submodules=submodules)


def spec_for(model_config, config, vp_stage: int | None, attention: str, core_attention=None):
    """The layer/block spec the trainer builds ``model_config``'s family with (``core_attention``: the family
    provider's own core attention, e.g. ALiBi's, or None for the trainer's)."""
    from trainer.spec import block_spec

    if model_config.family == "bert":
        return bert_block_spec(config, vp_stage, attention)
    return block_spec(config, vp_stage, attention, core_attention)


@functools.cache
def bert_model_class():
    """Megatron-Core's ``BertModel`` handing its layers the key-padding mask (or none) and running the LM head
    at chosen positions (see the module docstring); :func:`use_trainer_bert` turns a built model into one."""
    from megatron.core.models.bert.bert_model import BertModel

    class KeyPaddingBertModel(BertModel):
        """``BertModel`` with ``lm_positions`` for the masked-LM head and, with the SDPA core attention
        (``attn_mask_dimensions == "b11s"``), ``[b, 1, 1, s]`` key-padding masks or ``attention_mask=None`` for a
        batch without padding."""

        lm_positions = None

        def lm_head_input(self, head, args, kwargs):  # noqa: ARG002 - the forward pre-hook signature
            """The LM head's input ``[s, b, h]`` cut to ``[n, 1, h]`` at ``lm_positions`` (when set)."""
            if self.lm_positions is None:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return (), {"hidden_states": hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.lm_positions)
                        .unsqueeze(1)}

        def bert_extended_attention_mask(self, attention_mask):
            if attention_mask is None:  # no padding in the batch: no mask (SDPA's flash kernel)
                if self.attn_mask_dimensions != "b11s":
                    raise ValueError("attention_mask=None needs the key-padding mask (the SDPA core attention)")
                return None
            return super().bert_extended_attention_mask(attention_mask)

        def forward(self, input_ids, attention_mask, tokentype_ids=None, lm_labels=None, inference_context=None,
                    *, lm_positions=None, **kwargs):
            """``lm_positions``: flat indices into the ``[s, b]`` positions (``s·b`` order, as the hidden states
            are laid out) where the LM head runs; the logits are then ``[1, len(lm_positions), V / tp]``.
            Not with sequence parallelism (the head's input is still split over the TP ranks there)."""
            if lm_positions is not None and self.config.sequence_parallel:
                raise ValueError("lm_positions: not with sequence parallelism")
            self.lm_positions = lm_positions
            try:
                return super().forward(input_ids, attention_mask, tokentype_ids, lm_labels, inference_context,
                                       **kwargs)
            finally:
                self.lm_positions = None

    return KeyPaddingBertModel


def use_trainer_bert(model, key_padding: bool) -> None:
    """Turn a freshly built ``BertModel`` into a :func:`bert_model_class` (its methods only; the weights and
    modules stay as built): the LM head at ``lm_positions`` and, with ``key_padding`` (its layers run
    :class:`trainer.attention.SDPAttention`), the key-padding mask or none.

    Why after the build: Megatron-Core's ``BertModel.__init__`` names its own class (``super(BertModel, self)``),
    so the class cannot be swapped under the family's provider while it builds, and its mask check would probe
    Transformer Engine for any core but the local one (see ``seen_by_bert`` in :func:`bert_block_spec`)."""
    model.__class__ = bert_model_class()
    if key_padding:
        model.attn_mask_dimensions = "b11s"
    if model.post_process:
        model.lm_head.register_forward_pre_hook(model.lm_head_input, with_kwargs=True)


@contextlib.contextmanager
def head_norms(model_config):
    """While BERT chunks are built, their LM head's LayerNorm is :class:`trainer.spec.SequenceParallelNorm`.

    Why: ``BertLMHead`` takes its norm class from a module global chosen at import (apex's
    ``FusedLayerNorm``, else ``WrappedTorchNorm``, which refuses sequence parallelism); no spec reaches it. The head
    runs on this rank's sequence shard under SP, exactly like the layers' norms, so it needs the same norm (whose
    weight gradients Megatron-Core's ``finalize_model_grads`` all-reduces over TP)."""
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
