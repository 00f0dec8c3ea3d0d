"""Megatron checkpoints <-> the canonical stream: per-rank ``torch`` (Megatron-Core or legacy keys) and
``torch_dist``, at any TP/PP/VPP (even layer splits).

Reading merges the TP shards of one tensor at a time with the family's split rule; writing cuts one canonical
tensor into its TP shards and hands them to the format writers of :mod:`formats.checkpoint`. Names follow
docs/checkpoint-formats.md §2.6 (legacy), §3.1 (Megatron-Core local spec), §3.2 (TE norm names) and §6.3 (torch_dist, stacked layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from formats.checkpoint import format_of
from formats.checkpoint.megatron import release_pages
from formats.layout import Layout
from interop import scratch
from interop.convert_stream import Stream, rule_for
from interop.errors import ConversionError
from interop.families.base import (
    DimSplit,
    ModelConfig,
    Plain,
    Row,
    VocabParallel,
    get_family,
    layer_of,
    stack_of,
)
from interop.vocab import true_vocab_size

# ---------------------------------------------------------------------------------------------------------
# where a layer lives


def layers_per_chunk(cfg: ModelConfig, layout: Layout, stack: str = "decoder") -> int:
    """Layers of ``stack`` in one pipeline chunk (each stack is spread evenly over every stage)."""
    cfg.check_layout(layout.tp, layout.pp, layout.interleaved)
    family = get_family(cfg.family)
    name = stack if any(s.name == stack for s in family.stacks(cfg)) else family.stacks(cfg)[0].name
    return family.stack(cfg, name).num_layers // (layout.pp * layout.virtual_chunks)


def locate_layer(g: int, cfg: ModelConfig, layout: Layout, stack: str = "decoder") -> tuple[int, int, int]:
    """Global layer ``g`` of ``stack`` -> (pipeline rank, virtual chunk, stage-local index) (docs/checkpoint-formats.md §3.6, even
    split)."""
    lc = layers_per_chunk(cfg, layout, stack)
    per_round = layout.pp * lc
    return (g % per_round) // lc, g // per_round, g % lc


def stage_of(name: str, cfg: ModelConfig, layout: Layout) -> tuple[int, int, str]:
    """Canonical name -> (pipeline rank, chunk, stage-local canonical name); tensors outside the layer stacks go
    where the family's ``first_stage_prefixes`` say (first stage) or to the last stage (norms, heads)."""
    layer, template = layer_of(name)
    if layer is not None:
        p, v, i = locate_layer(layer, cfg, layout, stack_of(template))
        return p, v, template.format(i=i)
    if get_family(cfg.family).on_first_stage(name):
        return 0, 0, name
    return layout.pp - 1, layout.virtual_chunks - 1, name


def _check_even_split(args_get) -> None:
    for field in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                  "pipeline_model_parallel_layout"):
        if args_get(field):
            raise ConversionError(f"uneven pipeline splits ({field}) are not supported yet")


# ---------------------------------------------------------------------------------------------------------
# key styles


_TE_NORMS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}

_LEGACY_LAYER = {  # canonical suffix -> legacy candidates (newest first)
    "input_layernorm": ["input_norm", "input_layernorm"],
    "self_attention.linear_qkv": ["self_attention.query_key_value", "attention.query_key_value"],
    "self_attention.linear_proj": ["self_attention.dense", "attention.dense"],
    "pre_mlp_layernorm": ["post_attention_norm", "post_attention_layernorm"],
    "mlp.linear_fc1": ["mlp.dense_h_to_4h"],
    "mlp.linear_fc2": ["mlp.dense_4h_to_h"],
    # T5's decoder (docs/checkpoint-formats.md §2.4)
    "pre_cross_attn_layernorm": ["post_inter_attention_norm", "post_inter_attention_layernorm"],
    "cross_attention.linear_q": ["inter_attention.query"],
    "cross_attention.linear_kv": ["inter_attention.key_value"],
    "cross_attention.linear_proj": ["inter_attention.dense"],
}


def te_name(local: str) -> str:
    """Local-spec norm name -> the Transformer-Engine / torch_dist name (docs/checkpoint-formats.md trap T10/T11)."""
    for ours, theirs in _TE_NORMS.items():
        if f".{ours}" in local:
            return local.replace(f".{ours}", f".{theirs}")
    return local


