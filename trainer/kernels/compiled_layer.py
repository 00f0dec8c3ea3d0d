"""Regional ``torch.compile`` of a transformer layer's elementwise work: residual adds fused with the next norm.

Why: without apex or Transformer Engine, Megatron-Core runs a layer's norms and its bias + dropout + residual
adds as separate passes over the ``[s, b, h]`` activations (Megatron-Core compiles bias-dropout-add alone, so
the residual is written, then read back by the norm). This layer forward keeps Megatron-Core's modules — the
tensor-parallel linears with their custom autograd functions (gradient-accumulation fusion into ``main_grad``,
the TP/SP collectives), the attention, the MLP — and only replaces the glue between them with small compiled
functions: input norm; attention bias + dropout + residual add + pre-MLP norm as one region; MLP bias + dropout +
residual add. Inductor emits one fused kernel per region for forward and one for backward. RoPE is a kernel of its own
(:mod:`trainer.kernels.rope`).

Why not ``torch.compile`` of the whole ``TransformerLayer.forward``: Megatron-Core 0.16 wraps the norms and
linears in its activation-offloading context manager, and dynamo cannot graph-break (around the linears' autograd
functions) inside a user context manager, so the whole frame falls back to eager — nothing would be fused.

Only the plain training case takes this path (self-attention, dense MLP, no cross-attention, no activation
offloading, no norm recompute, no inference context); everything else calls Megatron-Core's own forward.
Activation recompute ("full") re-runs this forward inside Megatron-Core's checkpoint function. Candidate of
issue 22 (``compiled_layer`` in :mod:`trainer.kernels`): on only if an H100 run measures it faster. It compiles
on CPU too (inductor's C++ backend), which is how the CPU tests check it against the eager layer.
"""
from __future__ import annotations

import types

import torch

_compile = torch.compile(dynamic=False)


@_compile
def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


@_compile
def _residual(out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
              training: bool) -> torch.Tensor:
    if bias is not None:
        out = out + bias
    return residual + torch.nn.functional.dropout(out, p=p, training=training)


@_compile
def _residual_norm(out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float, training: bool,
                   norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is not None:
        out = out + bias
    hidden = residual + torch.nn.functional.dropout(out, p=p, training=training)
    return hidden, norm(hidden)


def _norm_inline(norm: torch.nn.Module) -> bool:
    """Whether inductor should compile this norm into the region: torch's own norms yes; the Triton ones
    (``norm_kernel``) run eager next to the compiled adds — dynamo need not trace their autograd function."""
    from trainer.kernels.norm import is_triton_norm

    return not is_triton_norm(norm)


def applies(layer) -> bool:
    """Whether this layer has the plain structure the fused forward reproduces."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    return (isinstance(layer.mlp, MLP) and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
            and isinstance(layer.cross_attention, IdentityOp)
            and not getattr(layer, "recompute_input_layernorm", False)
            and not getattr(layer, "recompute_pre_mlp_layernorm", False)
            and not getattr(layer, "offload_attn_norm", False) and not getattr(layer, "offload_mlp_norm", False)
            and not getattr(layer.config, "inference_fuse_tp_communication", False))


def fused_forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                  rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                  inference_context=None, packed_seq_params=None, sequence_len_offset=None, padding_mask=None,
                  **kwargs):
    """``TransformerLayer.forward`` for training with the glue compiled; anything else goes to the eager one."""
    from megatron.core.utils import make_viewless_tensor

    if (not self.training or inference_context is not None or kwargs.get("inference_params") is not None
            or context is not None):
        return self.eager_forward(hidden_states, attention_mask=attention_mask, context=context,
                                  context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                                  rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                                  rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs)
    inline = _norm_inline(self.pre_mlp_layernorm)
    normed = _norm(self.input_layernorm, hidden_states) if inline else self.input_layernorm(hidden_states)
    attn_out, attn_bias = self.self_attention(
        normed, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
        attention_bias=attention_bias, packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
    if inline:
        hidden, normed = _residual_norm(attn_out, attn_bias, hidden_states, self.hidden_dropout, self.training,
                                        self.pre_mlp_layernorm)
    else:
        hidden = _residual(attn_out, attn_bias, hidden_states, self.hidden_dropout, self.training)
        normed = self.pre_mlp_layernorm(hidden)
    mlp_out, mlp_bias = self.mlp(normed)
    output = _residual(mlp_out, mlp_bias, hidden, self.hidden_dropout, self.training)
    # Megatron-Core's checkpoint functions reject views (see TransformerLayer._forward_mlp)
    return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), context


def install(chunk: torch.nn.Module) -> int:
    """Give every plain ``TransformerLayer`` of this chunk the fused forward (idempotent); returns how many."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    count = 0
    for layer in chunk.modules():
        if isinstance(layer, TransformerLayer) and not hasattr(layer, "eager_forward") and applies(layer):
            layer.eager_forward = layer.forward
            layer.forward = types.MethodType(fused_forward, layer)
            count += 1
    return count


def is_compiled(chunk: torch.nn.Module) -> bool:
    """Whether this chunk's layers run the fused forward (for logs and tests)."""
    return any(hasattr(m, "eager_forward") for m in chunk.modules())
