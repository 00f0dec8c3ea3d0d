"""A human/JSON summary of any checkpoint for ``interop inspect``: computed from listings and args only.

The family guess and parameter count here are deliberately shallow (names, shapes, a few args): precise
architecture knowledge lives in ``interop.families``; ``inspect`` must work even where that does not apply. It
lives in ``interop``, not ``formats``, because guessing a family and knowing which tensors every TP rank holds
whole is model knowledge.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from formats.checkpoint import HFCheckpoint, MegatronCheckpoint, TensorInfo, format_of
from formats.checkpoint.common import dtype_name

# Per-rank tensors that every TP rank holds whole (docs/checkpoint-formats.md §4.1); everything else is split TP ways.
_REPLICATED = ("norm", "position_embeddings", "tokentype_embeddings", "linear_proj.bias", "linear_fc2.bias",
               "attention.dense.bias", "dense_4h_to_h.bias", "router.", "pooler.", "binary_head.", "lm_head.dense.",
               "relative_attention_bias", "lm_head.layer_norm", "lm_head.layernorm")
_ARGS_SUMMARY = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "group_query_attention", "kv_channels", "max_position_embeddings", "seq_length", "position_embedding_type",
                 "normalization", "swiglu", "add_bias_linear", "untie_embeddings_and_output_weights", "tokenizer_type",
                 "tokenizer_model", "vocab_size", "orig_vocab_size", "true_vocab_size", "make_vocab_size_divisible_by",
                 "padded_vocab_size", "transformer_impl", "use_distributed_optimizer", "bf16", "fp16", "params_dtype")


def _family_from_args(ckpt: MegatronCheckpoint, names: list[str]) -> str:
    a = ckpt.arg
    if a("encoder_num_layers") is not None or any("cross_attention" in n or "inter_attention" in n for n in names):
        return "t5"
    if a("bert_binary_head") is not None or any("binary_head" in n or "tokentype_embeddings" in n for n in names):
        return "bert"
    pos = a("position_embedding_type")
    has_pos = any(n.endswith("position_embeddings.weight") for n in names)
    if a("swiglu") or a("normalization") == "RMSNorm" or pos == "rope" or (pos is None and not has_pos):
        return "llama"
    return "gpt2"


def _family_from_hf(config: dict) -> str:
    model_type = str(config.get("model_type", "")).lower()
    archs = ",".join(config.get("architectures") or [])
    return model_type or archs or "unknown"


def _param_count_megatron(ckpt: MegatronCheckpoint) -> int:
    if not format_of(ckpt).per_rank_files:  # torch_dist: global shapes
        return sum(i.numel for i in ckpt.tensors() if not i.name.startswith("optimizer."))
    tied_copy = not ckpt.arg("untie_embeddings_and_output_weights", default=False) and ckpt.layout.pp > 1
    total = 0
    for tp, pp, ep in ckpt.rank_keys():
        if ep:
            continue
        for chunk in range(ckpt.num_chunks):
            for info in ckpt.rank_tensors(tp, pp, chunk, ep):
                if tied_copy and info.name in ("output_layer.weight", "word_embeddings_for_head.weight"):
                    continue
                if any(r in info.name for r in _REPLICATED) and tp != 0:
                    continue
                total += info.numel
    return total


def _embedding(infos: list[TensorInfo]) -> TensorInfo | None:
    for suffix in ("word_embeddings.weight", "embed_tokens.weight", "wte.weight", "shared.weight"):
        for i in infos:
            if i.name.endswith(suffix):
                return i
    return None


def summarize(ckpt: HFCheckpoint | MegatronCheckpoint) -> dict[str, Any]:
    """Everything ``inspect`` prints, as a JSON-ready dict."""
    infos = ckpt.tensors()
    dtypes = Counter(dtype_name(i.dtype) for i in infos)
    out: dict[str, Any] = {"path": str(ckpt.path), "kind": ckpt.kind, "format": ckpt.format}
    emb = _embedding(infos)
    if isinstance(ckpt, HFCheckpoint):
        out["family"] = _family_from_hf(ckpt.config)
        out["architectures"] = ckpt.config.get("architectures")
        out["files"] = ckpt.files
        out["side_files"] = [p.name for p in ckpt.side_files]
        out["parameters"] = sum(i.numel for i in infos)
        out["vocab_size"] = {"config": ckpt.config.get("vocab_size"), "embedding_rows": emb.shape[0] if emb else None}
    else:
        names = sorted({i.name for i in infos})
        per_rank = format_of(ckpt).per_rank_files
        tp = ckpt.layout.tp if per_rank else 1
        padded = emb.shape[0] * tp if emb else ckpt.arg("padded_vocab_size")
        out["family"] = _family_from_args(ckpt, names)
        out["key_style"] = ckpt.key_style
        out["layout"] = {"tp": ckpt.layout.tp, "pp": ckpt.layout.pp, "vpp": ckpt.layout.vpp, "dp": ckpt.layout.dp,
                         "ep": ckpt.layout.ep}
        out["iteration"] = ckpt.iteration
        out["release"] = ckpt.release
        out["checkpoint_version"] = ckpt.checkpoint_version
        out["parameters"] = _param_count_megatron(ckpt)
        out["vocab_size"] = {"true": None, "padded": padded}  # true: interop.vocab (inspect fills it in)
        out["optimizer"] = ckpt.optimizer_files if per_rank else (
            f"{len(ckpt.optimizer_keys)} tensor(s)" if ckpt.optimizer_keys else [])
        out["args"] = {k: _plain(ckpt.arg(k)) for k in _ARGS_SUMMARY if ckpt.arg(k) is not None}
    out["dtypes"] = dict(dtypes)
    out["num_tensors"] = len(infos)
    out["bytes"] = sum(i.nbytes for i in infos)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(getattr(value, "value", value)).removeprefix("torch.")
