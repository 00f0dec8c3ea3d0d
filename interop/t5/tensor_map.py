"""HF ``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration`` <-> Megatron-Core ``T5Model`` tensors.

The map is data (:data:`T5_TENSOR_MAP`): per Megatron-Core name at TP=1 (``{i}`` = layer of its stack, global
since T5Model runs at PP=1) the kind of HF correspondence, the HF names and the TP split rule. The kinds reuse
:mod:`interop.families.base` (``Plain``, ``QKVSeparate``, ``GatedPair``; ``Column``/``Row``/``FusedQKV``/
``GatedFc1``/``VocabParallel``/``Replicated``); the T5-only ones fold HF T5's arithmetic into weights so that
the Megatron side is a plain Megatron T5 (docs/checkpoint-formats.md §5.4):

* ``qkv`` / ``q``: HF does not scale scores by ``1/sqrt(d)``, Megatron does -> HF ``q`` times ``sqrt(d_kv)``;
* ``kv``: cross-attention ``linear_kv`` holds ``[k_h; v_h]`` per head;
* ``final_norm``: HF T5 v1.0 multiplies the decoder output by ``d_model ** -0.5`` -> into the decoder's final
  norm weight (RMSNorm is linear in its weight);
* ``zero``: a tied Megatron output layer has a bias (``lm_head.output_layer.bias``) HF lacks: zeros in, and
  only zeros are accepted out.

The relative-bias tables are replicated (``[buckets, heads]`` on every rank, as Megatron-Core's
``T5Model`` keeps them); the bias they produce is split by heads in the forward pass.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping

import torch

from interop.errors import ConversionError
from interop.families.base import (
    Column, FusedQKV, GatedFc1, GatedPair, HFMap, Plain, QKVSeparate, Replicated, Row, SplitRule, TensorRule,
    VocabParallel,
)
from interop.t5.config import T5Config


class _Scaled(HFMap):
    """One HF tensor times a factor of the config (``factor(cfg)``) on the way in, divided on the way out."""

    def __init__(self, hf: str, factor):
        self.hf_names = (hf,)
        self.factor = factor

    def to_canonical(self, parts, cfg):
        f = self.factor(cfg)
        return parts[0] if f == 1.0 else parts[0] * f

    def to_hf(self, tensor, cfg):
        f = self.factor(cfg)
        return [tensor if f == 1.0 else tensor / f]


def _q_factor(cfg: T5Config) -> float:
    return math.sqrt(cfg.kv_channels)


def _output_factor(cfg: T5Config) -> float:
    return cfg.hidden_size ** -0.5 if cfg.scale_decoder_outputs else 1.0


class _ScaledQKV(QKVSeparate):
    """HF ``q``/``k``/``v`` -> grouped ``linear_qkv`` with ``q`` times ``sqrt(d_kv)``."""

    def to_canonical(self, parts, cfg):
        q, k, v = parts
        return super().to_canonical([q * _q_factor(cfg), k, v], cfg)

    def to_hf(self, tensor, cfg):
        q, k, v = super().to_hf(tensor, cfg)
        return [q / _q_factor(cfg), k, v]


class _CrossKV(HFMap):
    """HF cross-attention ``k`` + ``v`` <-> ``linear_kv`` rows ``[k_h; v_h]`` per head."""

    def __init__(self, k: str, v: str):
        self.hf_names = (k, v)

    def to_canonical(self, parts, cfg):
        k, v = parts
        heads, d = cfg.num_attention_heads, cfg.kv_channels
        if k.shape[0] != heads * d or v.shape[0] != heads * d:
            raise ConversionError(f"{self.hf_names[0]}: k/v have {k.shape[0]}/{v.shape[0]} rows, expected {heads * d}")
        return torch.stack([k.reshape(heads, d, -1), v.reshape(heads, d, -1)], dim=1).reshape(2 * heads * d, -1)

    def to_hf(self, tensor, cfg):
        per_head = tensor.reshape(cfg.num_attention_heads, 2, cfg.kv_channels, -1)
        return [per_head[:, j].reshape(-1, tensor.shape[-1]).contiguous() for j in (0, 1)]


class _ZeroBias(HFMap):
    """Megatron's tied LM-head bias: HF T5 has none, so it must be zero to convert."""

    hf_names = ()

    def to_canonical(self, parts, cfg):
        return torch.zeros(cfg.vocab_size)

    def to_hf(self, tensor, cfg):
        if torch.count_nonzero(tensor):
            raise ConversionError("lm_head.output_layer.bias is not zero: a Transformers T5 has no output bias")
        return []


