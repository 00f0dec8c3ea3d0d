"""Foreign Megatron checkpoints built the way their producers build them (docs/checkpoint-formats.md §10.1), for the vocabulary tests.

* :func:`reshaping_script_checkpoint`: what Transformers' old
  ``models/megatron_gpt2/checkpoint_reshaping_and_interoperability.py`` (HF -> Megatron direction) wrote: a
  ``release`` directory, legacy nested keys (``model.language_model.{embedding,encoder}``, ``input_layernorm``,
  ``post_attention_layernorm``, ``final_layernorm``, ``word_embeddings_for_head`` on the last stage even at
  PP = 1), QKV in the checkpoint_version 3.0 order, a dummy optimizer, no ``iteration`` key, and ``args`` as a
  ``types.SimpleNamespace`` holding ``orig_vocab_size`` (true) and ``padded_vocab_size`` (padding rows are copies
  of the last real row). Re-implemented from reading that script, not copied.
* :func:`megatron_lm_null_tokenizer` (a rank function): Megatron-Core itself builds a Llama-style GPTModel at the
  padded size Megatron-LM would use for ``--tokenizer-type NullTokenizer --vocab-size V-1`` and saves it with
  ``dist_checkpointing.save`` (torch_dist, what Megatron-LM 0.16 writes by default) with the args Megatron-LM
  records; it returns its own logits as the oracle.
"""
from __future__ import annotations

import argparse
import math
import types
from pathlib import Path

import torch

TRUE_V = 1000
DIVISOR = 128
H, HEADS, LAYERS, POS = 64, 4, 2, 32


def padded(v: int, tp: int) -> int:
    m = DIVISOR * tp
    return int(math.ceil(v / m) * m)