#: a model's stack -> its legacy ``language_model`` section(s) (decoder-only GPT called its stack "encoder")
_LEGACY_STACK = {("decoder", "decoder"): ("encoder", "transformer"), ("encoder", "encoder"): ("encoder", "transformer"),
                 ("encoder-decoder", "encoder"): ("encoder",), ("encoder-decoder", "decoder"): ("decoder",)}


def local_names(local: str, style: str, tied_copy: bool = False, family=None) -> list[str]:
    """Stage-local canonical name -> candidate stored names in ``style`` (first = what a writer emits); legacy
    names of a family's own heads come from its ``legacy_names``."""
    if style == "mcore":
        return [local]
    if style == "mcore_te":
        return [te_name(local)]
    if style != "legacy":
        raise ConversionError(f"unknown key style {style!r}")
    if tied_copy:
        return ["word_embeddings_for_head.weight"]
    if family is not None and local in family.legacy_names:
        return list(family.legacy_names[local])
    if local.startswith("embedding."):
        return ["language_model." + local]
    if local == "output_layer.weight":
        return ["language_model.output_layer.weight"]
    kind = family.kind if family is not None else "decoder"
    stack = stack_of(local) or local.split(".", 1)[0]
    sections = _LEGACY_STACK.get((kind, stack), ())
    if local.startswith(f"{stack}.final_layernorm."):
        x = local.rsplit(".", 1)[1]
        return [f"language_model.{enc}.{n}.{x}" for enc in sections for n in ("final_norm", "final_layernorm")]
    layer, template = layer_of(local)
    if layer is None or not sections:
        raise ConversionError(f"{local} has no legacy name")
    body = template.removeprefix(f"{stack}.layers.{{i}}.")
    module, x = body.rsplit(".", 1)
    out = []
    for enc in sections:
        for cand in _LEGACY_LAYER.get(module, [module]):
            out.append(f"language_model.{enc}.layers.{layer}.{cand}.{x}")
    return out


# ---------------------------------------------------------------------------------------------------------
# the config of a checkpoint