#: kind -> how the HF tensors become the Megatron one
KINDS = {
    "plain": lambda names: Plain(names[0]),
    "qkv": lambda names: _ScaledQKV(*names),
    "q": lambda names: _Scaled(names[0], _q_factor),
    "kv": lambda names: _CrossKV(*names),
    "gated": lambda names: GatedPair(*names),
    "final_norm": lambda names: _Scaled(names[0], _output_factor),
    "zero": lambda names: _ZeroBias(),
}

_E, _D = "encoder.layers.{i}.", "decoder.layers.{i}."
_HE, _HD = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."


def _attn(hf_prefix: str) -> tuple[str, str, str]:
    return tuple(f"{hf_prefix}.{p}.weight" for p in "qkv")  # type: ignore[return-value]


#: (Megatron-Core name, kind, HF names, split rule); ``mlp`` rows depend on gating and are added below
T5_TENSOR_MAP: tuple[tuple[str, str, tuple[str, ...], SplitRule], ...] = (
    ("embedding.word_embeddings.weight", "plain", ("shared.weight",), VocabParallel()),
    ("encoder_relative_pos_emb.relative_attention_bias.weight", "plain",
     ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), Replicated()),
    ("decoder_relative_pos_emb.relative_attention_bias.weight", "plain",
     ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), Replicated()),
    (_E + "input_layernorm.weight", "plain", (_HE + "0.layer_norm.weight",), Replicated()),
    (_E + "self_attention.linear_qkv.weight", "qkv", _attn(_HE + "0.SelfAttention"), FusedQKV()),
    (_E + "self_attention.linear_proj.weight", "plain", (_HE + "0.SelfAttention.o.weight",), Row()),
    (_E + "pre_mlp_layernorm.weight", "plain", (_HE + "1.layer_norm.weight",), Replicated()),
    ("encoder.final_layernorm.weight", "plain", ("encoder.final_layer_norm.weight",), Replicated()),
    (_D + "input_layernorm.weight", "plain", (_HD + "0.layer_norm.weight",), Replicated()),
    (_D + "self_attention.linear_qkv.weight", "qkv", _attn(_HD + "0.SelfAttention"), FusedQKV()),
    (_D + "self_attention.linear_proj.weight", "plain", (_HD + "0.SelfAttention.o.weight",), Row()),
    (_D + "pre_cross_attn_layernorm.weight", "plain", (_HD + "1.layer_norm.weight",), Replicated()),
    (_D + "cross_attention.linear_q.weight", "q", (_HD + "1.EncDecAttention.q.weight",), Column()),
    (_D + "cross_attention.linear_kv.weight", "kv",
     (_HD + "1.EncDecAttention.k.weight", _HD + "1.EncDecAttention.v.weight"), Column()),
    (_D + "cross_attention.linear_proj.weight", "plain", (_HD + "1.EncDecAttention.o.weight",), Row()),
    (_D + "pre_mlp_layernorm.weight", "plain", (_HD + "2.layer_norm.weight",), Replicated()),
    ("decoder.final_layernorm.weight", "final_norm", ("decoder.final_layer_norm.weight",), Replicated()),
)
#: the MLP of each stack: (Megatron prefix, HF prefix)
_MLPS = ((_E + "mlp.", _HE + "1.DenseReluDense."), (_D + "mlp.", _HD + "2.DenseReluDense."))
#: Megatron-Core state-dict aliases of the same modules (docs/checkpoint-formats.md §3.5, docs/checkpoint-formats.md trap T26): written too for strict loads
ALIASES = {"lm_head.output_layer.weight": "output_layer.weight", "lm_head.output_layer.bias": "output_layer.bias"}