def perturb(model, seed: int = 3) -> None:
    """Non-trivial biases and norms, so that a dropped bias or a wrong norm changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name or "ln_" in name or "layernorm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def hf_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TRUE_V, n_positions=POS, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                        activation_function="gelu_new")
    model = GPT2LMHeadModel(config)
    perturb(model)
    model.save_pretrained(path)
    return path


def _qkv_v3(t: torch.Tensor) -> torch.Tensor:
    """[3 * heads * hd, ...] (q; k; v) -> [heads * 3 * hd, ...] (checkpoint_version 3.0)."""
    rest = t.shape[1:]
    return t.reshape(3, HEADS, H // HEADS, *rest).transpose(0, 1).reshape(3 * H, *rest).contiguous()


def reshaping_script_checkpoint(hf_dir: Path, out: Path, tp: int, pp: int) -> Path:
    from safetensors.torch import load_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    vp = padded(TRUE_V, tp)
    margs = types.SimpleNamespace(
        orig_vocab_size=TRUE_V, max_position_embeddings=POS, hidden_size=H, num_layers=LAYERS,
        num_attention_heads=HEADS, ffn_hidden_size=None, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, data_parallel_size=1, make_vocab_size_divisible_by=DIVISOR, rank=0,
        tokenizer_type="GPT2BPETokenizer", bias_gelu_fusion=False, openai_gelu=True, params_dtype=torch.float32,
        padded_vocab_size=vp,
    )
    wte = sd["transformer.wte.weight"]
    wte = torch.cat([wte, wte[-1:].expand(vp - TRUE_V, -1)])
    wte_shards = torch.chunk(wte, tp)
    optimizer = {"step": 0, "param_groups": [{"lr": 0.0, "beta1": 0.0, "beta2": 0.0, "eps": 0.0,
                                               "weight_decay": 0.0, "correct_bias": False, "params": []}]}
    per_stage = LAYERS // pp
    (out / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    for p in range(pp):
        ranks: list[dict] = [{} for _ in range(tp)]
        for t in range(tp):
            model: dict = {"language_model": {"encoder": {}}}
            if p == 0:
                model["language_model"]["embedding"] = {
                    "position_embeddings": {"weight": sd["transformer.wpe.weight"]},
                    "word_embeddings": {"weight": wte_shards[t].clone()},
                }
            ranks[t] = model
        for local in range(per_stage):
            g = p * per_stage + local
            src = f"transformer.h.{g}."
            pieces = {
                "input_layernorm.weight": (sd[src + "ln_1.weight"], None),
                "input_layernorm.bias": (sd[src + "ln_1.bias"], None),
                "post_attention_layernorm.weight": (sd[src + "ln_2.weight"], None),
                "post_attention_layernorm.bias": (sd[src + "ln_2.bias"], None),
                "self_attention.query_key_value.weight": (_qkv_v3(sd[src + "attn.c_attn.weight"].t()), 0),
                "self_attention.query_key_value.bias": (_qkv_v3(sd[src + "attn.c_attn.bias"]), 0),
                "self_attention.dense.weight": (sd[src + "attn.c_proj.weight"].t(), 1),
                "self_attention.dense.bias": (sd[src + "attn.c_proj.bias"], None),
                "mlp.dense_h_to_4h.weight": (sd[src + "mlp.c_fc.weight"].t(), 0),
                "mlp.dense_h_to_4h.bias": (sd[src + "mlp.c_fc.bias"], 0),
                "mlp.dense_4h_to_h.weight": (sd[src + "mlp.c_proj.weight"].t(), 1),
                "mlp.dense_4h_to_h.bias": (sd[src + "mlp.c_proj.bias"], None),
            }
            for name, (tensor, dim) in pieces.items():
                shards = torch.chunk(tensor, tp, dim=dim) if dim is not None else [tensor] * tp
                for t in range(tp):
                    ranks[t]["language_model"]["encoder"][f"layers.{local}.{name}"] = shards[t].clone()
        if p == pp - 1:
            for t in range(tp):
                enc = ranks[t]["language_model"]["encoder"]
                enc["final_layernorm.weight"] = sd["transformer.ln_f.weight"]
                enc["final_layernorm.bias"] = sd["transformer.ln_f.bias"]
                ranks[t]["word_embeddings_for_head"] = {"weight": wte_shards[t].clone()}
        for t in range(tp):
            d = out / "release" / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"model": ranks[t], "checkpoint_version": 3.0, "args": margs, "optimizer": optimizer},
                       d / "model_optim_rng.pt")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Megatron-LM with NullTokenizer (rank function)

ITERATION = 5


def megatron_lm_args(tp: int) -> argparse.Namespace:
    """The fields Megatron-LM 0.16.1 stores for ``--tokenizer-type NullTokenizer --vocab-size 999`` and a
    Llama-style model (``--swiglu --normalization RMSNorm --position-embedding-type rope
    --disable-bias-linear --untie-embeddings-and-output-weights --group-query-attention``)."""
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=H, ffn_hidden_size=96, num_attention_heads=HEADS, group_query_attention=True,
        num_query_groups=2, kv_channels=H // HEADS, max_position_embeddings=POS, seq_length=POS,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, normalization="RMSNorm",
        layernorm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=False, bias_gelu_fusion=False,
        untie_embeddings_and_output_weights=True, tokenizer_type="NullTokenizer", vocab_size=TRUE_V - 1,
        tokenizer_model=None, make_vocab_size_divisible_by=DIVISOR, padded_vocab_size=padded(TRUE_V, tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
        transformer_impl="local", params_dtype=torch.float32, use_legacy_models=False,
    )


def megatron_lm_null_tokenizer(root: str, tp: int, tokens: torch.Tensor):
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    args = megatron_lm_args(tp)
    with distributed(RuntimeConfig(layout=Layout(tp=tp, pp=1), seed=11)):
        config = TransformerConfig(
            num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, num_query_groups=2, ffn_hidden_size=96,
            normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            bias_activation_fusion=False, tensor_model_parallel_size=tp, use_cpu_initialization=True,
            params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
            bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False,
        )
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=args.padded_vocab_size, max_sequence_length=POS, pre_process=True,
                         post_process=True, share_embeddings_and_output_weights=False,
                         position_embedding_type="rope", parallel_output=False)
        perturb(model, seed=5)  # only replicated norms: the same on every rank
        it_dir = Path(root) / f"iter_{ITERATION:07d}"
        if torch.distributed.get_rank() == 0:
            it_dir.mkdir(parents=True, exist_ok=True)
            (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        torch.distributed.barrier()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                                 "iteration": ITERATION}, str(it_dir))
        model.eval()
        with torch.no_grad():
            pos = torch.arange(tokens.shape[1]).unsqueeze(0)
            logits = model(tokens, pos, None)
        return logits.float() if torch.distributed.get_rank() == 0 else None
