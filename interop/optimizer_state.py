"""Optimizer state of Megatron checkpoints as per-parameter canonical tensors, and back at any layout.

Why: Megatron-Core's own formats reshard the optimizer only across DP (``dp_reshardable``, the torch_dist
default; ``distrib_optim.pt``) unless the run opted into ``fully_reshardable`` before saving; a TP/PP change then
loses Adam's moments. Here every source format is decoded into the canonical stream's terms — for each canonical
tensor name (global layer numbers, full TP=1 shape, true vocabulary) its fp32 main ``param``, ``exp_avg`` and
``exp_avg_sq`` — one parameter at a time, TP shards merged by the family's split rules exactly like the weights;
writing cuts them again for the target layout and encodes Megatron-Core's bucket layout
(:mod:`interop.optimizer_layout`) at the target DP size. Vocabulary padding rows of the moments are zeros.

Sources: torch_dist ``dp_reshardable``, ``fully_reshardable``, ``fully_sharded_model_space``; per-rank ``torch``
with ``distrib_optim.pt``; a non-distributed optimizer's state (:mod:`interop.optimizer_local`) in per-rank
``torch`` or in torch_dist. Targets: torch_dist ``dp_reshardable`` (what Megatron-Core 0.16 and ``interop train``
load at the target layout), per-rank ``torch`` with ``distrib_optim.pt``, and per-rank ``torch`` with a
non-distributed optimizer's state. The Adam step, param-group hyper-parameters, grad scaler, LR scheduler,
iteration and RNG state travel along (RNG: rank (0, 0)'s state is given to every target rank — the others'
streams have no counterpart at another layout).

Memory: one parameter's state is in memory at a time, a vocabulary tensor read straight into its target rows
(:func:`read_param_states`' ``vocab_rows``), scratch buffers reused per pass; ``distrib_optim.pt`` is filled in
place (:class:`DistribOptimFile`). Peak: the interpreter, the weights writer's buffers and about two of the
largest fp32 tensors (BENCHMARKS.md, optimizer-state reshape).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from formats.checkpoint import optimizer_dist as od
from formats.checkpoint.megatron import release_pages
from formats.checkpoint.optimizer_torch import OPTIM_FILE, DistribOptimFile, check_distrib_optim, distrib_optim_entry
from formats.checkpoint.tracker import rank_dirname
from formats.layout import Layout
from interop.convert_megatron import (
    TorchTarget,
    canonical_shape,
    dist_key,
    dist_placements,
    extra_state_names,
    megatron_config,
    megatron_to_canonical,
    stage_of,
)
from interop import scratch
from interop.conversion import scratch_bytes
from interop.convert_stream import rule_for
from interop.errors import ConversionError
from interop.families.base import ModelConfig, VocabParallel, get_family
from interop.optimizer_local import LOCAL, LOCAL_DIST, LocalSource, check_local_spec, local_state, write_rank_optimizers
from interop.optimizer_layout import TIED_OUTPUT, ChunkLayout, all_chunk_layouts, model_parallel_index

FP32 = (torch.float32, torch.float32)
ParamState = dict[str, torch.Tensor]  # 'param' | 'exp_avg' | 'exp_avg_sq' -> full canonical tensor


@dataclass
class OptimizerMeta:
    """Everything of an optimizer checkpoint that is not per-parameter state."""

    sharding: str  # dp_reshardable | fully_reshardable | fully_sharded_model_space | distrib_optim | local…
    param_groups: list[dict]  # without 'params'; 'step' in each group (Megatron's non-TE/apex convention)
    dtypes: tuple = FP32  # (param dtype, grad dtype) of the grad buffers
    grad_scaler: dict | None = None
    scheduler: dict | None = None
    iteration: int = 0
    rng: Any = None  # the ``rng_state`` value of rank (0, 0) as the torch format stores it (a list of dicts)
    extra: dict = field(default_factory=dict)  # num_floating_point_operations_so_far, …

    @property
    def step(self) -> float | None:
        steps = {g.get("step") for g in self.param_groups if g.get("step") is not None}
        return float(next(iter(steps))) if len(steps) == 1 else None


# ------------------------------------------------------------------------------------------------------------
# reading


def source_layout(ckpt) -> Layout:
    dp = int(ckpt.arg("data_parallel_size", default=1) or 1)
    vpp = ckpt.layout.vpp if ckpt.layout.interleaved else None
    return Layout(tp=ckpt.layout.tp, pp=ckpt.layout.pp, vpp=vpp, dp=dp)


def source_bucket_size(ckpt, dp: int) -> int | None:
    """DDP's bucket size of the run that saved ``ckpt`` (None: one bucket, ``overlap_grad_reduce`` off)."""
    if not ckpt.arg("overlap_grad_reduce", default=False):
        return None
    return ckpt.arg("ddp_bucket_size", default=None) or max(40_000_000, 1_000_000 * dp)


