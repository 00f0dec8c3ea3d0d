"""What a model family is: a typed architecture config and declarative tensor rules.

A family file (``gpt2.py``, ``llama.py``) declares, for every tensor of the **canonical stream** (Megatron-Core
local-spec names at TP=1/PP=1 with global layer numbers, full shapes, vocab rows cut to the true size, GLU fc1 as
``[gate; up]``, QKV in Megatron's grouped layout), two things:

* how it is made from / turned back into Hugging Face tensors (:class:`Plain`, :class:`QKVSeparate`,
  :class:`QKVPacked`, :class:`GatedPair`), and
* how tensor parallelism splits it (:class:`Replicated`, :class:`Column`, :class:`Row`, :class:`VocabParallel`,
  :class:`FusedQKV`, :class:`GatedFc1`).

Everything else (convert, reshape, the Megatron-Core loader) works from those declarations only, so adding a
family is one new file that subclasses :class:`Family` and registers itself.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import torch

from interop import scratch
from interop.errors import ConversionError, LayoutError

# --------------------------------------------------------------------------------------------------------------
# activations (module-level functions: TransformerConfig must stay picklable / deep-copyable)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: Megatron-LM's fused bias-GELU and HF ``gelu_new`` (docs/checkpoint-formats.md trap T7)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.nn.functional.relu,  # T5 v1.0
    "gelu_tanh": gelu_tanh,
    "gelu": gelu_erf,
    "silu": silu,
}


# --------------------------------------------------------------------------------------------------------------
# the architecture


@dataclass
class ModelConfig:
    """A transformer of any kind (decoder-only, encoder-only, encoder-decoder) in Megatron terms, plus what HF
    needs to rebuild its config. Which layer stacks and heads exist is the family's declaration
    (:meth:`Family.stacks`, :meth:`Family.heads`); this class only holds the numbers.

    ``num_layers`` counts the layers of the model's main stack (the decoder of a decoder-only or
    encoder-decoder model, the encoder of an encoder-only one); ``encoder_num_layers`` the encoder of an
    encoder-decoder model. ``vocab_size`` is the **true** vocabulary (the rows HF has); Megatron stores
    ``padded_vocab_size(tp)`` rows. ``hf`` carries HF-only settings through a round trip (model_type, token
    ids, sliding window, …).
    """

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: str = "learned_absolute"  # or "rope"
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    gated_linear_unit: bool = False
    activation: str = "gelu_tanh"  # key of ACTIVATIONS
    tie_word_embeddings: bool = True
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3 style scaling when set
    make_vocab_size_divisible_by: int = 128
    num_tokentypes: int = 0  # BERT's token-type (segment) embedding rows
    add_binary_head: bool = False  # BERT's pooler + next-sentence head
    encoder_num_layers: int | None = None  # encoder-decoder models only
    hf: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.activation not in ACTIVATIONS:
            raise ConversionError(f"unknown activation {self.activation!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConversionError(
                f"{self.num_attention_heads} attention heads are not divisible into "
                f"{self.num_query_groups} query groups"
            )

    # ---- sizes
    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule (docs/checkpoint-formats.md §4.2): round V up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_layout(self, tp: int, pp: int = 1, vpp: int | None = None) -> None:
        """Raise :class:`LayoutError` unless the model splits evenly at this layout."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"{self.num_attention_heads} attention heads")
        if not groups_split_over(self.num_query_groups, tp):
            problems.append(f"{self.num_query_groups} query groups")
        if self.ffn_hidden_size % tp:
            problems.append(f"FFN size {self.ffn_hidden_size}")
        if problems:
            raise LayoutError(f"TP={tp} does not divide " + ", ".join(problems))
        family = get_family(self.family)
        family.check_pipeline(self, pp, vpp)
        stages = pp * (vpp or 1)
        for stack in family.stacks(self):
            if stack.num_layers % stages:
                raise LayoutError(
                    f"{stack.num_layers} {stack.name} layers cannot be split evenly over PP={pp}"
                    + (f" x VPP={vpp}" if vpp else "")
                )

    # ---- Megatron-Core
    def to_transformer_config(self, **overrides: Any):
        """A Megatron-Core ``TransformerConfig`` for this architecture (CPU-safe defaults; overrides win)."""
        from megatron.core.transformer import TransformerConfig

        cpu = not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            gated_linear_unit=self.gated_linear_unit,
            activation_func=ACTIVATIONS[self.activation],
            bias_activation_fusion=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            params_dtype=torch.float32,
            pipeline_dtype=torch.float32,
            use_cpu_initialization=cpu,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def to_megatron_args(self, layout=None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The Megatron-LM ``args`` fields that describe this model (docs/checkpoint-formats.md §1.4), plain Python types only.

        ``true_vocab_size`` and ``interop_family``/``interop_hf`` are our own additions so that a round trip
        recovers the exact HF vocabulary and config; Megatron-LM ignores unknown fields.
        """
        tp = layout.tp if layout else 1
        pp = layout.pp if layout else 1
        vpp = layout.interleaved if layout else None
        gqa = self.num_query_groups != self.num_attention_heads
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "group_query_attention": gqa,
            "num_query_groups": self.num_query_groups,
            "kv_channels": self.kv_channels,
            "max_position_embeddings": self.max_position_embeddings,
            "seq_length": self.max_position_embeddings,
            "position_embedding_type": self.position_embedding_type,
            "add_position_embedding": self.position_embedding_type == "learned_absolute",
            "use_rotary_position_embeddings": self.position_embedding_type == "rope",
            "rotary_base": self.rotary_base,
            "rotary_percent": 1.0,
            "rotary_interleaved": False,
            "use_rope_scaling": self.rope_scaling_factor is not None,
            "rope_scaling_factor": self.rope_scaling_factor or 8.0,
            "normalization": self.normalization,
            "layernorm_epsilon": self.norm_epsilon,
            "norm_epsilon": self.norm_epsilon,
            "apply_layernorm_1p": False,
            "layernorm_zero_centered_gamma": False,
            "add_bias_linear": self.add_bias_linear,
            "add_qkv_bias": self.add_qkv_bias,
            "swiglu": self.gated_linear_unit and self.activation == "silu",
            "openai_gelu": False,
            "bias_gelu_fusion": self.activation == "gelu_tanh",
            "untie_embeddings_and_output_weights": not self.tie_word_embeddings,
            "padded_vocab_size": self.padded_vocab_size(tp),
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "true_vocab_size": self.vocab_size,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp,
            "num_layers_per_virtual_pipeline_stage": (self.num_layers // (pp * vpp)) if vpp else None,
            "transformer_impl": "local",
            "use_legacy_models": False,
            "params_dtype": dtype,
            "bf16": dtype == torch.bfloat16,
            "fp16": dtype == torch.float16,
            "interop_family": self.family,
            "interop_hf": dict(self.hf),
            **get_family(self.family).megatron_args(self),
        }

    @classmethod
    def from_megatron_args(cls, args: Any, vocab_size: int | None = None,
                           names: Iterable[str] = ()) -> "ModelConfig":
        """Rebuild from a checkpoint's ``args`` (a Namespace or dict); ``vocab_size`` overrides the true V.

        ``names`` (the stored tensor names) decide the family of a checkpoint Megatron-LM wrote itself: its args
        do not say whether it is a GPT or a BERT (``bert_binary_head`` is set in every Megatron-LM run)."""
        get = (lambda k, d=None: args.get(k, d)) if isinstance(args, Mapping) else (
            lambda k, d=None: getattr(args, k, d)
        )
        names = frozenset(names)
        family = get("interop_family") or _guess_family(get, names)
        return get_family(family).config_from_megatron_args(get, vocab_size, names)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _guess_family(get: Callable[..., Any], names: frozenset[str] = frozenset()) -> str:
    """Family of a checkpoint written by Megatron-LM itself (no ``interop_family`` field): a family whose
    :attr:`Family.megatron_markers` match a stored name, else Llama or GPT-2 by the args."""
    for fam in families().values():
        if any(m.search(n) for m in fam.megatron_markers for n in names):
            return fam.name
    if get("swiglu") or get("normalization") == "RMSNorm" or get("position_embedding_type") == "rope":
        return "llama"
    return "gpt2"


def classic_limits(cfg: ModelConfig) -> list[str]:
    """What an HF model with learned positions, LayerNorm, linear biases, multi-head attention and a plain MLP
    (GPT-2, BERT) cannot express of ``cfg`` (empty: representable)."""
    checks = [
        (cfg.num_query_groups != cfg.num_attention_heads, "grouped-query attention"),
        (cfg.position_embedding_type != "learned_absolute", f"{cfg.position_embedding_type} positions"),
        (cfg.normalization != "LayerNorm", cfg.normalization),
        (not cfg.add_bias_linear, "linear layers without bias"),
        (cfg.gated_linear_unit, "gated MLP"),
        (cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size, "kv_channels != hidden/heads"),
    ]
    return [why for bad, why in checks if bad]


def megatron_args_common(get: Callable[..., Any], vocab_size: int | None) -> dict[str, Any]:
    """The ModelConfig fields shared by every family, read from Megatron args with their historical names."""
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    if hidden is None or heads is None or get("num_layers") is None:
        raise ConversionError("checkpoint args lack num_layers/hidden_size/num_attention_heads")
    groups = get("num_query_groups") if get("group_query_attention") else heads
    eps = get("layernorm_epsilon", None)
    if eps is None:
        eps = get("norm_epsilon", 1e-5)
    true_v = vocab_size or get("true_vocab_size") or get("padded_vocab_size")
    swiglu = bool(get("swiglu"))
    if swiglu:
        activation = "silu"
    elif get("openai_gelu") or (get("bias_gelu_fusion", True) and get("add_bias_linear", True)):
        activation = "gelu_tanh"
    else:
        activation = "gelu"
    return dict(
        num_layers=get("num_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups or heads,
        kv_channels=get("kv_channels") or hidden // heads,
        ffn_hidden_size=get("ffn_hidden_size") or 4 * hidden,
        vocab_size=int(true_v),
        max_position_embeddings=get("max_position_embeddings") or get("seq_length"),
        position_embedding_type=get("position_embedding_type") or "learned_absolute",
        normalization=get("normalization") or "LayerNorm",
        norm_epsilon=float(eps),
        add_bias_linear=bool(get("add_bias_linear", True)),
        add_qkv_bias=bool(get("add_qkv_bias", False) or get("add_bias_linear", True)),
        gated_linear_unit=swiglu,
        activation=activation,
        tie_word_embeddings=not get("untie_embeddings_and_output_weights", False),
        rotary_base=float(get("rotary_base", 10000) or 10000),
        rope_scaling_factor=get("rope_scaling_factor", 8.0) if get("use_rope_scaling") else None,
        make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128) or 128,
        hf=dict(get("interop_hf") or {}),
    )


# --------------------------------------------------------------------------------------------------------------
# tensor-parallel split rules


def cat(tensors, dim: int = 0) -> torch.Tensor:
    """``torch.cat`` into a scratch buffer (:mod:`interop.scratch`: reused memory during a conversion), except
    on meta tensors (shape planning: ``hf_plan``, ``TorchTarget.expected``), where torch's meta ``cat`` imports
    ``torch._dynamo`` (~1 s of a conversion's start-up) — the result's shape is computed directly instead."""
    tensors = list(tensors)
    shape = list(tensors[0].shape) if tensors else []
    if shape:
        shape[dim] = sum(t.shape[dim] for t in tensors)
    if tensors and all(t.is_meta for t in tensors):
        return tensors[0].new_empty(shape)
    if tensors and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype and not t.requires_grad for t in tensors):
        return torch.cat(tensors, dim=dim, out=scratch.empty(shape, tensors[0].dtype))  # (CPU only, see above)
    return torch.cat(tensors, dim=dim)


class SplitRule:
    """How one canonical tensor is cut over ``tp`` ranks and glued back (docs/checkpoint-formats.md §4)."""

    def shard(self, full: torch.Tensor, tp: int, rank: int, cfg: ModelConfig) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        raise NotImplementedError

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return [self.shard(full, tp, r, cfg) for r in range(tp)]


class Replicated(SplitRule):
    """Same tensor on every TP rank (norms, position embeddings, row-parallel biases)."""

    def shard(self, full, tp, rank, cfg):
        return full

    def merge(self, shards, cfg):
        return shards[0]


@dataclass(frozen=True)
class DimSplit(SplitRule):
    dim: int = 0

    def shard(self, full, tp, rank, cfg):
        if full.shape[self.dim] % tp:
            raise LayoutError(f"TP={tp} does not divide dimension {self.dim} of size {full.shape[self.dim]}")
        return full.chunk(tp, dim=self.dim)[rank]

    def merge(self, shards, cfg):
        return cat(shards, dim=self.dim) if len(shards) > 1 else shards[0]


class Column(DimSplit):
    """Column-parallel linear: output rows (dim 0) in contiguous chunks."""

    def __init__(self) -> None:
        super().__init__(0)


class Row(DimSplit):
    """Row-parallel linear: input columns (dim 1) in contiguous chunks."""

    def __init__(self) -> None:
        super().__init__(1)


def groups_split_over(groups: int, tp: int) -> bool:
    """Can Megatron-Core run ``groups`` query groups at TP=``tp``? Either each rank holds whole groups, or
    (fewer groups than ranks, e.g. multi-query attention at TP>1) ``tp`` is a multiple of ``groups``: then
    Megatron-Core splits ``linear_qkv`` rows plainly, all-gathers them and every rank uses its group's K/V
    (``Attention.get_query_key_value_tensors``), so the K/V head is replicated in compute, not in storage."""
    return groups % tp == 0 or tp % groups == 0


class FusedQKV(Column):
    """``linear_qkv`` in the grouped layout: a plain dim-0 split that gives each rank whole query groups (fewer
    groups than ranks: plain row chunks, which Megatron-Core all-gathers, see :func:`groups_split_over`)."""

    def shard(self, full, tp, rank, cfg):
        if not groups_split_over(cfg.num_query_groups, tp):
            raise LayoutError(f"TP={tp} does not divide {cfg.num_query_groups} query groups")
        return super().shard(full, tp, rank, cfg)


class VocabParallel(SplitRule):
    """Embedding / output rows: pad the true V to ``padded_vocab_size(tp)`` (replicating the last row, as
    Megatron's own converter does), then split dim 0; merging cuts back to the true V (docs/checkpoint-formats.md trap T4)."""

    def shard(self, full, tp, rank, cfg):
        """Rank ``rank``'s rows, padding only this shard (no padded copy of the whole table)."""
        if full.shape[0] != cfg.vocab_size:
            raise ConversionError(f"vocabulary tensor has {full.shape[0]} rows, expected {cfg.vocab_size}")
        rows = cfg.padded_vocab_size(tp) // tp
        lo, hi = rank * rows, (rank + 1) * rows
        if hi <= cfg.vocab_size:
            return full[lo:hi]
        real = full[min(lo, cfg.vocab_size):cfg.vocab_size]
        fill = full[-1:].expand(hi - max(lo, cfg.vocab_size), *full.shape[1:])
        return cat([real, fill], dim=0)

    def merge(self, shards, cfg):
        full = cat(shards, dim=0) if len(shards) > 1 else shards[0]
        if full.shape[0] < cfg.vocab_size:
            raise ConversionError(f"vocabulary tensor has {full.shape[0]} rows, fewer than V={cfg.vocab_size}")
        return full[: cfg.vocab_size]


class GatedFc1(SplitRule):
    """GLU ``linear_fc1`` = ``[gate; up]``; each TP shard holds its own ``[gate_t; up_t]`` (docs/checkpoint-formats.md trap T3)."""

    def shard(self, full, tp, rank, cfg):
        gate, up = full.chunk(2, dim=0)
        if gate.shape[0] % tp:
            raise LayoutError(f"TP={tp} does not divide FFN size {gate.shape[0]}")
        return cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]], dim=0)

    def merge(self, shards, cfg):
        halves = [s.chunk(2, dim=0) for s in shards]
        return cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# --------------------------------------------------------------------------------------------------------------
