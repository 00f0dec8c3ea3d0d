"""Build this rank's Megatron-Core model chunks for a training run.

The architecture is an ``interop.families.ModelConfig`` — read from a checkpoint (HF or Megatron, any
layout/format; the weights then arrive through ``interop``'s canonical stream) or made from
:class:`trainer.config.ArchConfig` for random init. The family must declare the ``train`` capability (the
loop trains decoders today; an encoder is a one-line error). ``interop.megatron_model.build_model`` builds
the family's model (its provider) with our :func:`trainer.spec.block_spec` (sequence-parallel-capable norms, SDPA core attention unless
``attention_backend == "local"``); the training knobs (SP,
recompute, precision, VPP) are ``TransformerConfig`` overrides set here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import TrainConfig


def train_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig fields a training run sets on top of the architecture."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    out = dict(
        sequence_parallel=cfg.sequence_parallelism,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        init_method_std=0.02,
        # Megatron-LM always sets this (frees pipeline outputs early). Its backward path calls the autograd
        # engine directly, not through torch.autograd.backward, which also keeps the CPU emulation's
        # TorchFunctionMode active inside backward (SP and recompute allocate "cuda" tensors there).
        deallocate_pipeline_outputs=True,
    )
    if torch.cuda.is_available():
        # bias + dropout + residual add as one kernel (Megatron-Core's torch.compile'd helper); unfused it is a
        # broadcast add, a dropout and an add over [s, b, h] twice per layer (~5 % of a 1.3B step on an H100)
        out["bias_dropout_fusion"] = True
    else:
        # gloo matches point-to-point messages per peer in posting order; batched p2p posts
        # recv_prev before recv_next, so at PP=2 (prev == next) an interleaved step swaps an activation
        # and a gradient of the same shape. Megatron-Core's unbatched path orders by rank parity.
        out["batch_p2p_comm"] = False
    if cfg.recompute_activations == "selective":
        out.update(recompute_granularity="selective")
    elif cfg.recompute_activations == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


@dataclass
class BuiltModel:
    """This rank's model chunks (one per virtual stage), their TransformerConfig and the ModelConfig."""

    chunks: list
    config: object  # megatron.core TransformerConfig (shared by the chunks)
    model_config: object  # interop.families.ModelConfig
    eod: int | None = None
    side_files: list | None = None  # tokenizer files that travel with the checkpoint

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.chunks[0].vocab_size if hasattr(self.chunks[0], "vocab_size") else self.model_config.vocab_size


def build_chunks(model_config, cfg: TrainConfig) -> BuiltModel:
    """Chunks for this rank from Megatron-Core parallel state (random init; Megatron-Core's own init)."""
    from megatron.core import parallel_state as ps

    from interop.families import get_family
    from interop.megatron_model import build_model
    from trainer.spec_encoder import head_norms, spec_for, use_trainer_bert

    family = get_family(model_config.family)
    family.require("train")
    core_attention = family.provider.core_attention()

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    from trainer import kernels

    overrides = dict(train_overrides(cfg), **kernels.config_overrides(cfg, model_config))
    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if vpp:
        layout["virtual_pipeline_model_parallel_size"] = vpp
    config = model_config.to_transformer_config(**layout, **overrides)
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        with head_norms(model_config):
            chunk = build_model(model_config, vp_stage=vp_stage, layer_spec=spec_for(
                model_config, config, vp_stage, cfg.attention_backend, core_attention), **overrides)
        if model_config.family == "bert":
            use_trainer_bert(chunk, key_padding=cfg.attention_backend == "sdpa")
        chunks.append(chunk)
    kernels.install(chunks, cfg, model_config.vocab_size, tp)  # fused kernels where they apply (trainer/kernels)
    return BuiltModel(chunks, chunks[0].config, model_config)


def current_device() -> torch.device | None:
    """This rank's GPU, or None on CPU: NCCL collectives need device tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def to_device(chunks: list) -> list:
    """Move chunks to the current GPU (Megatron-Core builds on CPU with ``use_cpu_initialization``)."""
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks
