"""Rank functions of the BERT tests (module-level so that gloo ranks can import them).

``outputs_at_layouts``: one 4-rank run loads many Megatron checkpoints, each at its own TP x PP (the rest of
the world is data parallel), with Megatron-Core's own loaders (``load_state_dict(strict=True)`` per rank for
``torch``, ``dist_checkpointing.load`` for ``torch_dist``; legacy keys through our canonical reader) into
Megatron-Core ``BertModel``s, and returns their outputs on the given batches.

``save_with_megatron_core``: Megatron-Core builds two tiny ``BertModel``s at TP2 (with and without the binary
head) and saves them itself, in Megatron-LM's per-rank torch layout and with ``dist_checkpointing.save``;
returns the models' own outputs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tests.bert_tiny import VOCAB
from tests.mcore_save import local_spec_config, perturb_vectors, save_both_formats

H, LAYERS, HEADS, FFN, SEQ = 64, 2, 4, 96, 32
PADDED = 128


def outputs_at_layouts(entries: list[tuple[str, int, int, int | None]], batches: list[dict]) -> dict | None:
    from megatron.core import parallel_state as ps

    from formats.layout import Layout
    from interop.checkpoints import open_source
    from interop.convert_megatron import megatron_config
    from interop.megatron_model import build_chunks, forward_outputs
    from interop.runtime import RuntimeConfig, distributed
    from interop.verification import load_weights

    results = {}
    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=1))):
        for path, tp, pp, vpp in entries:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         virtual_pipeline_model_parallel_size=vpp)
            ckpt = open_source(path)
            cfg = megatron_config(ckpt)
            chunks = build_chunks(cfg)
            load_weights(chunks, ckpt, cfg)
            outs = [forward_outputs(chunks, b, cfg) for b in batches]
            mine = outs[0] is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outs if mine else None)
            results[path] = next(g for g in gathered if g is not None)
        rank = torch.distributed.get_rank()
    return results if rank == 0 else None


def _megatron_lm_args(binary_head: bool, tp: int) -> argparse.Namespace:
    """What Megatron-LM's pretrain_bert.py records (no interop fields)."""
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        max_position_embeddings=SEQ, seq_length=SEQ, padded_vocab_size=PADDED, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, position_embedding_type="learned_absolute",
        normalization="LayerNorm", layernorm_epsilon=1e-5, add_bias_linear=True, bias_gelu_fusion=False,
        openai_gelu=False, swiglu=False, untie_embeddings_and_output_weights=False, transformer_impl="local",
        bert_binary_head=binary_head, params_dtype=torch.float32, use_legacy_models=False,
    )


def _build_bert(binary_head: bool, seed: int):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel

    config = local_spec_config(LAYERS, H, HEADS, FFN)
    torch.manual_seed(seed)
    model = BertModel(
        config=config, num_tokentypes=2 if binary_head else 0, transformer_layer_spec=bert_layer_local_spec,
        vocab_size=PADDED, max_sequence_length=SEQ, share_embeddings_and_output_weights=True,
        add_binary_head=binary_head,
    )
    perturb_vectors(model, seed)
    return model.eval()


def _own_outputs(model, b: dict) -> dict:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        types = b["tokentype_ids"] if model.embedding.tokentype_embeddings is not None else None
        logits, binary = model(b["tokens"], b["attention_mask"], tokentype_ids=types)
    out = {"logits": gather_from_tensor_model_parallel_region(logits)[..., :VOCAB].float()}
    if binary is not None:
        out["binary_logits"] = binary.float()
    return out


def save_with_megatron_core(root: str, b: dict) -> dict | None:
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    root = Path(root)
    results = {}
    with distributed(RuntimeConfig(layout=Layout(tp=2, pp=1))):
        for name, binary in (("pretraining", True), ("mlm", False)):
            model = _build_bert(binary, seed=11 if binary else 12)
            save_both_formats(model, _megatron_lm_args(binary, tp=2), root / name)
            results[name] = _own_outputs(model, b)
        rank = torch.distributed.get_rank()
    return results if rank == 0 else None
