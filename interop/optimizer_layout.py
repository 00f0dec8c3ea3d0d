"""Where each parameter's optimizer state lives in Megatron-Core's distributed-optimizer buffers.

Megatron-Core's DDP puts a model chunk's parameters into one contiguous grad buffer per ``(param dtype, grad
dtype)``, in **reverse registration order**, each parameter starting at a multiple of 64 elements, and cuts the
buffer into buckets (a bucket closes past ``bucket_size`` elements; a shared embedding — a tied embedding/output
weight with PP > 1 — always gets a bucket of its own); a bucket's end is padded to ``lcm(DP, 128)``. The
distributed optimizer's checkpoints store those buckets flat: ``dp_reshardable`` torch_dist keeps each bucket's
first ``numel_unpadded`` elements under one key, ``distrib_optim.pt`` concatenates them (docs/checkpoint-formats.md §6.5, §7.2).

This module replays those rules (``_ParamAndGradBuffer.__init__`` of Megatron-Core 0.16.1, line for line) from
the model's :class:`ModelConfig` alone, so a checkpoint can be decoded and encoded without building the model;
the tests check the result against Megatron-Core's own DDP buffers at several layouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from formats.layout import Layout
from interop.convert_megatron import canonical_shape, stage_of
from interop.families.base import ModelConfig, get_family, layer_of

#: registration order of a local-spec TransformerLayer's parameters (Attention registers linear_proj before
#: SelfAttention adds linear_qkv; checked against a 0.16.1 state dict)
_LAYER_ORDER = ("input_layernorm.", "self_attention.linear_proj.", "self_attention.linear_qkv.",
                "pre_mlp_layernorm.", "mlp.linear_fc1.", "mlp.linear_fc2.")
_HEAD_ORDER = ("embedding.word_embeddings.", "embedding.position_embeddings.")
_TAIL_ORDER = ("decoder.final_layernorm.", "output_layer.")
TIED_OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class ParamSlot:
    """One parameter of a model chunk: its canonical name (the tied output copy of a PP > 1 tied model is named
    ``output_layer.weight`` and carries the embedding's state), local shape and ``[start, end)`` in the buffer."""

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    bucket: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Bucket:
    start: int  # in the (padded) grad buffer
    numel_unpadded: int
    end: int  # padded end

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class ChunkLayout:
    """The grad buffer of one model chunk on one (tp, pp) rank (one dtype: dense params only)."""

    tp_rank: int
    pp_rank: int
    chunk: int
    params: list[ParamSlot] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)

    @property
    def numel_unpadded(self) -> int:
        return sum(b.numel_unpadded for b in self.buckets)

    def bucket_offset(self, slot: ParamSlot) -> int:
        """Where ``slot`` starts inside its bucket's saved (unpadded) vector."""
        return slot.start - self.buckets[slot.bucket].start

    def flat_offset(self, slot: ParamSlot) -> int:
        """Where ``slot`` starts in ``distrib_optim.pt``'s concatenation of the buckets' unpadded parts."""
        return sum(b.numel_unpadded for b in self.buckets[: slot.bucket]) + self.bucket_offset(slot)

    def gaps(self) -> list[tuple[int, int, int]]:
        """``(bucket, start, end)`` inside each bucket's unpadded vector not covered by a parameter (alignment)."""
        out = []
        for b, bucket in enumerate(self.buckets):
            cursor = 0
            for slot in (s for s in self.params if s.bucket == b):
                lo = self.bucket_offset(slot)
                if lo > cursor:
                    out.append((b, cursor, lo))
                cursor = lo + slot.numel
            if cursor < bucket.numel_unpadded:
                out.append((b, cursor, bucket.numel_unpadded))
        return out