def optimizer_meta(ckpt) -> OptimizerMeta | None:
    """What optimizer state ``ckpt`` holds (None: weights only)."""
    if ckpt.format == "torch_dist":
        keys = [t.name for t in ckpt.tensors()]
        sharding = od.sharding_type(ckpt.common, keys)
        if sharding is None:
            return None
        common = ckpt.common
        groups, scaler, dtypes = [], None, FP32
        if sharding == od.DP_RESHARDABLE and not any(k.startswith("optimizer.distributed.") for k in keys) \
                and not ckpt.arg("use_distributed_optimizer", default=True):
            # a run without the distributed optimizer: Megatron-Core's content metadata still names the
            # distributed optimizer's sharding type, the tensors are model-shaped (``optimizer.state.{kind}.<key>``)
            sharding, dtypes = LOCAL_DIST, _local_dtypes(ckpt)
            inner = common.get("optimizer") or {}
            scaler = inner.get("grad_scaler")
            inner = inner.get("optimizer", inner)
            step = (inner.get("state") or {}).get("common_step")
            groups = [{**g, **({"step": float(step)} if step is not None else {})} for g in inner.get("param_groups", [])]
        elif sharding == od.DP_RESHARDABLE:
            groups = od.first(ckpt.load_object(od.object_key(0, "optimizer")))["param_groups"]
            if od.object_key(0, "grad_scaler") in ckpt.objects():
                scaler = od.first(ckpt.load_object(od.object_key(0, "grad_scaler")))
            unpadded = od.first(ckpt.load_object(od.object_key(0, "per_bucket_numel_unpadded")))
            dtypes = tuple(next(iter(unpadded[0])))
        elif sharding in (od.FULLY_RESHARDABLE, od.MODEL_SPACE):
            inner = common.get("optimizer") or {}
            inner = inner.get("optimizer", inner)
            groups = inner.get("param_groups", [])
            scaler = (common.get("optimizer") or {}).get("grad_scaler")
        else:
            raise ConversionError(f"optimizer sharding type {sharding!r} is not supported")
        rng_keys = [k for k in ckpt.objects() if k.startswith("rng_state/")]
        rng = od.first(ckpt.load_object(sorted(rng_keys)[0])) if rng_keys else None
        extra = {k: common[k] for k in ("num_floating_point_operations_so_far",) if k in common}
        return OptimizerMeta(sharding, [dict(g) for g in groups], dtypes, scaler, common.get("opt_param_scheduler"),
                             ckpt.iteration, rng, extra)
    if not ckpt.optimizer_files:
        return _local_meta(ckpt)
    top = ckpt.rank_file(*ckpt.rank_keys()[0]).top
    opt = top.get("optimizer") or {}
    groups = (opt.get("optimizer") or {}).get("param_groups", [])
    state = check_distrib_optim(ckpt.optimizer_state(0, 0), ckpt.path / ckpt.rank_dir(0, 0) / OPTIM_FILE)
    dtypes, _ = distrib_optim_entry(state, 0, ckpt.path)
    rng = top.get("rng_state")
    extra = {k: top[k] for k in ("num_floating_point_operations_so_far",) if k in top}
    return OptimizerMeta("distrib_optim", [dict(g) for g in groups], tuple(dtypes), opt.get("grad_scaler"),
                         top.get("opt_param_scheduler"), ckpt.iteration, rng, extra)


def _local_meta(ckpt) -> OptimizerMeta | None:
    """A non-distributed optimizer's meta (:mod:`interop.optimizer_local`): its groups get the shared Adam step
    (the distributed optimizer's convention), its buffer dtypes are those the distributed optimizer would use."""
    parsed = local_state(ckpt)
    if parsed is None:
        return None
    step = parsed.step(ckpt.path)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, **({"step": float(step)} if step is not None else {})}
              for g in parsed.param_groups]
    top = ckpt.rank_file(*ckpt.rank_keys()[0]).top
    extra = {k: top[k] for k in ("num_floating_point_operations_so_far",) if k in top}
    return OptimizerMeta(LOCAL, [dict(g) for g in groups], _local_dtypes(ckpt), parsed.grad_scaler,
                         top.get("opt_param_scheduler"), ckpt.iteration, top.get("rng_state"), extra)


def _local_dtypes(ckpt) -> tuple[torch.dtype, torch.dtype]:
    """(param, grad) dtypes of the grad buffers a distributed optimizer would keep for this run's weights."""
    weight = next(iter(megatron_to_canonical(ckpt, megatron_config(ckpt))))[1].dtype
    fp32_grads = weight == torch.float32 or ckpt.arg("accumulate_allreduce_grads_in_fp32", default=True)
    return weight, torch.float32 if fp32_grads else weight


