"""Megatron-LM's legacy (pre-Core) T5 checkpoint (docs/checkpoint-formats.md §2.4): nested
``language_model.{embedding, encoder, decoder}`` with ``inter_attention.*`` cross-attention, ``final_norm`` in both
stacks and ``lm_head.bias``, written by hand at TP2 from a Megatron-Core ``T5Model`` (local spec plus the final
LayerNorms a legacy T5 has) whose own logits are the oracle. The legacy checkpoint reads with those logits, converts
to torch_dist at TP1 with them kept (``verify`` agrees) and back to the legacy format, and a Transformers T5 is
refused in one line, nothing written."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests import t5_family_ranks as ranks

_LEGACY = {  # Megatron-Core module path inside a layer -> legacy name (checkpoint_version 3.0, since 2023-09)
    "input_layernorm": "input_norm", "self_attention.linear_qkv": "self_attention.query_key_value",
    "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_norm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h",
    "pre_cross_attn_layernorm": "post_inter_attention_norm", "cross_attention.linear_q": "inter_attention.query",
    "cross_attention.linear_kv": "inter_attention.key_value", "cross_attention.linear_proj": "inter_attention.dense",
}


def _legacy_state(model) -> dict:
    """This rank's Megatron-Core state dict renamed and nested the legacy way (shards are already this rank's:
    the per-head ``[q, k, v]`` / ``[k, v]`` rows are the same in both)."""
    lm = {"embedding": {}, "encoder": {}, "decoder": {}}
    state = {"language_model": lm, "lm_head": {}}
    for name, t in model.state_dict().items():
        if "_extra_state" in name or name in ("position_embeddings.weight", "output_layer.bias"):  # aliases
            continue
        head, rest = name.split(".", 1)
        if head == "embedding":
            kind, x = rest.split(".", 1)
            lm["embedding"].setdefault(kind, {})[x] = t.clone()
        elif head in ("encoder", "decoder") and rest.startswith("final_layernorm."):
            lm[head]["final_norm." + rest.split(".", 1)[1]] = t.clone()
        elif head in ("encoder", "decoder"):
            _, i, body = rest.split(".", 2)
            module, x = body.rsplit(".", 1)
            lm[head][f"layers.{i}.{_LEGACY[module]}.{x}"] = t.clone()
        elif name == "lm_head.output_layer.bias":
            state["lm_head"]["bias"] = t.clone()
        else:
            raise AssertionError(f"unexpected tensor {name}")
    return state


def save_legacy_t5(root: str, batch: dict) -> torch.Tensor | None:
    """A tied Megatron-Core T5Model (local spec + final LayerNorms, perturbed vectors) at TP2, saved by hand as a
    legacy Megatron-LM checkpoint; returns its own logits on ``batch`` (rank 0)."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.models.T5 import T5Model
    from megatron.core.models.T5.t5_spec import (
        get_t5_decoder_with_local_block_spec,
        get_t5_encoder_with_local_block_spec,
    )
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from interop.t5.forward import gather_vocab, megatron_masks
    from tests.mcore_save import local_spec_config, perturb_vectors

    with distributed(RuntimeConfig(layout=Layout(tp=2, pp=1))):
        torch.manual_seed(31)
        specs = [dataclasses.replace(fn(n), layer_norm=WrappedTorchNorm) for fn, n in (
            (get_t5_encoder_with_local_block_spec, ranks.LAYERS), (get_t5_decoder_with_local_block_spec, ranks.DEC_LAYERS))]
        model = T5Model(
            config=local_spec_config(ranks.DEC_LAYERS, ranks.H, ranks.HEADS, ranks.FFN),
            encoder_config=local_spec_config(ranks.LAYERS, ranks.H, ranks.HEADS, ranks.FFN),
            transformer_encoder_layer_spec=specs[0], transformer_decoder_layer_spec=specs[1],
            vocab_size=ranks.PADDED, max_sequence_length=ranks.SEQ, share_embeddings_and_output_weights=True,
            position_embedding_type="learned_absolute",
        ).eval()
        perturb_vectors(model, 31)
        assert model.encoder.final_layernorm is not None and model.decoder.final_layernorm is not None
        args = argparse.Namespace(**{**vars(ranks.megatron_lm_args(2, True)), "use_legacy_models": True})
        t = ps.get_tensor_model_parallel_rank()
        rank_dir = Path(root) / "iter_0000005" / f"mp_rank_{t:02d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5, "model": _legacy_state(model)},
                   rank_dir / "model_optim_rng.pt")
        if t == 0:
            (Path(root) / "latest_checkpointed_iteration.txt").write_text("5")
        enc, dec, cross = megatron_masks(batch["attention_mask"], batch["decoder_attention_mask"])
        with torch.no_grad():
            logits = gather_vocab(model(batch["tokens"], batch["decoder_tokens"], enc, dec, cross), ranks.VOCAB)
        torch.distributed.barrier()
        return logits if torch.distributed.get_rank() == 0 else None


def test_legacy_t5_reads_converts_with_logits_kept_and_refuses_hf(tmp_path):
    from interop.conversion import convert
    from interop.errors import ConversionError
    from interop.families.base import ModelConfig
    from interop.launch import run_on_ranks
    from interop.reshaping import reshape
    from interop.verification import megatron_outputs, model_batch, verify

    shape = ModelConfig(family="t5", num_layers=ranks.DEC_LAYERS, encoder_num_layers=ranks.LAYERS,
                        hidden_size=ranks.H, num_attention_heads=ranks.HEADS, ffn_hidden_size=ranks.FFN,
                        vocab_size=ranks.VOCAB, max_position_embeddings=ranks.SEQ)
    batch = model_batch(shape)
    own = run_on_ranks(save_legacy_t5, 2, str(tmp_path / "legacy"), batch, timeout_s=900)[0]
    keep = batch["decoder_attention_mask"].bool()
    out = tmp_path / "dist-tp1"
    result = reshape(tmp_path / "legacy", out, tp=1, pp=1, format="torch_dist", vocab_size=ranks.VOCAB,
                     progress=False)
    assert result.config.family == "t5" and result.config.position_embedding_type == "learned_absolute"
    logits = megatron_outputs(out, batch)["logits"]
    assert (logits[keep] - own[keep]).abs().max() < 1e-4
    assert verify(tmp_path / "legacy", out, vocab_size=ranks.VOCAB).ok
    back = tmp_path / "legacy-tp1"  # and written back in the legacy format, final norms included
    reshape(out, back, tp=1, pp=1, format="legacy", vocab_size=ranks.VOCAB, progress=False)
    assert (megatron_outputs(back, batch)["logits"][keep] - own[keep]).abs().max() < 1e-4
    stored = torch.load(next(back.rglob("model_optim_rng.pt")), weights_only=False)["model"]["language_model"]
    assert {"final_norm.weight", "final_norm.bias"} <= set(stored["decoder"]) & set(stored["encoder"])
    assert "layers.0.inter_attention.key_value.weight" in stored["decoder"]
    with pytest.raises(ConversionError, match="learned_absolute positions, linear layers with bias, LayerNorm"):
        convert(tmp_path / "legacy", tmp_path / "hf", vocab_size=ranks.VOCAB, progress=False)
    assert not (tmp_path / "hf").exists()