# HF <-> canonical maps


class HFMap:
    """How one canonical tensor is made of HF tensors (``hf_names``) and turned back into them."""

    hf_names: tuple[str, ...] = ()

    def to_canonical(self, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        raise NotImplementedError


class Plain(HFMap):
    """One HF tensor, same values; ``transpose`` for GPT-2's Conv1D ``[in, out]`` weights (docs/checkpoint-formats.md trap T8)."""

    def __init__(self, hf: str, transpose: bool = False):
        self.hf_names = (hf,)
        self.transpose = transpose

    def to_canonical(self, parts, cfg):
        # a transposed *view*: the writer copies it once, whole or (row-parallel shards) shard by shard, with
        # torch's blocked 2-D transpose; materialising it here would cost a second copy for row shards
        return parts[0].t() if self.transpose else parts[0]

    def to_hf(self, tensor, cfg):
        return [scratch.contiguous(tensor.t()) if self.transpose else tensor]


def _grouped_to_parts(t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron grouped QKV rows (docs/checkpoint-formats.md §4.3) -> all-heads q, k, v as *views* ``[groups, heads per group, d, …]``
    (``_parts_rows`` lays them out as rows; a ``reshape`` here would copy each into fresh memory)."""
    ng, d = cfg.num_query_groups, cfg.kv_channels
    r = cfg.num_attention_heads // ng
    grouped = t.reshape(ng, r + 2, d, *t.shape[1:])
    return grouped[:, :r], grouped[:, r:r + 1], grouped[:, r + 1:]


def _parts_rows(parts, out: torch.Tensor) -> torch.Tensor:
    """Copy 4-D part views (``_grouped_to_parts``) one after another into the rows of ``out`` (any strides)."""
    row = 0
    for p in parts:
        n = p.shape[0] * p.shape[1] * p.shape[2]
        out[row:row + n].view(p.shape).copy_(p)
        row += n
    return out


def _parts_to_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    ng, d = cfg.num_query_groups, cfg.kv_channels
    r = cfg.num_attention_heads // ng
    rest = q.shape[1:]
    expected = (cfg.num_attention_heads * d, ng * d, ng * d)
    if (q.shape[0], k.shape[0], v.shape[0]) != expected:
        raise ConversionError(
            f"q/k/v have {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows, expected {expected[0]}/{expected[1]}/{expected[2]}"
        )
    grouped = cat(
        [q.reshape(ng, r, d, *rest), k.reshape(ng, 1, d, *rest), v.reshape(ng, 1, d, *rest)], dim=1
    )
    return grouped.reshape(cfg.qkv_rows, *rest)


class QKVSeparate(HFMap):
    """Llama-style separate ``q_proj``/``k_proj``/``v_proj`` <-> grouped ``linear_qkv`` (docs/checkpoint-formats.md trap T1)."""

    def __init__(self, q: str, k: str, v: str):
        self.hf_names = (q, k, v)

    def to_canonical(self, parts, cfg):
        return _parts_to_grouped(*parts, cfg)

    def to_hf(self, tensor, cfg):
        return [_parts_rows([p], scratch.empty((p.shape[0] * p.shape[1] * p.shape[2], *p.shape[3:]), p.dtype,
                                               p.device))
                for p in _grouped_to_parts(tensor, cfg)]


class QKVPacked(HFMap):
    """GPT-2 ``c_attn``: ``[Q | K | V]`` packed contiguously and (for the weight) transposed."""

    def __init__(self, hf: str, transpose: bool):
        self.hf_names = (hf,)
        self.transpose = transpose

    def to_canonical(self, parts, cfg):
        t = parts[0].t() if self.transpose else parts[0]
        nq = cfg.num_attention_heads * cfg.kv_channels
        nk = cfg.num_query_groups * cfg.kv_channels
        if t.shape[0] != nq + 2 * nk:
            raise ConversionError(f"{self.hf_names[0]} has {t.shape[0]} q/k/v rows, expected {nq + 2 * nk}")
        return _parts_to_grouped(t[:nq], t[nq:nq + nk], t[nq + nk:], cfg)

    def to_hf(self, tensor, cfg):
        rows, rest = tensor.shape[0], tuple(tensor.shape[1:])
        if self.transpose:  # straight into the HF [in, out] layout: one copy, no packed intermediate
            out = scratch.empty(rest[::-1] + (rows,), tensor.dtype, tensor.device)
            _parts_rows(_grouped_to_parts(tensor, cfg), out.t())
            return [out]
        return [_parts_rows(_grouped_to_parts(tensor, cfg), scratch.empty((rows, *rest), tensor.dtype, tensor.device))]


class GatedPair(HFMap):
    """HF ``gate_proj`` + ``up_proj`` <-> GLU ``linear_fc1`` = ``[gate; up]``."""

    def __init__(self, gate: str, up: str):
        self.hf_names = (gate, up)

    def to_canonical(self, parts, cfg):
        return cat(parts, dim=0)

    def to_hf(self, tensor, cfg):
        return [scratch.contiguous(p) for p in tensor.chunk(2, dim=0)]


# --------------------------------------------------------------------------------------------------------------
# the declaration

#: model kinds and the layer stacks each has, in stream (and pipeline) order
KINDS: dict[str, tuple[str, ...]] = {
    "decoder": ("decoder",),
    "encoder": ("encoder",),
    "encoder-decoder": ("encoder", "decoder"),
}


@dataclass(frozen=True)
class LayerStack:
    """One stack of transformer layers: canonical names ``{name}.layers.{i}.…`` and ``{name}.final_layernorm.*``."""

    name: str  # "encoder" | "decoder"
    num_layers: int

    @property
    def prefix(self) -> str:
        return f"{self.name}.layers."


Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclass(frozen=True)
class TensorRule:
    """One canonical tensor: its name (``{i}`` = global layer of its stack), its HF map, its TP split rule and,
    for tensors outside :data:`COMMON_SHAPES`, its full shape."""

    name: str
    hf: HFMap
    split: SplitRule
    shape: Shape | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name

    @property
    def stack(self) -> str | None:
        """``encoder``/``decoder`` for a layer tensor, None otherwise."""
        return self.name.split(".", 1)[0] if self.per_layer else None


def linear_with_bias(ours: str, theirs: str, split: str) -> list[TensorRule]:
    """The weight and bias rules of one HF ``nn.Linear`` with bias (same layout as Megatron's) or one LayerNorm:
    ``split`` is ``column``, ``row`` (bias replicated), ``qkv`` (grouped fused QKV) or ``norm`` (replicated)."""
    weight, bias = {"column": (Column(), Column()), "row": (Row(), Replicated()),
                    "qkv": (FusedQKV(), FusedQKV()), "norm": (Replicated(), Replicated())}[split]
    return [TensorRule(f"{ours}.weight", Plain(f"{theirs}.weight"), weight),
            TensorRule(f"{ours}.bias", Plain(f"{theirs}.bias"), bias)]


def _fc1_rows(c: ModelConfig) -> int:
    return (2 if c.gated_linear_unit else 1) * c.ffn_hidden_size


#: full (TP=1, true V) shapes of the tensors every family shares; layer templates without their stack prefix
COMMON_SHAPES: dict[str, Shape] = {
    "embedding.word_embeddings.weight": lambda c: (c.vocab_size, c.hidden_size),
    "embedding.position_embeddings.weight": lambda c: (c.max_position_embeddings, c.hidden_size),
    "embedding.tokentype_embeddings.weight": lambda c: (c.num_tokentypes, c.hidden_size),
    "output_layer.weight": lambda c: (c.vocab_size, c.hidden_size),
    "output_layer.bias": lambda c: (c.vocab_size,),
    "final_layernorm.weight": lambda c: (c.hidden_size,),
    "final_layernorm.bias": lambda c: (c.hidden_size,),
    "layers.{i}.input_layernorm.weight": lambda c: (c.hidden_size,),
    "layers.{i}.input_layernorm.bias": lambda c: (c.hidden_size,),
    "layers.{i}.pre_mlp_layernorm.weight": lambda c: (c.hidden_size,),
    "layers.{i}.pre_mlp_layernorm.bias": lambda c: (c.hidden_size,),
    "layers.{i}.self_attention.linear_qkv.weight": lambda c: (c.qkv_rows, c.hidden_size),
    "layers.{i}.self_attention.linear_qkv.bias": lambda c: (c.qkv_rows,),
    "layers.{i}.self_attention.linear_proj.weight": lambda c: (c.hidden_size, c.num_attention_heads * c.kv_channels),
    "layers.{i}.self_attention.linear_proj.bias": lambda c: (c.hidden_size,),
    "layers.{i}.mlp.linear_fc1.weight": lambda c: (_fc1_rows(c), c.hidden_size),
    "layers.{i}.mlp.linear_fc1.bias": lambda c: (_fc1_rows(c),),
    "layers.{i}.mlp.linear_fc2.weight": lambda c: (c.hidden_size, c.ffn_hidden_size),
    "layers.{i}.mlp.linear_fc2.bias": lambda c: (c.hidden_size,),
}

#: Megatron-Core modules with an ``_extra_state`` entry (value None) in every layer of a stack (local spec)
LAYER_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                             "mlp.linear_fc2")

_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def layer_of(name: str) -> tuple[int | None, str]:
    """``decoder.layers.7.mlp.linear_fc1.weight`` -> ``(7, 'decoder.layers.{i}.mlp.linear_fc1.weight')`` (any
    stack: ``encoder.layers.…`` likewise); ``(None, name)`` for a tensor outside the layer stacks."""
    m = _LAYER_RE.match(name)
    if m:
        return int(m.group(2)), f"{m.group(1)}.layers.{{i}}.{m.group(3)}"
    return None, name


def stack_of(name: str) -> str | None:
    """The stack (``encoder``/``decoder``) of a layer tensor's name or template, None outside the stacks."""
    head = name.split(".", 2)
    return head[0] if len(head) > 2 and head[1] == "layers" and head[0] in ("encoder", "decoder") else None


def without_stack(template: str) -> str:
    """``encoder.layers.{i}.mlp.linear_fc1.weight`` -> ``layers.{i}.mlp.linear_fc1.weight``;
    ``decoder.final_layernorm.weight`` -> ``final_layernorm.weight``; other names unchanged."""
    head, _, rest = template.partition(".")
    if head in ("encoder", "decoder") and rest.startswith(("layers.", "final_layernorm.")):
        return rest
    return template


@dataclass(frozen=True)
class Output:
    """One output a family's models compute, compared by ``--verify``: its name, the HF output attribute, and
    whether it is per token (compared at unpadded positions only) and vocabulary-sized (cut to the true V)."""

    name: str
    hf_attr: str
    per_token: bool = True
    vocab: bool = True


class Family:
    """Base of a family declaration: everything the converter, reshaper, verifier and trainer need to know about
    one model family, as data. Subclasses set the class attributes and implement :meth:`rules`,
    :meth:`config_from_hf`, :meth:`hf_config` (and :meth:`config_from_megatron_args` when the args need more
    than :func:`megatron_args_common`).

    ``kind`` (a key of :data:`KINDS`) gives the layer stacks; ``provider`` builds and runs the Megatron-Core
    model (:mod:`interop.families.provider`); ``hf_class``/``outputs`` say what ``--verify`` compares against.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "decoder"
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    hf_architecture: ClassVar[str] = ""
    #: HF names that may appear in files but carry no weights (legacy buffers, docs/checkpoint-formats.md trap T17) or are tied aliases
    hf_ignored: ClassVar[tuple[str, ...]] = ()
    #: regexes on stored Megatron tensor names that identify this family in a checkpoint without our args
    megatron_markers: ClassVar[tuple[re.Pattern, ...]] = ()
    #: can this family be written in the legacy (pre-Megatron-Core) key layout?
    legacy_format: ClassVar[bool] = False
    #: canonical name -> legacy candidates (first = what a writer emits) for tensors outside the layer stacks
    legacy_names: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: canonical name prefixes that live on the first pipeline stage (everything else outside the stacks: last)
    first_stage_prefixes: ClassVar[tuple[str, ...]] = ("embedding.",)
    #: non-layer modules whose ``_extra_state`` Megatron-Core keeps in a torch-format state dict / a torch_dist
    #: checkpoint (on the last stage)
    head_extra_states: ClassVar[tuple[str, ...]] = ("output_layer",)
    dist_head_extra_states: ClassVar[tuple[str, ...]] = ()
    #: per stack: layer modules with an ``_extra_state`` besides :data:`LAYER_EXTRA_STATE_MODULES` (cross-attention)
    layer_extra_states: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: canonical name -> further names the same tensor is stored under (a module registered twice, e.g. T5's
    #: ``lm_head.output_layer`` and ``output_layer``: its state dict and dist checkpoint hold both keys)
    stored_aliases: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: what the model can be used for besides convert/reshape/verify (e.g. "generate")
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: how the Megatron-Core model is built and run (an :class:`interop.families.provider.Provider`)
    provider: ClassVar[Any] = None
    #: ModelConfig fields a random-init architecture of this family starts from (the trainer's ``arch:``)
    arch_defaults: ClassVar[Mapping[str, Any]] = {}

    def rules(self, cfg: ModelConfig) -> list[TensorRule]:
        raise NotImplementedError

    def config_from_hf(self, hf_config: Mapping[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        raise NotImplementedError

    def config_from_megatron_args(self, get: Callable[..., Any], vocab_size: int | None,
                                  names: frozenset[str] = frozenset()) -> ModelConfig:
        return ModelConfig(family=self.name, **megatron_args_common(get, vocab_size))

    def megatron_args(self, cfg: ModelConfig) -> dict[str, Any]:
        """Megatron-LM ``args`` fields this family adds to :meth:`ModelConfig.to_megatron_args`."""
        return {}

    def check_representable(self, cfg: ModelConfig) -> None:
        """Raise :class:`ConversionError` when the HF side cannot express ``cfg``."""

    def check_pipeline(self, cfg: ModelConfig, pp: int, vpp: int | None) -> None:
        """Raise :class:`LayoutError` when this family's Megatron-Core model cannot run at ``pp``/``vpp``."""

    def extra_state_modules(self, stack: str) -> tuple[str, ...]:
        """The modules of one layer of ``stack`` that keep an ``_extra_state`` entry."""
        return LAYER_EXTRA_STATE_MODULES + tuple(self.layer_extra_states.get(stack, ()))

    def default_ffn_hidden_size(self, hidden_size: int) -> int:
        return 4 * hidden_size

    def arch_config(self, *, ffn_hidden_size: int | None = None, **fields: Any) -> ModelConfig:
        """A :class:`ModelConfig` of this family from plain architecture numbers (random initialisation)."""
        values = {**copy.deepcopy(dict(self.arch_defaults)), **fields}
        ffn = ffn_hidden_size or self.default_ffn_hidden_size(values["hidden_size"])
        return ModelConfig(family=self.name, ffn_hidden_size=ffn, **values)

    def hf_class(self, cfg: ModelConfig) -> str:
        """The Transformers class ``--verify`` loads an HF checkpoint of this family with."""
        return "AutoModelForCausalLM"

    def outputs(self, cfg: ModelConfig) -> tuple[Output, ...]:
        """What ``--verify`` compares (in this order)."""
        return (Output("logits", "logits"),)

    def heads(self, cfg: ModelConfig) -> tuple[str, ...]:
        """The model's heads, for ``inspect`` and error messages."""
        return ("lm_head",)

    def stacks(self, cfg: ModelConfig) -> tuple[LayerStack, ...]:
        """The layer stacks of ``cfg`` in stream order (from :attr:`kind`)."""
        counts = {"decoder": cfg.num_layers, "encoder": cfg.encoder_num_layers or cfg.num_layers}
        return tuple(LayerStack(s, counts[s]) for s in KINDS[self.kind])

    def require(self, capability: str) -> None:
        """Raise a one-line :class:`ConversionError` when this family cannot do ``capability``."""
        if capability not in self.capabilities:
            raise ConversionError(f"{capability} needs a decoder model; {self.name} is {self.kind}-only"
                                  if capability == "generate" and self.kind != "decoder"
                                  else f"{capability} is not supported for {self.name} ({self.kind}) models yet")

    # ---- derived helpers (no family needs to override these)
    def rule_index(self, cfg: ModelConfig) -> dict[str, TensorRule]:
        return {r.name: r for r in self.rules(cfg)}

    def stack(self, cfg: ModelConfig, name: str) -> LayerStack:
        for s in self.stacks(cfg):
            if s.name == name:
                return s
        raise ConversionError(f"{self.name} models have no {name} layers")

    def shape(self, name: str, cfg: ModelConfig, rule: TensorRule | None = None) -> tuple[int, ...]:
        """The full canonical (TP=1, true V) shape of tensor ``name``."""
        _, template = layer_of(name)
        if rule is None:
            rule = self.rule_index(cfg).get(template)
        if rule is not None and rule.shape is not None:
            return tuple(rule.shape(cfg))
        common = COMMON_SHAPES.get(without_stack(template))
        if common is None:
            raise ConversionError(f"{self.name} declares no shape for {name}")
        return tuple(common(cfg))

    def on_first_stage(self, name: str) -> bool:
        return name.startswith(self.first_stage_prefixes)

    def canonical_names(self, cfg: ModelConfig) -> Iterator[tuple[str, TensorRule]]:
        """Canonical tensors in stream order: first-stage tensors (embeddings), then each stack's layers in
        order, then the rest (final norms, heads)."""
        rules = self.rules(cfg)
        for r in rules:
            if not r.per_layer and self.on_first_stage(r.name):
                yield r.name, r
        for stack in self.stacks(cfg):
            layer = [r for r in rules if r.stack == stack.name]
            for i in range(stack.num_layers):
                for r in layer:
                    yield r.name.format(i=i), r
        for r in rules:
            if not r.per_layer and not self.on_first_stage(r.name):
                yield r.name, r


_REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator used by each family file."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_family(name: str) -> Family:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConversionError(f"unknown model family {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def family_for_hf(hf_config: Mapping[str, Any]) -> Family:
    """The family whose ``hf_model_types`` lists this config's ``model_type``."""
    _load_all()
    model_type = hf_config.get("model_type")
    for fam in _REGISTRY.values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for f in _REGISTRY.values() for t in f.hf_model_types)
    raise ConversionError(f"unsupported HF model_type {model_type!r} (supported: {', '.join(known)})")


def families() -> dict[str, Family]:
    _load_all()
    return dict(_REGISTRY)


@functools.cache
def _load_all() -> None:
    """Import every module of the package once so that each family registers itself (cached: the lookups
    above run per tensor on the conversion path, and the package directory need be listed only once). The
    directory is this file's own, so that this module never imports its package (no import cycle)."""
    import importlib
    import os
    import pkgutil

    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if info.name not in ("base", "provider"):
            importlib.import_module(f"{__package__}.{info.name}")