class _FlatSource:
    """Reads one parameter's state out of the source's flat per-bucket vectors (dp_reshardable / distrib_optim)."""

    def __init__(self, ckpt, cfg: ModelConfig, meta: OptimizerMeta):
        self.ckpt, self.cfg, self.meta = ckpt, cfg, meta
        self.layout = source_layout(ckpt)
        self.layouts = all_chunk_layouts(cfg, self.layout, bucket_size=source_bucket_size(ckpt, self.layout.dp))
        self._files: dict[tuple[int, int], dict] = {}
        check_local_spec(ckpt, cfg, self.layout, "distributed-optimizer state", check_names=ckpt.format == "torch")
        self._check_sizes()

    def _check_sizes(self) -> None:
        for (t, p, v), lay in self.layouts.items():
            stored = self._stored_unpadded(t, p, v)
            mine = [b.numel_unpadded for b in lay.buckets]
            if stored != mine:
                raise ConversionError(
                    f"optimizer buffer of tp={t} pp={p} chunk={v} holds buckets of {stored} elements, Megatron-Core's "
                    f"layout for this model gives {mine} (different DDP settings or model?)", path=self.ckpt.path)

    def _stored_unpadded(self, t: int, p: int, v: int) -> list[int]:
        if self.meta.sharding == od.DP_RESHARDABLE:
            m = model_parallel_index(self.layout, t, p)
            per_gbuf = od.first(self.ckpt.load_object(od.object_key(m, "per_bucket_numel_unpadded")))
            return list(per_gbuf[v][self.meta.dtypes])
        _, entry = distrib_optim_entry(self._file(t, p), v, self.ckpt.path)
        total = entry["numel_unpadded"]
        mine = [b.numel_unpadded for b in self.layouts[(t, p, v)].buckets]
        return mine if sum(mine) == total else [total]

    def _file(self, t: int, p: int) -> dict:
        if (t, p) not in self._files:
            path = self.ckpt.path / self.ckpt.rank_dir(t, p) / OPTIM_FILE
            state = self.ckpt.optimizer_state(t, p)
            if state is None:
                raise ConversionError(f"{OPTIM_FILE} is missing", path=path)
            self._files[(t, p)] = check_distrib_optim(state, path)
        return self._files[(t, p)]

    def shard(self, name: str, kind: str, t: int, p: int, v: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """TP rank ``t``'s shard of ``name``'s ``kind`` state; into ``out`` (its leading elements: a vocabulary
        shard's true rows only) where given, else into a scratch buffer (:mod:`interop.scratch`)."""
        lay: ChunkLayout = self.layouts[(t, p, v)]
        slot = next(s for s in lay.params if s.name == name)
        n = slot.numel if out is None else out.numel()
        dst = scratch.empty((n,), torch.float32) if out is None else out.view(-1)
        if self.meta.sharding == od.DP_RESHARDABLE:
            key = od.bucket_key(model_parallel_index(self.layout, t, p), v, self.meta.dtypes, slot.bucket, kind)
            lo = lay.bucket_offset(slot)
            self.ckpt.load(key, (slice(lo, lo + n),), out=dst)
        else:
            _, entry = distrib_optim_entry(self._file(t, p), v, self.ckpt.path)
            lo = lay.flat_offset(slot)
            mapped = entry[kind][lo:lo + n]
            dst.copy_(mapped)
            release_pages(mapped)  # the mapped file's pages leave this process's resident set
        return dst.view(slot.shape) if out is None else out


class LazyState(Mapping):
    """One parameter's ``{'param', 'exp_avg', 'exp_avg_sq'}``, each read when asked for and not kept: iterating
    ``items()`` holds one full tensor at a time (peak memory: a few of the largest tensors, not three sets)."""

    def __init__(self, load):
        self._load = load

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in od.STATE_KINDS:
            raise KeyError(kind)
        return self._load(kind)

    def __iter__(self):
        return iter(od.STATE_KINDS)

    def __len__(self) -> int:
        return len(od.STATE_KINDS)


def read_param_states(ckpt, cfg: ModelConfig, meta: OptimizerMeta, names: set[str] | None = None,
                      vocab_rows: int | None = None) -> Iterator[tuple[str, LazyState]]:
    """``(canonical name, {'param', 'exp_avg', 'exp_avg_sq'})`` per parameter, full fp32 shapes, true vocabulary
    rows, one tensor read at a time (:class:`LazyState`). ``names`` restricts the stream. ``vocab_rows`` (a
    target's padded vocabulary) gives vocabulary tensors that many rows instead, padded the way the target's
    shards are (:func:`_pad_vocab`), each source shard read straight into its rows: the largest tensor of a
    model then exists once, not as source shards + merge + padded copy."""
    family = get_family(cfg.family)
    flat = _FlatSource(ckpt, cfg, meta) if meta.sharding in (od.DP_RESHARDABLE, "distrib_optim") else \
        LocalSource(ckpt, cfg, source_layout(ckpt)) if meta.sharding == LOCAL else None
    if meta.sharding == od.FULLY_RESHARDABLE:
        _check_fully_reshardable(ckpt, cfg)
    present = None if flat else {i.name: i for i in ckpt.tensors()}
    if meta.sharding == LOCAL_DIST:
        check_local_spec(ckpt, cfg, source_layout(ckpt), "non-distributed optimizer state", check_names=False)

    def loader(name, rule):
        def load(kind: str) -> torch.Tensor:
            if isinstance(rule.split, VocabParallel) and vocab_rows is not None:
                return _read_vocab(ckpt, cfg, flat, name, kind, meta.sharding, present, vocab_rows)
            if flat is not None:
                p, v, _ = stage_of(name, cfg, flat.layout)
                tensor = rule.split.merge([flat.shard(name, kind, t, p, v) for t in range(flat.layout.tp)], cfg)
            else:
                tensor = _model_space(ckpt, cfg, rule, name, kind, meta.sharding, present)
            return tensor.float().contiguous()
        return load

    for name, rule in family.canonical_names(cfg):
        if names is None or name in names:
            yield name, LazyState(loader(name, rule))


def _read_vocab(ckpt, cfg: ModelConfig, flat, name: str, kind: str, sharding: str, present, rows: int
                ) -> torch.Tensor:
    """A vocabulary tensor with ``rows`` >= V rows: the true rows read in place, the rest padded."""
    shape = (max(rows, cfg.vocab_size), *canonical_shape(name, cfg)[1:])
    out = scratch.empty(shape, torch.float32)
    if flat is None:
        key = _state_key(ckpt, kind, dist_key(name)[0], sharding, present, name)
        if present[key].dtype != torch.float32:
            out[: cfg.vocab_size] = ckpt.load(key, (slice(0, cfg.vocab_size),))
        else:
            ckpt.load(key, (slice(0, cfg.vocab_size),), out=out[: cfg.vocab_size])
    else:
        p, v, _ = stage_of(name, cfg, flat.layout)
        per_shard = cfg.padded_vocab_size(flat.layout.tp) // flat.layout.tp
        for t in range(flat.layout.tp):
            lo, hi = t * per_shard, min((t + 1) * per_shard, cfg.vocab_size)
            if hi > lo:
                flat.shard(name, kind, t, p, v, out=out[lo:hi])
    return _pad_vocab(out, kind, cfg.vocab_size)


def _pad_vocab(out: torch.Tensor, kind: str, vocab: int) -> torch.Tensor:
    """Rows past the true vocabulary: zeros for the moments, the last true row for the main param (what
    :class:`VocabParallel` puts in the weights' padding rows, so the model and its fp32 copy agree)."""
    if out.shape[0] > vocab:
        if kind == "param":
            out[vocab:] = out[vocab - 1]
        else:
            out[vocab:].zero_()
    return out


def _check_fully_reshardable(ckpt, cfg: ModelConfig) -> None:
    """Refuse a ``fully_reshardable`` checkpoint whose tensors Megatron-Core 0.16.1 misplaced.

    Its save indexes the DP-gathered buffers — end-of-bucket padding dropped — with *padded* buffer offsets, so
    every parameter in a bucket that follows a padded bucket end is stored shifted by the padding (seen: a tied
    embedding at PP2xVPP2, one row off). Megatron-Core reads it back with the same offsets, but the tensors are not
    the parameters' state; decoding them needs the saving run's exact bucket layout, which we refuse to guess."""
    layout = source_layout(ckpt)
    for lay in all_chunk_layouts(cfg, layout, bucket_size=source_bucket_size(ckpt, layout.dp)).values():
        if any(b.end != b.start + b.numel_unpadded for b in lay.buckets[:-1]):
            raise ConversionError(
                "fully_reshardable optimizer state saved by Megatron-Core with padded buckets before the last one "
                f"(tp={lay.tp_rank} pp={lay.pp_rank} chunk={lay.chunk}): Megatron-Core stores those parameters' state "
                "shifted; re-save with the default dp_reshardable sharding and reshape that", path=ckpt.path)


def _state_key(ckpt, kind: str, model_key: str, sharding: str, present: dict, name: str) -> str:
    """The torch_dist key of ``name``'s ``kind`` state. A non-distributed ``FP32Optimizer`` stores no main
    params: they are the weights themselves (``Float16OptimizerWithFloat16Params`` stores ``fp32_param``)."""
    if sharding == LOCAL_DIST:
        key = od.model_space_key(kind, model_key, od.MODEL_SPACE)
        if kind == "param" and key not in present:
            key = model_key
    else:
        key = od.model_space_key(kind, model_key, sharding)
    if key not in present:
        raise ConversionError(f"torch_dist checkpoint lacks {key} (optimizer state of {name})", path=ckpt.path)
    return key


def _model_space(ckpt, cfg: ModelConfig, rule, name: str, kind: str, sharding: str, present: dict) -> torch.Tensor:
    model_key, layer = dist_key(name)
    key = _state_key(ckpt, kind, model_key, sharding, present, name)
    if layer is not None:
        return ckpt.load(key, (slice(layer, layer + 1),))[0]
    if isinstance(rule.split, VocabParallel):
        return ckpt.load(key, (slice(0, cfg.vocab_size),))
    return ckpt.load(key)


# ------------------------------------------------------------------------------------------------------------
# writing


def _target_shards(rule, tensor: torch.Tensor, kind: str, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
    """TP shards of one state tensor; vocabulary padding rows of the moments are zeros (the main param's are the
    weights' own padding rows, so the model and its fp32 copy agree). A vocabulary tensor read already padded
    for the target (``read_param_states(vocab_rows=…)``) is cut into views, no copy."""
    if isinstance(rule.split, VocabParallel):
        rows = cfg.padded_vocab_size(tp) // tp
        if tensor.shape[0] == rows * tp:
            return [tensor[r * rows:(r + 1) * rows] for r in range(tp)]
        if kind != "param":
            out = []
            for lo in range(0, rows * tp, rows):
                if lo + rows <= tensor.shape[0]:
                    out.append(tensor[lo:lo + rows])
                    continue
                real = tensor[min(lo, tensor.shape[0]):]
                shard = scratch.empty((rows, *tensor.shape[1:]), tensor.dtype)
                shard[: real.shape[0]] = real
                shard[real.shape[0]:].zero_()
                out.append(shard)
            return out
    return rule.split.split(tensor, tp, cfg)


def _target_pieces(states, cfg: ModelConfig, layout: Layout, layouts: dict[tuple[int, int, int], ChunkLayout]
                   ) -> Iterator[tuple[str, ChunkLayout, Any, torch.Tensor]]:
    """``(kind, target chunk layout, parameter slot, TP shard)`` of every target copy of every streamed state
    tensor. A tensor is released before the next kind is read, so the scratch pool's buffer is free for it —
    provided the caller drops its ``shard`` too before asking for the next piece."""
    family = get_family(cfg.family)
    for name, state in states:
        rule = rule_for(family, cfg, name)
        for kind, tensor in state.items():
            shards = _target_shards(rule, tensor, kind, layout.tp, cfg)
            for p, v, slot_name in _placements(name, cfg, layout):
                for t, shard in enumerate(shards):
                    lay = layouts[(t, p, v)]
                    yield kind, lay, next(s for s in lay.params if s.name == slot_name), shard
            del tensor, shards, shard


def _placements(name: str, cfg: ModelConfig, layout: Layout) -> list[tuple[int, int, str]]:
    """``(pp, chunk, slot name)`` of every model chunk that holds ``name``'s state (the tied output copy too)."""
    p, v, _ = stage_of(name, cfg, layout)
    out = [(p, v, name)]
    if name == "embedding.word_embeddings.weight" and cfg.tie_word_embeddings and layout.pp > 1:
        out.append((layout.pp - 1, layout.virtual_chunks - 1, TIED_OUTPUT))
    return out


def target_args(ckpt, cfg: ModelConfig, layout: Layout, fmt: str, dtype: torch.dtype, iteration: int,
                distributed: bool = True):
    """The source's args with the target's layout fields (architecture fields from ``cfg``)."""
    src = vars(ckpt.args).copy() if isinstance(ckpt.args, argparse.Namespace) else dict(ckpt.args or {})
    src.update(cfg.to_megatron_args(layout, dtype))
    src.update(data_parallel_size=layout.dp, world_size=layout.world_size, ckpt_format=fmt,
               use_distributed_optimizer=distributed, no_save_optim=None, no_save_rng=None, iteration=iteration)
    return argparse.Namespace(**src)


def _rank_objects(meta: OptimizerMeta, lay: dict[int, ChunkLayout]) -> dict[str, Any]:
    chunks = sorted(lay)
    return {
        "optimizer": {"param_groups": [dict(g) for g in meta.param_groups]},
        "per_bucket_numel": [{meta.dtypes: [b.numel for b in lay[v].buckets]} for v in chunks],
        "per_bucket_numel_unpadded": [{meta.dtypes: [b.numel_unpadded for b in lay[v].buckets]} for v in chunks],
        **({"grad_scaler": meta.grad_scaler} if meta.grad_scaler is not None else {}),
    }


def write_torch_dist(ckpt, cfg: ModelConfig, meta: OptimizerMeta, dst, layout: Layout, *, dtype: torch.dtype,
                     force: bool = False, side_files=()) -> Path:
    """Weights + ``dp_reshardable`` optimizer state + scheduler/iteration/RNG as a torch_dist iteration checkpoint
    Megatron-Core loads at ``layout`` (DP included); streams one parameter at a time."""
    args = target_args(ckpt, cfg, layout, "torch_dist", dtype, meta.iteration)
    states = read_param_states(ckpt, cfg, meta, vocab_rows=cfg.padded_vocab_size(layout.tp))
    return write_torch_dist_streams(megatron_to_canonical(ckpt, cfg), states, cfg, meta,
                                    dst, layout, args=args, dtype=dtype, force=force, side_files=side_files)


def write_torch_dist_streams(weights, states, cfg: ModelConfig, meta: OptimizerMeta, dst, layout: Layout, *, args,
                             dtype: torch.dtype, force: bool = False, side_files=()) -> Path:
    """:func:`write_torch_dist` from a canonical weight stream and a ``(name, ParamState)`` stream (benchmarks
    synthesize both)."""
    layouts = all_chunk_layouts(cfg, layout)
    return _write_torch_dist(weights, states, cfg, meta, dst, layout, layouts, args, dtype, force, side_files)


def _phase_pool(cfg: ModelConfig, dtype: torch.dtype, copies: int = 2):
    """Reused scratch memory (:mod:`interop.scratch`) for one pass — the weights' or the optimizer state's: a
    pool kept across both would stay full of the weights' (smaller) buffers and the state's fp32 tensors would
    come on top of it. ``copies`` of the largest tensor: 2 where a writer thread still writes one while the
    next is read (torch_dist), 1 where each is written before the next is read (``distrib_optim.pt``)."""
    return scratch.pool(scratch_bytes(cfg, dtype) // 2 * copies)


def _write_torch_dist(weights, states, cfg, meta, dst, layout, layouts, args, dtype, force, side_files) -> Path:
    from formats.checkpoint import TorchDistWriter, extra_state_keys
    from interop.conversion import copy_side_files

    common = {"optimizer": {"param_state_sharding_type": od.DP_RESHARDABLE},
              "content_metadata": {"distrib_optim_sharding_type": od.DP_RESHARDABLE},
              "opt_param_scheduler": meta.scheduler, **meta.extra}
    with TorchDistWriter(dst, iteration=meta.iteration, args=args, common=common, force=force) as writer:
        with _phase_pool(cfg, dtype):
            for name, tensor in weights:
                for key, t, gshape, offset in dist_placements(name, tensor.to(dtype), cfg, layout.tp):
                    writer.add(key, t, global_shape=gshape, offset=offset)
        for key in extra_state_keys(cfg.num_layers, "local"):
            writer.add_object(key, [None])
        with _phase_pool(cfg, torch.float32):
            for kind, lay, slot, shard in _target_pieces(states, cfg, layout, layouts):
                m = model_parallel_index(layout, lay.tp_rank, lay.pp_rank)
                writer.add(od.bucket_key(m, lay.chunk, meta.dtypes, slot.bucket, kind), shard.reshape(-1),
                           global_shape=(lay.buckets[slot.bucket].numel_unpadded,), offset=(lay.bucket_offset(slot),))
                del shard  # see _target_pieces
        for (t, p, v), lay in layouts.items():
            m = model_parallel_index(layout, t, p)
            for b, lo, hi in lay.gaps():
                for kind in od.STATE_KINDS:
                    writer.add(od.bucket_key(m, v, meta.dtypes, b, kind), torch.zeros(hi - lo),
                               global_shape=(lay.buckets[b].numel_unpadded,), offset=(lo,))
        for t in range(layout.tp):
            for p in range(layout.pp):
                m = model_parallel_index(layout, t, p)
                chunks = {v: layouts[(t, p, v)] for v in range(layout.virtual_chunks)}
                for obj, value in _rank_objects(meta, chunks).items():
                    writer.add_object(od.object_key(m, obj), [value])
                if meta.rng is not None:
                    writer.add_object(f"rng_state/shard_{p}.{t}_{layout.pp}.{layout.tp}", [meta.rng])
        copy_side_files(list(side_files), writer.tmp)
        return writer.finalize()


def write_torch(ckpt, cfg: ModelConfig, meta: OptimizerMeta, dst, layout: Layout, *, dtype: torch.dtype,
                force: bool = False, side_files=(), distributed: bool = True) -> Path:
    """Weights + ``distrib_optim.pt`` per (TP, PP) rank laid out for ``layout``'s buckets, or (``distributed``
    False) a non-distributed optimizer's state in each ``model_optim_rng.pt``. ``distrib_optim.pt`` is filled in
    place (one parameter's state in memory); the non-distributed state of one pipeline stage is held while that
    stage is filled (3 x its fp32 parameters)."""
    from formats.checkpoint import MegatronTorchWriter
    from interop.conversion import copy_side_files

    layouts = all_chunk_layouts(cfg, layout)
    args = target_args(ckpt, cfg, layout, "torch", dtype, meta.iteration, distributed)
    target = TorchTarget(cfg, layout, "mcore")
    family = get_family(cfg.family)
    extras = extra_state_names(cfg, layout, "mcore")
    expected: dict = {k: dict(v) for k, v in target.expected().items()}
    for (p, v), names in extras.items():
        for t in range(layout.tp):
            expected.setdefault((t, p, v), {}).update({n: None for n in names})
    with MegatronTorchWriter(dst, layout, iteration=meta.iteration, args=args, force=force,
                             expected=expected) as writer:
        for name, tensor in megatron_to_canonical(ckpt, cfg):
            for stored, shard, t, p, v in target.placements(name, tensor.to(dtype)):
                writer.add(stored, shard, t, p, v)
        for (p, v), names in extras.items():
            for t in range(layout.tp):
                for n in names:
                    writer.add(n, None, t, p, v)
        top = {"opt_param_scheduler": meta.scheduler, **meta.extra}
        if distributed:
            top["optimizer"] = {"optimizer": {"param_groups": [dict(g) for g in meta.param_groups]},
                                **({"grad_scaler": meta.grad_scaler} if meta.grad_scaler is not None else {})}
        if meta.rng is not None:
            top["rng_state"] = meta.rng
        for t in range(layout.tp):
            for p in range(layout.pp):
                for k, value in top.items():
                    writer.set_top(k, value, t, p)
        if not distributed:
            write_rank_optimizers(
                writer.set_top, lambda names: read_param_states(ckpt, cfg, meta, names, cfg.padded_vocab_size(layout.tp)),
                lambda name, kind, tensor: _target_shards(rule_for(family, cfg, name), tensor, kind, layout.tp, cfg),
                lambda name: _placements(name, cfg, layout), cfg, meta, layout)
        if distributed:
            _write_distrib_optim_files(writer, ckpt, cfg, meta, layout, layouts)
        copy_side_files(list(side_files), writer.tmp)
        return writer.finalize()


def _write_distrib_optim_files(writer, ckpt, cfg: ModelConfig, meta: OptimizerMeta, layout: Layout,
                               layouts: dict[tuple[int, int, int], ChunkLayout]) -> None:
    """Every rank's ``distrib_optim.pt``, filled in place as the parameters stream in (one parameter's state in
    memory, not the flat vectors: :class:`DistribOptimFile`)."""
    files = {}
    try:
        for t in range(layout.tp):
            for p in range(layout.pp):
                rank_dir = writer.tmp / writer.tracker.dirname / rank_dirname(t, p if layout.pp > 1 else None)
                files[(t, p)] = DistribOptimFile(rank_dir / OPTIM_FILE, {
                    v: (meta.dtypes, layouts[(t, p, v)].numel_unpadded) for v in range(layout.virtual_chunks)})
        with _phase_pool(cfg, torch.float32, copies=1):
            states = read_param_states(ckpt, cfg, meta, vocab_rows=cfg.padded_vocab_size(layout.tp))
            for kind, lay, slot, shard in _target_pieces(states, cfg, layout, layouts):
                files[(lay.tp_rank, lay.pp_rank)].write(lay.chunk, kind, lay.flat_offset(slot), shard)
                del shard  # see _target_pieces
    except BaseException:
        for f in files.values():
            f.release()
        raise
    for f in files.values():
        f.close()


def reshape_with_optimizer(ckpt, cfg: ModelConfig, dst, layout: Layout, fmt: str, *, dtype: torch.dtype,
                           force: bool = False, side_files=(), distributed: bool | None = None) -> Path:
    """``interop reshape``'s path when the source holds optimizer state (see module docstring). ``distributed``:
    write the state for a run with (True) or without (False) the distributed optimizer; None: as the source."""
    meta = optimizer_meta(ckpt)
    if meta is None:
        raise ConversionError("the source holds no optimizer state", path=ckpt.path)
    if distributed is None:
        distributed = meta.sharding != LOCAL
    if not distributed and fmt != "torch":
        raise ConversionError("a non-distributed optimizer's state can be written in the torch format only: "
                              "use --format torch, or --weights-only to drop it")
    if meta.step is None and meta.param_groups:
        raise ConversionError("optimizer param groups disagree on the Adam step", path=ckpt.path)
    cfg.check_layout(layout.tp, layout.pp, layout.interleaved)
    write = write_torch_dist if fmt == "torch_dist" else write_torch if fmt == "torch" else None
    if write is None:
        raise ConversionError(f"optimizer state can be written as torch_dist or torch, not {fmt!r}")
    if not distributed:
        return write_torch(ckpt, cfg, meta, dst, layout, dtype=dtype, force=force, side_files=side_files,
                           distributed=False)
    return write(ckpt, cfg, meta, dst, layout, dtype=dtype, force=force, side_files=side_files)


def describe(ckpt) -> dict | None:
    """A short summary of the optimizer state for ``interop inspect`` (None when there is none)."""
    try:
        meta = optimizer_meta(ckpt)
    except Exception as exc:  # noqa: BLE001 - inspect must still list the rest
        return {"error": str(exc).splitlines()[0]}
    if meta is None:
        return None
    group = meta.param_groups[0] if meta.param_groups else {}
    return {"sharding": meta.sharding, "step": meta.step, "param_groups": len(meta.param_groups),
            "lr": group.get("lr"), "weight_decays": sorted({g.get("weight_decay") for g in meta.param_groups}),
            "buffer_dtypes": [str(d).removeprefix("torch.") for d in meta.dtypes],
            "grad_scaler": meta.grad_scaler is not None, "scheduler": meta.scheduler is not None,
            "iteration": meta.iteration}


def has_optimizer(ckpt) -> bool:
    if ckpt.kind != "megatron":
        return False
    if ckpt.format == "torch":
        return bool(getattr(ckpt, "optimizer_files", None)) or local_state(ckpt) is not None
    return ckpt.format == "torch_dist" and bool(getattr(ckpt, "optimizer_keys", None))


def reshape_for_resume(src: str | os.PathLike, dst: str | os.PathLike, layout: Layout, fmt: str,
                       distributed: bool | None = None) -> Path:
    """Offline reshape of a training checkpoint (iteration directory or save root) for a run at ``layout``."""
    from interop.conversion import open_source, tokenizer_files
    from interop.convert_megatron import megatron_config

    ckpt = open_source(src)
    cfg = megatron_config(ckpt)
    dtype = getattr(ckpt.args, "params_dtype", torch.float32) or torch.float32
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    return reshape_with_optimizer(ckpt, cfg, dst, layout, fmt, dtype=dtype, force=True,
                                  side_files=tokenizer_files(ckpt), distributed=distributed)


def reshape_hook(ckpt, cfg: ModelConfig, src, dst, layout: Layout, fmt: str, *, dp: int | None,
                 dtype: torch.dtype | None, force: bool, side_files=()):
    """``interop reshape``'s hook: the result of a reshape that keeps the optimizer state, or None when the source
    has none (the caller then writes weights only)."""
    if not has_optimizer(ckpt) or optimizer_meta(ckpt) is None:
        if dp is not None:
            raise ConversionError("--dp applies to optimizer state, and the source holds none", path=src)
        return None
    if fmt not in ("torch", "torch_dist"):
        raise ConversionError(f"optimizer state cannot be written in the {fmt} format; use --weights-only")
    weight_dtype = next(iter(megatron_to_canonical(ckpt, cfg)))[1].dtype
    if dtype is not None and dtype != weight_dtype:
        raise ConversionError("--dtype would change the training precision of a checkpoint with optimizer state; "
                              "add --weights-only to convert the weights alone")
    from interop.conversion import ConvertResult

    target = Layout(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, dp=dp or source_layout(ckpt).dp)
    reshape_with_optimizer(ckpt, cfg, dst, target, fmt, dtype=weight_dtype, force=force, side_files=side_files)
    from interop.convert_megatron import canonical_shape

    names = [n for n, _ in get_family(cfg.family).canonical_names(cfg)]
    nbytes = sum(math.prod(canonical_shape(n, cfg)) for n in names) * weight_dtype.itemsize
    return ConvertResult(str(src), str(dst), "megatron->megatron", cfg, target, fmt, len(names), nbytes,
                         notes=[f"optimizer state ({optimizer_meta(ckpt).sharding}), scheduler, iteration and RNG "
                                f"kept at {target}"])
