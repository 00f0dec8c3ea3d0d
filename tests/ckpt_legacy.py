"""Legacy (pre-Megatron-Core) rank files in the layout of docs/checkpoint-formats.md §2.1, built by hand (the legacy model classes
are not in the megatron-core wheel): nested ``model.language_model.{embedding,encoder,output_layer}`` dicts,
stage-local ``layers.{i}`` keys, ``word_embeddings_for_head`` on the last stage when PP > 1 and tied."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

H, LAYERS, VOCAB, HEADS = 16, 4, 40, 2


def legacy_rank_model(tp: int, pp: int, t: int, p: int, gen: torch.Generator) -> dict:
    per_stage = LAYERS // pp
    enc = collections.OrderedDict()
    for i in range(per_stage):
        pre = f"layers.{i}."
        enc[pre + "input_norm.weight"] = torch.randn(H, generator=gen)
        enc[pre + "input_norm.bias"] = torch.randn(H, generator=gen)
        enc[pre + "self_attention.query_key_value.weight"] = torch.randn(3 * H // tp, H, generator=gen)
        enc[pre + "self_attention.query_key_value.bias"] = torch.randn(3 * H // tp, generator=gen)
        enc[pre + "self_attention.dense.weight"] = torch.randn(H, H // tp, generator=gen)
        enc[pre + "self_attention.dense.bias"] = torch.randn(H, generator=gen)
        enc[pre + "post_attention_norm.weight"] = torch.randn(H, generator=gen)
        enc[pre + "mlp.dense_h_to_4h.weight"] = torch.randn(4 * H // tp, H, generator=gen)
        enc[pre + "mlp.dense_4h_to_h.weight"] = torch.randn(H, 4 * H // tp, generator=gen)
        enc[pre + "self_attention.query_key_value._extra_state"] = None
    lm = collections.OrderedDict()
    model = collections.OrderedDict(language_model=lm)
    if p == 0:
        lm["embedding"] = collections.OrderedDict(
            word_embeddings={"weight": torch.randn(VOCAB // tp, H, generator=gen)},
            position_embeddings={"weight": torch.randn(8, H, generator=gen)},
        )
    if p == pp - 1:
        enc["final_norm.weight"] = torch.randn(H, generator=gen)
        enc["final_norm.bias"] = torch.randn(H, generator=gen)
    lm["encoder"] = enc
    if p == pp - 1 and pp > 1:
        model["word_embeddings_for_head"] = {"weight": torch.randn(VOCAB // tp, H, generator=gen)}
    return model


def write_legacy(root: Path, tp: int, pp: int, version: float | None = 3.0, iteration: int = 20) -> dict:
    """Save a legacy checkpoint with plain ``torch.save``; returns {(t, p): rank dict} for comparison."""
    gen = torch.Generator().manual_seed(5)
    args = argparse.Namespace(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                              max_position_embeddings=8, padded_vocab_size=VOCAB, use_legacy_models=True)
    if version is not None and version >= 3.0:
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    else:
        args.model_parallel_size = tp
    it_dir = root / f"iter_{iteration:07d}"
    out = {}
    for t in range(tp):
        for p in range(pp):
            d = it_dir / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            d.mkdir(parents=True)
            top = {"args": args, "iteration": iteration, "model": legacy_rank_model(tp, pp, t, p, gen)}
            if version is not None:
                top["checkpoint_version"] = version
            torch.save(top, d / "model_optim_rng.pt")
            out[(t, p)] = top
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return out


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, name) if isinstance(v, dict) else {name: v})
    return out
