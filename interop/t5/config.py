"""The T5 architecture in Megatron terms, and its round trip through a Transformers ``T5Config``/``MT5Config``.

Why a config of its own (not :class:`interop.families.base.ModelConfig`): T5 has two stacks of possibly
different depths, a relative position bias instead of absolute positions, and the v1.0 decoder-output scaling;
the family layer is being generalised to encoder models separately, and this dataclass carries exactly what
the T5 spec, tensor map and generation need until T5 joins it. It offers the attribute names the shared split
rules and HF maps of :mod:`interop.families.base` read (``num_attention_heads``, ``num_query_groups``,
``kv_channels``, ``qkv_rows``, ``vocab_size``, ``padded_vocab_size``), so those are reused unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from interop.errors import ConversionError, LayoutError
from interop.families.base import ModelConfig, gelu_erf, gelu_tanh


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.relu(x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """Transformers' ``gelu_new`` (tanh GELU) written as Transformers writes it: torch's fused
    ``gelu(approximate='tanh')`` differs from it by up to ~5e-7 per element, enough to move a T5's logits
    by ~1e-5 and to flip near-tied beams."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


#: HF ``dense_act_fn`` -> the function Megatron-Core applies (module-level: TransformerConfig is deep-copied)
T5_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": relu,
    "gelu_new": gelu_new,  # HF "gated-gelu" means tanh GELU (docs/checkpoint-formats.md §10.3)
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": gelu_erf,
}

_HF_ARCH = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
# HF config keys that the architecture fields below own; everything else travels in ``hf`` untouched
_OWNED = {
    "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "vocab_size",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
    "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs", "model_type", "architectures",
    "dense_act_fn", "is_gated_act",
}


@dataclass
class T5Config:
    """An encoder-decoder T5 (v1.0, v1.1, mT5, Flan-T5) as Megatron-Core's ``T5Model`` builds it.

    ``tie_word_embeddings`` is the *Megatron* meaning (output layer = word embedding, plus Megatron's zero
    LM-head bias); ``scale_decoder_outputs`` is HF T5 v1.0's ``d_model ** -0.5`` on the decoder output, which
    the tensor map folds into the decoder's final norm weight (Megatron-Core has no such scaling).
    """

    num_layers: int  # encoder layers
    num_decoder_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int  # the true vocabulary (HF rows)
    activation: str = "relu"  # key of T5_ACTIVATIONS
    gated: bool = False
    norm_epsilon: float = 1e-6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    model_type: str = "t5"  # or "mt5"
    max_sequence_length: int = 512  # T5Model wants one; relative positions have no limit
    make_vocab_size_divisible_by: int = 128
    hf: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.activation not in T5_ACTIVATIONS:
            raise ConversionError(f"T5 activation {self.activation!r} is not supported "
                                  f"(known: {', '.join(sorted(T5_ACTIVATIONS))})")
        if self.model_type not in _HF_ARCH:
            raise ConversionError(f"model_type {self.model_type!r} is not a T5 (expected t5 or mt5)")

    # ---- what the shared split rules / HF maps of interop.families.base read
    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads  # T5 is multi-head attention

    @property
    def qkv_rows(self) -> int:
        return 3 * self.num_attention_heads * self.kv_channels

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule (docs/checkpoint-formats.md §4.2): round V up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_layout(self, tp: int, pp: int = 1) -> None:
        if pp != 1:
            raise LayoutError(f"PP={pp}: Megatron-Core 0.16's T5Model runs at PP=1 only (see interop.t5)")
        if self.num_attention_heads % tp or self.ffn_hidden_size % tp:
            raise LayoutError(f"TP={tp} does not divide {self.num_attention_heads} heads and FFN size "
                              f"{self.ffn_hidden_size}")

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    # ---- Megatron-Core
    def transformer_config(self, num_layers: int, **overrides: Any):
        """A ``TransformerConfig`` for one stack (``num_layers`` deep); CPU-safe defaults, overrides win."""
        stack = ModelConfig(
            family="t5", num_layers=num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_sequence_length, normalization="RMSNorm",
            norm_epsilon=self.norm_epsilon, add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=self.gated,
        )  # the family layer's CPU-safe Megatron-Core defaults, with T5's activation
        return stack.to_transformer_config(activation_func=T5_ACTIVATIONS[self.activation], **overrides)

    # ---- Transformers
    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, *, untied_lm_head: bool | None = None) -> "T5Config":
        """From a Transformers config (object or ``config.json`` dict).

        ``untied_lm_head``: whether the checkpoint has its own ``lm_head.weight`` (Transformers >= 5 always
        reports ``tie_word_embeddings=True`` for T5, so only the files can tell); None guesses from the
        config: T5 v1.1 / mT5 (no output scaling) are untied.
        """
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = d.get("model_type", "t5")
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConversionError(f"feed_forward_proj {proj!r} is not '<act>' or 'gated-<act>'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if model_type == "mt5":
            scale = False  # MT5 never rescales the decoder output (transformers 5.24 modeling_mt5)
        elif "scale_decoder_outputs" in d:
            scale = bool(d["scale_decoder_outputs"])
        else:
            scale = d.get("tie_word_embeddings", True) is not False
        untied = (not scale) if untied_lm_head is None else untied_lm_head
        return cls(
            num_layers=int(d["num_layers"]),
            num_decoder_layers=int(d.get("num_decoder_layers") or d["num_layers"]),
            hidden_size=int(d["d_model"]),
            num_attention_heads=int(d["num_heads"]),
            kv_channels=int(d["d_kv"]),
            ffn_hidden_size=int(d["d_ff"]),
            vocab_size=int(d["vocab_size"]),
            activation=act,
            gated=len(parts) == 2,
            norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            tie_word_embeddings=not untied,
            scale_decoder_outputs=scale,
            model_type=model_type,
            hf={k: v for k, v in d.items() if k not in _OWNED and not k.startswith("_")},
        )

    def to_hf(self) -> dict[str, Any]:
        """``config.json`` content. ``tie_word_embeddings`` carries the output scaling, which is what both
        Transformers 4.x (untie + no scaling when false) and 5.x (``scale_decoder_outputs``) read from it;
        whether ``lm_head`` is its own tensor follows from ``lm_head.weight`` being in the files (docs/checkpoint-formats.md §10.3)."""
        if self.model_type == "mt5" and self.scale_decoder_outputs:
            raise ConversionError("an mT5 cannot scale its decoder output: Transformers' MT5 never does")
        act = "gelu" if self.activation == "gelu_new" and self.gated else self.activation
        out = dict(self.hf)
        out.update(
            model_type=self.model_type,
            architectures=[_HF_ARCH[self.model_type]],
            d_model=self.hidden_size,
            d_kv=self.kv_channels,
            d_ff=self.ffn_hidden_size,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_attention_heads,
            vocab_size=self.vocab_size,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.norm_epsilon,
            feed_forward_proj=("gated-" if self.gated else "") + act,
            tie_word_embeddings=self.scale_decoder_outputs,
        )
        return out

    def hf_config_object(self):
        """The Transformers config object (``T5Config`` or ``MT5Config``)."""
        import transformers

        cls = transformers.MT5Config if self.model_type == "mt5" else transformers.T5Config
        return cls(**self.to_hf())
