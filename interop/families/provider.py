"""Providers: how a family's Megatron-Core model is built for this rank and run for its outputs.

A family names its provider (``Family.provider``); :mod:`interop.megatron_model` (verification, the trainer,
the generation engine) only ever calls these three methods, so a new model class (BertModel, T5Model, …) is a
new provider beside its family, not a new branch in the callers. Megatron-Core is imported lazily.
"""
from __future__ import annotations

from typing import Any

import torch


class Provider:
    """Builds one model chunk and runs one micro-batch through it."""

    #: the Megatron-Core class this provider builds (for messages and docs)
    model_class: str = ""

    def default_spec(self, cfg):
        """The layer spec used when the caller passes none (Megatron-Core's local spec for this model)."""
        raise NotImplementedError

    def core_attention(self):
        """The core attention class the model needs whatever layer spec a caller builds (the trainer's), or None
        when any ``DotProductAttention``-compatible core computes it (ALiBi models need theirs)."""
        return None

    def build(self, cfg, config, *, vocab_size: int, pre_process: bool, post_process: bool,
              vp_stage: int | None, layer_spec):
        raise NotImplementedError

    def forward(self, model, sample: dict[str, torch.Tensor]) -> Any:
        """Run ``model`` on one micro-batch; ``sample`` has ``tokens`` ``[b, s]``, ``positions``, and for
        encoders ``attention_mask`` ``[b, s]`` (1 = real token) and ``tokentype_ids``."""
        raise NotImplementedError

    @staticmethod
    def common_kwargs(cfg, config, *, vocab_size, pre_process, post_process, vp_stage, layer_spec) -> dict:
        """The constructor arguments every Megatron-Core language model (GPTModel, BertModel, …) takes."""
        return dict(config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size,
                    max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                    position_embedding_type=cfg.position_embedding_type, vp_stage=vp_stage)

    def named_outputs(self, output: Any) -> dict[str, torch.Tensor]:
        """The last stage's output as ``{output name: tensor}`` (vocabulary-sized ones still TP-sharded)."""
        return {"logits": output}


class GPTProvider(Provider):
    """Megatron-Core ``GPTModel`` (decoder-only), local spec ``get_gpt_layer_local_spec``."""

    model_class = "megatron.core.models.gpt.GPTModel"

    def default_spec(self, cfg):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization=cfg.normalization)

    def build(self, cfg, config, **where):
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            **self.common_kwargs(cfg, config, **where),
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        )

    def forward(self, model, sample):
        return model(sample["tokens"], sample["positions"], None)