def megatron_config(ckpt, vocab_size: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Megatron checkpoint, from its args (``vocab_size`` overrides the true V).

    The true V comes from what the producer recorded (:func:`interop.vocab.true_vocab_size`, docs/checkpoint-formats.md §10.1); when
    nothing tells it, a one-line error asks for ``vocab_size`` instead of exporting the padding rows.
    """
    args = ckpt.args
    if args is None:
        raise ConversionError("checkpoint has no args; cannot tell its architecture", path=ckpt.path)
    get = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    _check_even_split(get)
    if get("num_experts"):
        raise ConversionError("mixture-of-experts checkpoints are not supported yet")
    if get("rotary_interleaved"):
        raise ConversionError("rotary_interleaved=True checkpoints are not supported (docs/checkpoint-formats.md trap T16)")
    if (get("rotary_percent", 1.0) or 1.0) != 1.0:
        raise ConversionError("rotary_percent < 1 cannot be expressed by the Llama family")
    if get("apply_layernorm_1p") or get("layernorm_zero_centered_gamma"):
        raise ConversionError("zero-centred gamma (apply_layernorm_1p) is not supported yet")
    if get("qk_layernorm"):
        raise ConversionError("qk_layernorm checkpoints are not supported yet")
    return ModelConfig.from_megatron_args(args, vocab_size=true_vocab_size(ckpt, vocab_size), names=stored_names(ckpt))


def stored_names(ckpt) -> list[str]:
    """The tensor names of a Megatron checkpoint's first rank (torch) or its keys (torch_dist), which tell a
    Megatron-LM BERT from a GPT (their args do not)."""
    if not format_of(ckpt).per_rank_files:
        return [i.name for i in ckpt.tensors()]
    return [n for n, t in ckpt.rank_state(0, ckpt.layout.pp - 1, ckpt.num_chunks - 1).items()
            if isinstance(t, torch.Tensor)] + [n for n in ckpt.rank_state(0, 0, 0)]


# ---------------------------------------------------------------------------------------------------------
# reading


def _fix_qkv_order(t: torch.Tensor, version: float, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """Per-shard QKV rows of ``checkpoint_version`` < 2.0 -> the 2.0/3.0 order (docs/checkpoint-formats.md §2.5)."""
    if version >= 2.0:
        return t
    np_, hn = cfg.num_attention_heads // tp, cfg.kv_channels
    rest = t.shape[1:]
    if version == 0:
        t = t.reshape(3, np_, hn, *rest).transpose(0, 1)
    else:
        t = t.reshape(np_, hn, 3, *rest).transpose(1, 2)
    return t.reshape(3 * np_ * hn, *rest).contiguous()


def page_out(tensor: torch.Tensor) -> None:
    """Drop this process's mapping of a memory-mapped rank-file tensor once it has been copied.

    Every page read would otherwise stay in the resident set until the file is closed, so peak RSS would grow
    to the checkpoint size. This used ``MADV_PAGEOUT``, which also evicts the pages from the page cache (LRU
    isolation, TLB flushes: measured 12.3–13.2 s vs 8.5–10.4 s for a 6.2 GB GPT-2-XL TP2PP2 -> HF); rank files
    are private mappings we never write, so ``MADV_DONTNEED`` (formats' :func:`release_pages`) just unmaps.
    """
    if tensor.device.type == "cpu":
        release_pages(tensor)


def torch_to_canonical(ckpt, cfg: ModelConfig) -> Stream:
    """Canonical stream of a per-rank ``torch`` checkpoint (merging TP shards one tensor at a time)."""
    family = get_family(cfg.family)
    layout = Layout(tp=ckpt.layout.tp, pp=ckpt.layout.pp, vpp=ckpt.layout.vpp if ckpt.num_chunks > 1 else None)
    style = ckpt.key_style
    version = ckpt.checkpoint_version
    if style == "legacy" and version < 2.0 and cfg.num_query_groups != cfg.num_attention_heads:
        raise ConversionError(f"checkpoint_version {version} cannot have grouped-query attention")
    for name, rule in family.canonical_names(cfg):
        p, v, local = stage_of(name, cfg, layout)
        shards, sources = [], []
        for t in range(layout.tp):
            state = ckpt.rank_state(t, p, v)
            candidates = local_names(local, style, family=family)
            stored = next((n for n in candidates if isinstance(state.get(n), torch.Tensor)), None)
            if stored is None:
                raise ConversionError(
                    f"{ckpt.rank_dir(t, p)} chunk {v}: missing tensor {candidates[0]} (for {name})"
                )
            source = ckpt.check_crc(state[stored], t, p)  # a view of the memory-mapped rank file, CRC checked
            sources.append(source)
            if style == "legacy" and "query_key_value" in stored:
                source = _fix_qkv_order(source, version, cfg, layout.tp)
            shards.append(source)
        tensor = _merge(rule, shards, cfg, name)  # copies out of the mapped files (never a view of them)
        for source in sources:
            page_out(source)
        yield name, tensor
        del shards, sources


def _merge(rule, shards, cfg, name) -> torch.Tensor:
    try:
        if isinstance(rule.hf, Plain) and rule.hf.transpose and isinstance(rule.split, DimSplit) and shards[0].dim() == 2:
            merged = _merge_transposed(shards, rule.split.dim)
        else:
            merged = rule.split.merge(shards, cfg)
    except RuntimeError as exc:
        raise ConversionError(f"{name}: TP shards do not fit together ({str(exc).splitlines()[0]})") from None
    storage = merged.untyped_storage().data_ptr()
    if any(s.untyped_storage().data_ptr() == storage for s in shards):
        merged = scratch.copy(merged)  # replicated, TP=1 or a vocab cut: a view of a mapped file, made our own
    return merged


def _merge_transposed(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(shards, dim)`` laid out transposed (returned as the ``.t()`` view of a contiguous buffer).

    For a GPT-2 Conv1D weight, whose HF tensor is the transpose of the canonical one, the HF writer's
    ``.t().contiguous()`` then costs nothing: one copy from the rank files to HF layout instead of a ``cat``
    and a transpose (row-parallel shards even go through torch's blocked transpose: ~2x faster measured).
    """
    shape = list(shards[0].shape)
    shape[dim] = sum(s.shape[dim] for s in shards)
    buf = scratch.empty(shape[::-1], shards[0].dtype)
    if dim == 0 and len(shards) > 1:
        # column shards: a transposed shard lands in a column block of ``buf``, which torch copies element by
        # element (1.2 GB/s); gluing the rows first and transposing the whole (blocked) runs at 2.5 GB/s
        rows = scratch.empty(shape, shards[0].dtype)
        torch.cat(shards, dim=0, out=rows)
        buf.copy_(rows.t())
        return buf.t()
    offset = 0
    for s in shards:
        buf.narrow(1 - dim, offset, s.shape[dim]).copy_(s.t())
        offset += s.shape[dim]
    return buf.t()


def dist_key(name: str) -> tuple[str, int | None]:
    """Canonical name -> (torch_dist key, layer index into the stacked axis or None) (docs/checkpoint-formats.md §6.3)."""
    layer, template = layer_of(name)
    if layer is None:
        return name, None
    stack = stack_of(template)
    return te_name(template.replace(f"{stack}.layers.{{i}}.", f"{stack}.layers.")), layer


def torch_dist_to_canonical(ckpt, cfg: ModelConfig) -> Stream:
    """Canonical stream of a ``torch_dist`` checkpoint (reading one layer slice / the true vocab rows only)."""
    family = get_family(cfg.family)
    present = {i.name: i for i in ckpt.tensors()}
    for name, rule in family.canonical_names(cfg):
        key, layer = dist_key(name)
        if key not in present:
            raise ConversionError(f"torch_dist checkpoint lacks {key} (for {name})")
        shape, dtype = present[key].shape, present[key].dtype
        # each tensor is read into a scratch buffer (reused while a scratch pool is on: see interop.scratch)
        if layer is not None:
            expected = family.stack(cfg, stack_of(name)).num_layers
            if shape[0] != expected:
                raise ConversionError(f"{key} stacks {shape[0]} layers, args say {expected}")
            out = scratch.empty((1, *shape[1:]), dtype)
            tensor = ckpt.load(key, (slice(layer, layer + 1),), out=out)[0]
        elif isinstance(rule.split, VocabParallel):
            if shape[0] < cfg.vocab_size:
                raise ConversionError(f"{key} has {shape[0]} rows, fewer than V={cfg.vocab_size}")
            tensor = ckpt.load(key, (slice(0, cfg.vocab_size),), out=scratch.empty((cfg.vocab_size, *shape[1:]), dtype))
        else:
            tensor = ckpt.load(key, out=scratch.empty(shape, dtype))
        yield name, tensor


def megatron_to_canonical(ckpt, cfg: ModelConfig) -> Stream:
    """Per-rank files are merged over TP/PP; a checkpoint of global keys is read by region."""
    if format_of(ckpt).per_rank_files:
        return torch_to_canonical(ckpt, cfg)
    return torch_dist_to_canonical(ckpt, cfg)


# ---------------------------------------------------------------------------------------------------------
# writing


@dataclass
class TorchTarget:
    """Where canonical tensors go in a per-rank ``torch`` checkpoint at ``layout`` with ``style`` keys."""

    cfg: ModelConfig
    layout: Layout
    style: str = "mcore"

    def placements(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, int, int, int]]:
        """``(stored name, shard, tp, pp, chunk)`` for every rank that stores a piece of ``name``."""
        family = get_family(self.cfg.family)
        rule = rule_for(family, self.cfg, name)
        p, v, local = stage_of(name, self.cfg, self.layout)
        stored = local_names(local, self.style, family=family)[0]
        if not tensor.is_contiguous() and not isinstance(rule.split, Row):
            tensor = scratch.contiguous(tensor)  # (a transposed view) copied whole: its dim-0 shards are then views
        # row-parallel (dim 1) shards of a transposed view are transposed row blocks of the source and dim-0
        # shards of a contiguous tensor are contiguous views: the writer copies each strided shard once (in its
        # worker thread, into a reused buffer) and writes contiguous ones without a copy
        shards = rule.split.split(tensor, self.layout.tp, self.cfg)
        for alias in (stored, *family.stored_aliases.get(name, ())):
            for t, shard in enumerate(shards):
                yield alias, shard, t, p, v
        if name == "embedding.word_embeddings.weight" and self.cfg.tie_word_embeddings and self.layout.pp > 1:
            copy = local_names("output_layer.weight", self.style, tied_copy=True)[0]  # docs/checkpoint-formats.md trap T5
            for t, shard in enumerate(shards):
                yield copy, shard, t, self.layout.pp - 1, self.layout.virtual_chunks - 1

    def expected(self) -> dict[tuple[int, int, int], dict[str, tuple[int, ...]]]:
        """Per (tp, pp, chunk): stored name -> local shape, for validating what was written (docs/checkpoint-formats.md trap T12)."""
        family = get_family(self.cfg.family)
        out: dict[tuple[int, int, int], dict[str, tuple[int, ...]]] = {}
        for name, rule in family.canonical_names(self.cfg):
            meta = torch.empty(family.shape(name, self.cfg, rule), device="meta")
            for stored, shard, t, p, v in self.placements(name, meta):
                out.setdefault((t, p, v), {})[stored] = tuple(shard.shape)
        return out


def canonical_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The canonical (TP=1, true V) shape of a tensor, as its family declares it."""
    family = get_family(cfg.family)
    return family.shape(name, cfg, rule_for(family, cfg, name))


def check_canonical_shape(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> None:
    expected = canonical_shape(name, cfg)
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"{name}: shape {tuple(tensor.shape)} does not match the config's {expected}")


def extra_state_names(cfg: ModelConfig, layout: Layout, style: str) -> dict[tuple[int, int], list[str]]:
    """``_extra_state`` entries Megatron-Core's local-spec modules put in a rank's state dict (value None),
    per (pp, chunk): without them ``load_state_dict(strict=True)`` fails and Megatron-LM silently loads
    non-strict (docs/checkpoint-formats.md trap T12)."""
    if style == "legacy":
        return {}
    family = get_family(cfg.family)
    out: dict[tuple[int, int], list[str]] = {}
    for p in range(layout.pp):
        for v in range(layout.virtual_chunks):
            names = []
            for stack in family.stacks(cfg):
                for i in range(layers_per_chunk(cfg, layout, stack.name)):
                    names += [f"{stack.prefix}{i}.{m}._extra_state" for m in family.extra_state_modules(stack.name)]
            if p == layout.pp - 1 and v == layout.virtual_chunks - 1:
                # output_layer's is present even when tied at PP=1 (mcore 0.16.1)
                names += [f"{m}._extra_state" for m in family.head_extra_states]
            out[(p, v)] = names
    return out


def dist_extra_state_keys(cfg: ModelConfig) -> list[str]:
    """Keys of the ``_extra_state`` ShardedObjects Megatron-Core's model requests from a torch_dist checkpoint
    (value ``[None]``): per stacked layer module (``…/shard_{i}_{L}``) and the family's head modules."""
    family = get_family(cfg.family)
    keys = [f"{stack.prefix}{m}._extra_state/shard_{i}_{stack.num_layers}"
            for stack in family.stacks(cfg) for m in family.extra_state_modules(stack.name)
            for i in range(stack.num_layers)]
    return keys + [f"{m}._extra_state/shard_0_1" for m in family.dist_head_extra_states]


def dist_placements(name: str, tensor: torch.Tensor, cfg: ModelConfig, tp: int) -> list[tuple[str, torch.Tensor, tuple, tuple]]:
    """``[(key, chunk, global_shape, offset), …]`` of a canonical tensor in a torch_dist checkpoint saved at
    ``tp``: layers stacked (offset = global layer), vocab padded to that TP's ``Vp`` (the padding rows as a
    second chunk, so the table is never copied), fc1 as full ``[gate; up]`` (docs/checkpoint-formats.md §6.3)."""
    family = get_family(cfg.family)
    rule = rule_for(family, cfg, name)
    key, layer = dist_key(name)
    # a transposed view (a Conv1D weight): one 2-D transposed copy, into reused memory while a scratch pool is on
    tensor = scratch.contiguous(tensor)
    if layer is not None:
        layers = family.stack(cfg, stack_of(layer_of(name)[1])).num_layers
        return [(key, tensor.unsqueeze(0), (layers, *tensor.shape), (layer,) + (0,) * tensor.dim())]
    zeros = (0,) * (tensor.dim() - 1)
    keys = (key, *family.stored_aliases.get(name, ()))
    if isinstance(rule.split, VocabParallel):
        padded = cfg.padded_vocab_size(tp)
        gshape = (padded, *tensor.shape[1:])
        out = [(k, tensor, gshape, (0,) + zeros) for k in keys]
        if padded > tensor.shape[0]:
            fill = tensor[-1:].expand(padded - tensor.shape[0], *tensor.shape[1:]).contiguous()
            out += [(k, fill, gshape, (tensor.shape[0],) + zeros) for k in keys]
        return out
    return [(k, tensor, tuple(tensor.shape), (0,) + zeros) for k in keys]


def iter_checked(stream: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig) -> Stream:
    """Pass a canonical stream through, checking each tensor's shape against the config and the family."""
    family = get_family(cfg.family)
    seen = set()
    for name, tensor in stream:
        rule_for(family, cfg, name)
        check_canonical_shape(name, tensor, cfg)
        seen.add(name)
        yield name, tensor
    missing = [n for n, _ in family.canonical_names(cfg) if n not in seen]
    if missing:
        raise ConversionError(f"source lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def args_namespace(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, **extra: Any):
    """The ``args`` of a checkpoint we write (:func:`interop.megatron_args.checkpoint_args`)."""
    from interop.megatron_args import checkpoint_args

    return checkpoint_args(cfg, layout, dtype, **extra)

