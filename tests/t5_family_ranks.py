"""Rank function of the T5 family tests: Megatron-Core builds a tiny ``T5Model`` with its *own* local specs
(what Megatron-LM trains without Transformer Engine: learned absolute positions, LayerNorm, linear biases, no
final norms) at TP2 and saves it itself, in Megatron-LM's per-rank torch layout and with
``dist_checkpointing.save``; returns the model's own logits on a batch (module-level: ranks import it)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tests.mcore_save import local_spec_config, perturb_vectors, save_both_formats

H, LAYERS, DEC_LAYERS, HEADS, FFN, SEQ, VOCAB = 64, 2, 3, 4, 96, 32, 100
PADDED = 256  # Megatron-LM pads V to a multiple of 128 x TP (TP2)


def megatron_lm_args(tp: int, tied: bool) -> argparse.Namespace:
    """What Megatron-LM's pretrain_t5.py records (no interop fields)."""
    return argparse.Namespace(
        num_layers=LAYERS, encoder_num_layers=LAYERS, decoder_num_layers=DEC_LAYERS, hidden_size=H,
        num_attention_heads=HEADS, ffn_hidden_size=FFN, max_position_embeddings=SEQ, seq_length=SEQ,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, position_embedding_type="learned_absolute", normalization="LayerNorm",
        layernorm_epsilon=1e-5, add_bias_linear=True, bias_gelu_fusion=False, openai_gelu=False, swiglu=False,
        untie_embeddings_and_output_weights=not tied, transformer_impl="local", params_dtype=torch.float32,
        use_legacy_models=False, vocab_size=VOCAB,
    )


def _build(tied: bool, seed: int):
    from megatron.core.models.T5 import T5Model
    from megatron.core.models.T5.t5_spec import (
        get_t5_decoder_with_local_block_spec,
        get_t5_encoder_with_local_block_spec,
    )

    def config(layers):
        return local_spec_config(layers, H, HEADS, FFN)

    torch.manual_seed(seed)
    model = T5Model(
        config=config(DEC_LAYERS), encoder_config=config(LAYERS),
        transformer_encoder_layer_spec=get_t5_encoder_with_local_block_spec(LAYERS),
        transformer_decoder_layer_spec=get_t5_decoder_with_local_block_spec(DEC_LAYERS),
        vocab_size=PADDED, max_sequence_length=SEQ, share_embeddings_and_output_weights=tied,
        position_embedding_type="learned_absolute",
    )
    perturb_vectors(model, seed)
    return model.eval()


def save_with_megatron_core(root: str, batch: dict) -> dict | None:
    """Save a tied and an untied local-spec T5 at TP2 (``<root>/<tied|untied>/<torch|dist>``); return each
    model's own ``[b, s_dec, V]`` logits on ``batch`` (``tokens``/``attention_mask`` and ``decoder_*``)."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from interop.t5.forward import gather_vocab, megatron_masks

    root = Path(root)
    results = {}
    with distributed(RuntimeConfig(layout=Layout(tp=2, pp=1))):
        for name, tied in (("tied", True), ("untied", False)):
            model = _build(tied, seed=21 if tied else 22)
            save_both_formats(model, megatron_lm_args(2, tied), root / name)
            enc, dec, cross = megatron_masks(batch["attention_mask"], batch["decoder_attention_mask"])
            with torch.no_grad():
                logits = model(batch["tokens"], batch["decoder_tokens"], enc, dec, cross)
            results[name] = gather_vocab(logits, VOCAB)
        rank = torch.distributed.get_rank()
    return results if rank == 0 else None


def save_tp1_and_greedy_reference(root: str, inputs: list[list[int]], new_tokens: int) -> dict:
    """A tied local-spec T5 saved by Megatron-Core at TP1 (``<root>/torch``) and the reference greedy tokens of
    Megatron-Core's own full ``T5Model.forward`` (re-run over the whole decoder input each step, argmax of the
    last position, start token 0) per input, unpadded (learned positions: the input alone is the oracle), and
    why the fast T5 engine declines it. Cross-attention weights and positions are scaled up, the output bias down,
    so that the tokens depend on the input and the decoder position (else every step repeats one token)."""
    from trainer.generate_seq2seq_fast import unsupported_reason

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from interop.t5.forward import gather_vocab, megatron_masks

    out = {}
    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=1))):
        model = _build(True, seed=23)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "cross_attention.linear" in name and name.endswith("weight"):
                    p.mul_(4)
            model.lm_head.output_layer.bias.mul_(0.2)
            model.embedding.position_embeddings.weight.mul_(5)
        args = megatron_lm_args(1, True)
        args.true_vocab_size = VOCAB  # Megatron-LM's --true-vocab-size: what a generate call needs to know
        save_both_formats(model, args, Path(root))
        out["reason"] = unsupported_reason(model)
        for i, row in enumerate(inputs):
            ids = torch.tensor([row])
            enc, _, cross = megatron_masks(torch.ones_like(ids))
            dec = torch.zeros((1, 1), dtype=torch.long)
            with torch.no_grad():
                for _ in range(new_tokens):
                    logits = gather_vocab(model(ids, dec, enc, None, cross), VOCAB)
                    dec = torch.cat((dec, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            out[i] = dec[0, 1:].tolist()
    return out
