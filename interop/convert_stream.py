"""The canonical tensor stream and its HF side.

The canonical stream (DEVELOPERS.md "Shared contracts") is an iterator of ``(name, tensor)`` pairs with
Megatron-Core local-spec names at TP=1/PP=1, global layer numbers, full shapes and the true vocabulary. Every
source reads into it and every target writes from it, one tensor at a time (a fused tensor pulls its two or
three HF parts together, nothing more), so memory stays bounded by a few of the largest tensors.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from interop.errors import ConversionError
from interop.families.base import Family, ModelConfig, layer_of

Stream = Iterator[tuple[str, torch.Tensor]]


def hf_names(family: Family, cfg: ModelConfig) -> list[str]:
    """Every HF tensor name the family expects for ``cfg`` (the exact set an HF writer must emit)."""
    out = []
    for name, rule in family.canonical_names(cfg):
        layer, _ = layer_of(name)
        out.extend(n.format(i=layer) if layer is not None else n for n in rule.hf.hf_names)
    return out


def check_hf_names(family: Family, cfg: ModelConfig, present: Iterable[str], where: str = "") -> None:
    """Refuse an HF checkpoint that lacks an expected tensor or has one we would silently drop."""
    present = set(present)
    expected = set(hf_names(family, cfg))
    missing = sorted(expected - present)
    ignorable = tuple(family.hf_ignored)
    extra = sorted(
        n for n in present - expected
        if not n.endswith(ignorable) and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    )
    prefix = f"{where}: " if where else ""
    if missing:
        raise ConversionError(f"{prefix}missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise ConversionError(f"{prefix}{len(extra)} unexpected tensor(s) for {family.name}, e.g. {extra[0]}")


def hf_to_canonical(family: Family, cfg: ModelConfig, fetch: Callable[[str], torch.Tensor]) -> Stream:
    """Canonical stream from HF tensors; ``fetch(name)`` loads one HF tensor (lazily, from disk or a model)."""
    for name, rule in family.canonical_names(cfg):
        layer, _ = layer_of(name)
        parts = [fetch(n.format(i=layer) if layer is not None else n) for n in rule.hf.hf_names]
        tensor = rule.hf.to_canonical(parts, cfg)
        yield name, tensor


def canonical_to_hf(family: Family, cfg: ModelConfig, stream: Iterable[tuple[str, torch.Tensor]]) -> Stream:
    """HF ``(name, tensor)`` pairs from a canonical stream (any order; unknown names are an error)."""
    rules = family.rule_index(cfg)
    for name, tensor in stream:
        layer, template = layer_of(name)
        rule = rules.get(template)
        if rule is None:
            raise ConversionError(f"tensor {name} has no {family.name} HF mapping")
        for hf_name, part in zip(rule.hf.hf_names, rule.hf.to_hf(tensor, cfg)):
            yield (hf_name.format(i=layer) if layer is not None else hf_name), part


def hf_plan(family: Family, cfg: ModelConfig, dtype: torch.dtype,
            canonical_shape: Callable[[str, ModelConfig], tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The HF tensors ``(name, shape, dtype)`` a canonical stream of ``cfg`` turns into, in stream order (the
    ``plan`` that lets :class:`formats.checkpoint.HFCheckpointWriter` stream shards header-first); computed on
    meta tensors, so it costs no memory."""
    metas = ((name, torch.empty(canonical_shape(name, cfg), device="meta")) for name, _ in family.canonical_names(cfg))
    return [(n, tuple(t.shape), dtype) for n, t in canonical_to_hf(family, cfg, metas)]


_RULES: dict[int, tuple[ModelConfig, dict]] = {}


def rule_for(family: Family, cfg: ModelConfig, name: str):
    """The :class:`TensorRule` of a canonical name (``decoder.layers.3.…`` -> its ``{i}`` template); the
    family's rule index is built once per config object."""
    cached = _RULES.get(id(cfg))
    if cached is None or cached[0] is not cfg:
        _RULES.clear()
        cached = _RULES[id(cfg)] = (cfg, family.rule_index(cfg))
    _, template = layer_of(name)
    rule = cached[1].get(template)
    if rule is None:
        raise ConversionError(f"tensor {name} is not part of a {family.name} model")
    return rule