def map_rows(cfg: T5Config) -> list[tuple[str, str, tuple[str, ...], SplitRule]]:
    """The map rows for this config: the fixed rows, the MLPs (gated or not) and the output layer."""
    rows = list(T5_TENSOR_MAP)
    for meg, hf in _MLPS:
        if cfg.gated:
            rows.append((meg + "linear_fc1.weight", "gated", (hf + "wi_0.weight", hf + "wi_1.weight"), GatedFc1()))
        else:
            rows.append((meg + "linear_fc1.weight", "plain", (hf + "wi.weight",), Column()))
        rows.append((meg + "linear_fc2.weight", "plain", (hf + "wo.weight",), Row()))
    if cfg.tie_word_embeddings:
        rows.append(("lm_head.output_layer.bias", "zero", (), VocabParallel()))
    else:
        rows.append(("lm_head.output_layer.weight", "plain", ("lm_head.weight",), VocabParallel()))
    return rows


def tensor_rules(cfg: T5Config) -> Iterator[TensorRule]:
    """Every Megatron tensor of this model with its HF map and split rule, layer placeholders filled in."""
    for name, kind, hf_names, split in map_rows(cfg):
        if "{i}" not in name:
            yield TensorRule(name, KINDS[kind](hf_names), split)
            continue
        layers = cfg.num_layers if name.startswith("encoder.") else cfg.num_decoder_layers
        for i in range(layers):
            yield TensorRule(name.format(i=i), KINDS[kind](tuple(n.format(i=i) for n in hf_names)), split)


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron-Core tensors from an HF state dict (true vocabulary rows)."""
    out = {}
    for rule in tensor_rules(cfg):
        missing = [n for n in rule.hf.hf_names if n not in hf_state]
        if missing:
            raise ConversionError(f"the HF checkpoint lacks {missing[0]}")
        out[rule.name] = rule.hf.to_canonical([hf_state[n] for n in rule.hf.hf_names], cfg).contiguous()
    return out


def megatron_to_hf(state: Mapping[str, torch.Tensor], cfg: T5Config) -> dict[str, torch.Tensor]:
    """HF tensors (as saved: ``shared.weight``, plus ``lm_head.weight`` when the head is its own tensor or the
    Megatron model ties without HF's output scaling, docs/checkpoint-formats.md §5.4) from full Megatron-Core tensors."""
    out = {}
    for rule in tensor_rules(cfg):
        if rule.name not in state:
            raise ConversionError(f"the Megatron checkpoint lacks {rule.name}")
        for name, tensor in zip(rule.hf.hf_names, rule.hf.to_hf(state[rule.name], cfg)):
            out[name] = tensor
    if cfg.tie_word_embeddings and not cfg.scale_decoder_outputs:
        out["lm_head.weight"] = out["shared.weight"]
    return out


# ------------------------------------------------------------------------------------ into / out of a model


def model_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The T5Model's parameters by Megatron name (aliases deduplicated by identity, as ``named_parameters``)."""
    return dict(model.named_parameters())


def load_into_model(model, state: Mapping[str, torch.Tensor], cfg: T5Config) -> None:
    """Copy this TP rank's shard of every full tensor in ``state`` into ``model`` (current parallel state)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = model_parameters(model)
    with torch.no_grad():
        for rule in tensor_rules(cfg):
            param = params.pop(rule.name, None)
            if param is None:
                raise ConversionError(f"the T5Model has no parameter {rule.name}")
            shard = rule.split.shard(state[rule.name], tp, rank, cfg)
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(f"{rule.name}: shard {tuple(shard.shape)} does not fit {tuple(param.shape)}")
            param.copy_(shard)
    if params:
        raise ConversionError(f"the map does not cover {len(params)} T5Model parameter(s), e.g. {sorted(params)[0]}")


def read_from_model(model, cfg: T5Config) -> dict[str, torch.Tensor]:
    """Full Megatron-Core tensors out of a (TP-sharded) T5Model: shards all-gathered over the TP group."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    params = model_parameters(model)
    out = {}
    for rule in tensor_rules(cfg):
        local = params[rule.name].detach()
        shards = [local]
        if tp > 1:
            shards = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(shards, local.contiguous(), group=group)
        out[rule.name] = rule.split.merge(shards, cfg).clone()
    return out
