"""The output layer and the cross entropy as one chunked kernel: the logits are never materialised.

Why: Megatron-Core's loss path keeps the ``[s, b, V]`` logits in bf16, then an fp32 copy, then the softmax
intermediates of ``vocab_parallel_cross_entropy`` — at sequence 2048, micro-batch 4 and GPT-2's padded vocabulary
(50,304) that is ~0.8 GB bf16 + several 1.6 GB fp32 passes per micro-batch, and with the vocabulary padded the
trainer's masked path (:meth:`trainer.step.GPTTrainStep._logits_loss`) adds a transpose, a clone and a fill over
it. Liger's ``LigerFusedLinearCrossEntropyFunction`` (BSD-2, Triton) walks the tokens in chunks: logits of a chunk
(bf16 GEMM), loss and logit gradient in one Triton pass (fp32 inside), then the input- and weight-gradient GEMMs —
all in the forward pass, so backward only scales. A padded vocabulary keeps its padded, 16-byte-aligned weight
rows in the GEMMs, and their logits get no probability and no gradient, as in the unfused masked path: Liger's own
function takes a bias of the dtype's lowest value on the padding columns (:func:`padding_bias`). (Telling Liger's
cross-entropy kernel the true vocabulary instead of adding that bias measured no faster: docs/experiments.md.)

Measured on one H100 (bf16, seq 2048, micro-batch 8 x 2): the Llama-3.2-1B shape (vocabulary 128,256, no padding)
with this and the other kernels ran 59.0k tok/s against 49.3k unfused, peak memory 43.0 vs 60.7 GB; the GPT-2
1.3B shape (50,257 padded to 50,304) ran slower (47.5k vs 51.7k) when the padding was instead cut off the weight:
50,257 rows make the logits' rows 100,514 bytes apart, not 16-byte aligned, and cuBLAS falls back to slow GEMMs.
A padded vocabulary keeps its rows and masks them instead (``padded_linear_cross_entropy``, on by default since an
H200 ablation measured it 1.055x the unfused loss).

Scope: tensor parallelism 1 (the vocabulary is not split; under TP the unfused vocab-parallel path stays), training
with labels, no multi-token prediction. On CPU or without Liger the same interface runs
:func:`reference_linear_cross_entropy` (plain autograd), which the CPU tests use to check the wiring against
Megatron-Core's own loss; only the Liger kernel is used for speed.
"""
from __future__ import annotations

import types

import torch

IGNORE_INDEX = -100
# Liger sizes its token chunks so that a chunk's logits hold about CHUNK_MEM_CONST·N·h elements. Its default (1)
# makes ~16 chunks at GPT-2's vocabulary and hidden 2048, and every chunk re-reads and re-writes the whole fp32
# weight-gradient accumulator ([V, h]: 0.4 GB) — measured slower than the unfused loss on an H100. 16 gives 2–4
# chunks (≤ 0.6 GB of bf16 logits per chunk at micro-batch 8, seq 2048).
CHUNK_MEM_CONST = 16


def liger_function():
    """Liger's fused linear cross-entropy autograd function, or None when Liger/Triton is not importable."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception:  # noqa: BLE001 - ImportError, or Triton failing to find a GPU backend
        return None
    return LigerFusedLinearCrossEntropyFunction


def padding_bias(weight: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """A ``[V_padded]`` logit bias in the weight's dtype: 0 on the true vocabulary, the dtype's lowest finite value
    on the padding columns (after the max shift ``exp()`` gives exactly 0: no probability, no gradient; finite, so
    no ``inf - inf``). None without padding."""
    if weight.shape[0] <= vocab_size:
        return None
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias[vocab_size:] = torch.finfo(weight.dtype).min
    return bias


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over non-ignored tokens of ``-log softmax(hidden · weightᵀ + bias)[target]`` in fp32 (autograd)."""
    logits = torch.matmul(hidden, weight.t()).float()
    if bias is not None:
        logits = logits + bias.float()
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden [N, h]``, ``weight [V, h]``, ``target [N]`` (``IGNORE_INDEX`` = no loss), optional logit ``bias
    [V]`` (no gradient) -> summed loss (0-d fp32). Liger's kernel on CUDA for 16-bit inputs, the autograd
    reference elsewhere."""
    fn = liger_function() if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) else None
    if fn is None:
        return reference_linear_cross_entropy(hidden, weight, target, bias)
    # bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
    # accum_dtype (fp32: the weight gradient is summed over the chunks in fp32, then rounded once)
    loss = fn.apply(hidden, weight, target, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", None, False, torch.float32,
                    False, False, False, None, None, CHUNK_MEM_CONST)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def fused_postprocess(self, hidden_states=None, labels=None, **kwargs):
    """Replacement for ``GPTModel._postprocess`` on one instance: with labels in training, the summed loss over
    the tokens whose label is not ``IGNORE_INDEX`` (a 0-d tensor) instead of per-token losses; everything else
    (inference, logits, multi-token prediction, non-last stages) goes to Megatron-Core's own method."""
    if (labels is None or not self.post_process or not self.training or not torch.is_grad_enabled()
            or self.config.mtp_num_layers or kwargs.get("inference_context") is not None
            or kwargs.get("mtp_in_postprocess")):
        return self._unfused_postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
    if self.share_embeddings_and_output_weights:
        weight = self.shared_embedding_or_output_weight()
    else:
        weight = self.output_layer.weight
    bias = padding_bias(weight, self.fused_ce_vocab_size)  # padded rows stay in the GEMMs (aligned), masked
    s, b, h = hidden_states.shape
    target = labels.t().reshape(s * b)  # [b, s] -> the [s, b] order of the hidden states
    return linear_cross_entropy(hidden_states.reshape(s * b, h), weight, target, bias)


def applies(model, tp_size: int) -> bool:
    """Whether the fused loss can stand in for this GPT model's output layer + loss (TP 1, no SP gather needed,
    no multi-token prediction)."""
    config = getattr(model, "config", None)
    return (tp_size == 1 and config is not None and not config.sequence_parallel and not config.mtp_num_layers
            and hasattr(model, "_postprocess") and hasattr(model, "output_layer"))


def install(model, vocab_size: int) -> None:
    """Give this ``GPTModel`` the fused loss (only its last pipeline stage ever uses it). Idempotent."""
    if not hasattr(model, "_unfused_postprocess"):
        model._unfused_postprocess = model._postprocess
    model.fused_ce_vocab_size = int(vocab_size)
    model._postprocess = types.MethodType(fused_postprocess, model)


def uses_fused_loss(model) -> bool:
    """Whether ``model`` (possibly wrapped in DDP / Float16Module) has the fused loss installed."""
    from interop.megatron_model import unwrap

    return hasattr(unwrap(model), "fused_ce_vocab_size")