def _order_key(local: str) -> tuple:
    """Registration position of a stage-local canonical name inside its GPTModel chunk."""
    layer, template = layer_of(local)
    is_bias = local.endswith(".bias")
    if layer is not None:
        body = template.removeprefix("decoder.layers.{i}.")
        pos = next((i for i, m in enumerate(_LAYER_ORDER) if body.startswith(m)), len(_LAYER_ORDER))
        return (1, layer, pos, is_bias)
    for group, order in ((0, _HEAD_ORDER), (2, _TAIL_ORDER)):
        pos = next((i for i, m in enumerate(order) if local.startswith(m)), None)
        if pos is not None:
            return (group, 0, pos, is_bias)
    return (3, 0, 0, is_bias)


def local_shape(name: str, cfg: ModelConfig, tp: int, tp_rank: int = 0) -> tuple[int, ...]:
    """The shape of TP rank ``tp_rank``'s shard of canonical tensor ``name`` (vocab rows padded for ``tp``)."""
    rules = get_family(cfg.family).rule_index(cfg)
    _, template = layer_of(name)
    meta = torch.empty(canonical_shape(name, cfg), device="meta")
    return tuple(rules[template].split.shard(meta, tp, tp_rank, cfg).shape)


def chunk_params(cfg: ModelConfig, layout: Layout, pp_rank: int, chunk: int) -> list[tuple[str, str, bool]]:
    """``(canonical name, stage-local name, shared_embedding)`` of one model chunk in registration order."""
    family = get_family(cfg.family)
    found = []
    for name, _ in family.canonical_names(cfg):
        p, v, local = stage_of(name, cfg, layout)
        if (p, v) == (pp_rank, chunk):
            shared = name == "embedding.word_embeddings.weight" and cfg.tie_word_embeddings and layout.pp > 1
            found.append((name, local, shared))
    last = (pp_rank, chunk) == (layout.pp - 1, layout.virtual_chunks - 1)
    if cfg.tie_word_embeddings and layout.pp > 1 and last:
        found.append((TIED_OUTPUT, TIED_OUTPUT, True))  # the last stage's copy (docs/checkpoint-formats.md §4.5)
    return sorted(found, key=lambda f: _order_key(f[1]))


def chunk_layout(cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int, chunk: int,
                 bucket_size: int | None = None, pad_for_high_nccl_busbw: bool = False) -> ChunkLayout:
    """Megatron-Core's grad-buffer layout of one model chunk with the distributed optimizer at ``layout``
    (``layout.dp`` decides the bucket-end padding). ``bucket_size=None`` is ``overlap_grad_reduce=False``."""
    divisor = math.lcm(layout.dp, 128, 2 ** 16) if pad_for_high_nccl_busbw else math.lcm(layout.dp, 128)
    if pp_rank > 0 or chunk > 0:
        bucket_size = None  # DDP turns bucketing off there (disable_bucketing / pp_rank > 0)
    out = ChunkLayout(tp_rank, pp_rank, chunk)
    bucket_start = cursor = 0
    in_bucket = 0
    end = 0

    def close(param_end: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = -(-param_end // divisor) * divisor
        out.buckets.append(Bucket(bucket_start, param_end - bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for name, local, shared in reversed(chunk_params(cfg, layout, pp_rank, chunk)):
        source = "embedding.word_embeddings.weight" if name == TIED_OUTPUT else name
        shape = local_shape(source, cfg, layout.tp, tp_rank)
        cursor = -(-cursor // 64) * 64
        if shared and in_bucket:
            cursor = close(cursor)
        end = cursor + math.prod(shape)
        out.params.append(ParamSlot(name, shape, cursor, end, len(out.buckets)))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or shared:
            cursor = close(end)
        else:
            cursor = end
    if in_bucket:
        close(end)
    return out


def model_parallel_index(layout: Layout, tp_rank: int, pp_rank: int) -> int:
    """``dp_group_idx`` of the ``dp_reshardable`` keys: the rank in the TP x PP group (docs/checkpoint-formats.md §6.5)."""
    return pp_rank * layout.tp + tp_rank


def all_chunk_layouts(cfg: ModelConfig, layout: Layout, **kw) -> dict[tuple[int, int, int], ChunkLayout]:
    return {(t, p, v): chunk_layout(cfg, layout, t, p, v, **kw)
            for p in range(layout.pp) for t in range(layout.tp) for v in range(layout.virtual_chunks)}
