"""A family's Megatron-Core model from a :class:`ModelConfig`, loaded from a canonical stream, run for outputs.

Used by ``--verify`` (Megatron side of a conversion, at the checkpoint's own layout), by the trainer and by
the generation engine; none of them parses checkpoint files itself. Which Megatron-Core class is built
(GPTModel, BertModel, …) and how it is called is the family's provider (:mod:`interop.families.provider`).
All functions act on the *current* rank and read the layout from Megatron-Core's parallel state (see
:func:`interop.runtime.distributed`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from interop.convert_stream import rule_for
from interop.errors import ConversionError
from interop.families.base import ModelConfig, get_family, layer_of, stack_of


def build_model(cfg: ModelConfig, *, vp_stage: int | None = None, layer_spec=None, **config_overrides: Any):
    """The family's Megatron-Core model (its provider's local spec unless ``layer_spec``) for this rank's
    pipeline stage / virtual chunk."""
    from megatron.core import parallel_state as ps

    provider = get_family(cfg.family).provider
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    cfg.check_layout(tp, pp, vpp)
    overrides = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if vpp:
        overrides["virtual_pipeline_model_parallel_size"] = vpp
    overrides.update(config_overrides)
    config = cfg.to_transformer_config(**overrides)
    if vpp is not None and vp_stage is None:
        raise ConversionError("virtual pipeline is on: pass vp_stage (or use build_chunks)")
    model = provider.build(
        cfg, config,
        vocab_size=cfg.padded_vocab_size(tp),
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        layer_spec=layer_spec or provider.default_spec(cfg),
    )
    if config.params_dtype in (torch.bfloat16, torch.float16):
        # the torch norms of the local spec ignore params_dtype; cast everything, as Megatron's Float16Module does
        model.to(config.params_dtype)
    if torch.cuda.is_available():  # built on the CPU (use_cpu_initialization); run where Megatron-LM runs it
        model.cuda(torch.cuda.current_device())
    return model


def build_chunks(cfg: ModelConfig, **kwargs: Any) -> list:
    """All model chunks of this rank: one without VPP, ``vpp`` with interleaving."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if not vpp:
        return [build_model(cfg, **kwargs)]
    return [build_model(cfg, vp_stage=v, **kwargs) for v in range(vpp)]


def build_gpt_model(cfg: ModelConfig, **kwargs: Any):
    """:func:`build_model` for a decoder family (generation, GPT training); an encoder is a one-line error."""
    get_family(cfg.family).require("generate")
    return build_model(cfg, **kwargs)


def build_gpt_chunks(cfg: ModelConfig, **kwargs: Any) -> list:
    get_family(cfg.family).require("generate")
    return build_chunks(cfg, **kwargs)


def _as_list(models) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def unwrap(model):
    """The Megatron-Core model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not (hasattr(model, "decoder") or hasattr(model, "encoder")):
        model = model.module
    return model




def canonical_targets(models) -> dict[str, list[torch.Tensor]]:
    """This rank's parameters keyed by canonical name (global layer numbers); a tied output copy on the last
    stage (PP > 1) is keyed by ``embedding.word_embeddings.weight`` like the embedding it mirrors."""
    targets: dict[str, list[torch.Tensor]] = {}
    for chunk in _as_list(models):
        chunk = unwrap(chunk)
        tied = getattr(chunk, "share_embeddings_and_output_weights", False)
        for local, param in chunk.named_parameters():
            layer, template = layer_of(local)
            if layer is not None:
                stack = stack_of(template)
                rest = local.split(".", 3)[3]
                name = f"{stack}.layers.{getattr(chunk, stack).layers[layer].layer_number - 1}.{rest}"
            elif local == "output_layer.weight" and tied:
                name = "embedding.word_embeddings.weight"
            else:
                name = local
            targets.setdefault(name, []).append(param)
    return targets


def load_canonical(models, stream: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig) -> int:
    """Copy this rank's TP shards of every tensor it owns out of ``stream``; return the number of copies.

    Tensors owned by other pipeline stages are skipped; a tensor this rank needs but the stream lacks, a
    shape mismatch, or a name the family does not know is a :class:`ConversionError`.
    """
    from megatron.core import parallel_state as ps

    family = get_family(cfg.family)
    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    targets = canonical_targets(models)
    copied = 0
    with torch.no_grad():
        for name, tensor in stream:
            rule = rule_for(family, cfg, name)
            params = targets.pop(name, None)
            if not params:
                continue
            shard = rule.split.shard(tensor, tp, rank, cfg)
            for param in params:
                if tuple(shard.shape) != tuple(param.shape):
                    raise ConversionError(
                        f"{name}: shard shape {tuple(shard.shape)} does not fit the model's {tuple(param.shape)}"
                    )
                param.copy_(shard)
                copied += 1
    if targets:
        missing = sorted(targets)
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) this model needs, e.g. {missing[0]}")
    return copied


def forward_outputs(models, batch: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The family's outputs (``{"logits": [b, s, V], …}``, fp32, true V) on the last pipeline stage; None
    elsewhere. ``batch`` holds ``tokens`` ``[b, s]`` and, for encoders, ``attention_mask`` and ``tokentype_ids``.

    Runs Megatron-Core's own forward-only pipeline schedule (one sample per micro-batch) so it works at any
    TP/PP/VPP; the TP vocabulary shards are gathered with Megatron-Core's ``gather_from_tensor_model_parallel_region``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    family = get_family(cfg.family)
    provider = family.provider
    vocab_outputs = {o.name for o in family.outputs(cfg) if o.vocab}
    models = _as_list(models)
    for m in models:
        m.eval()
    tokens = batch["tokens"]
    n, seq = tokens.shape
    device = next(models[0].parameters()).device
    positions = torch.arange(seq, device=device).unsqueeze(0)
    micro = [{"positions": positions, **{k: v[i:i + 1].to(device) for k, v in batch.items()}} for i in range(n)]
    pp = ps.get_pipeline_model_parallel_world_size()
    if len(models) > 1 and n < pp:
        raise ConversionError(f"interleaved pipeline needs a batch of at least PP={pp} samples")

    def loss_func(output, non_loss_data=False):
        named = provider.named_outputs(output)
        return {k: gather_from_tensor_model_parallel_region(v) if k in vocab_outputs else v for k, v in named.items()}

    def forward_step(data_iterator, model):
        return provider.forward(model, next(data_iterator)), loss_func

    iters: Sequence | Any = [iter(micro) for _ in models] if len(models) > 1 else iter(micro)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=models if len(models) > 1 else models[0],
            num_microbatches=n,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    result = {k: torch.cat([o[k].float() for o in out], dim=0) for k in out[0]}
    return {k: v[..., : cfg.vocab_size] if k in vocab_outputs else v for k, v in result.items()}


def forward_logits(models, tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor | None:
    """Full-vocabulary logits ``[batch, seq, V]`` (true V, fp32) of a decoder on the last stage; None elsewhere."""
    out = forward_outputs(models, {"tokens": tokens}, cfg)
    return None if out is None else out["logits"]
