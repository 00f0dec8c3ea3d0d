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


class _BiasEpilogueLoss(torch.autograd.Function):
    """Liger's chunked loss with the logit bias added in the logits GEMM's epilogue (``loss_bias_epilogue``).

    Why: Liger's function adds a logit bias as a separate in-place pass over every chunk of logits and sums the
    bias gradient over every chunk of logit gradients — two passes over ``[tokens, V]`` that the padding mask
    (:func:`padding_bias`, which needs no gradient) does not need: on a 1×H100 profile of the GPT-2 1.3B step (seq
    2048, micro-batch 16, 2026-12-07) about 5 ms. Here ``addmm(bias, x, Wᵀ)`` adds it in cuBLASLt's epilogue, and
    the rest is Liger's recipe with Liger's cross-entropy kernel: per chunk of tokens the logits, then loss and logit
    gradient in place (fp32 inside), then the input gradient and the fp32 weight gradient; backward only scales.
    The summed loss needs no count of the non-ignored tokens (Liger's function reads one with a host sync)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias):
        import triton
        from liger_kernel.ops.cross_entropy import MAX_FUSED_SIZE, liger_cross_entropy_kernel

        from trainer.kernels.grad_accum import accumulate

        n, h = hidden.shape
        vocab = weight.shape[0]
        chunk = min(n, triton.next_power_of_2(-(-n // -(-vocab // (CHUNK_MEM_CONST * h)))))  # Liger's sizing
        grad_input = torch.empty_like(hidden)
        grad_weight = torch.zeros(vocab, h, dtype=torch.float32, device=hidden.device)
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # ignored tokens are not written
        logits = torch.empty(chunk, vocab, dtype=hidden.dtype, device=hidden.device)
        block = min(MAX_FUSED_SIZE, triton.next_power_of_2(vocab))
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            x, out = hidden[start:end], logits[: end - start]
            torch.addmm(bias, x, weight.t(), out=out)
            liger_cross_entropy_kernel[(end - start,)](
                X_ptr=out, X_stride=out.stride(0), Y_ptr=target[start:end], Y_stride=1, weight_ptr=None,
                loss_ptr=losses[start:end], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None,
                token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=vocab,
                n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=IGNORE_INDEX,
                lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False,
                HAS_SOFTCAPPING=False, HAS_GRADIENTS=True, BLOCK_SIZE=block, num_warps=32)
            torch.mm(out, weight, out=grad_input[start:end])  # ``out`` now holds the logit gradient
            accumulate(x, out, grad_weight)  # += outᵀ·x in fp32, as the linear layers' wgrad GEMMs
        ctx.save_for_backward(grad_input, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input * grad.to(grad_input.dtype), (grad_weight * grad).to(ctx.weight_dtype), None, None


def _bias_epilogue_loss_runs(hidden: torch.Tensor, bias) -> bool:
    """Whether :class:`_BiasEpilogueLoss` takes these inputs: a logit bias, Liger importable, the kernel's device
    (CUDA 16-bit, or the CPU under Triton's interpreter)."""
    from trainer.kernels.triton_dispatch import triton_runs

    return bias is not None and liger_function() is not None and triton_runs(hidden)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, bias_epilogue: bool = False) -> torch.Tensor:
    """``hidden [N, h]``, ``weight [V, h]``, ``target [N]`` (``IGNORE_INDEX`` = no loss), optional logit ``bias
    [V]`` (no gradient) -> summed loss (0-d fp32). Liger's kernel on CUDA for 16-bit inputs (with a bias and
    ``bias_epilogue``: :class:`_BiasEpilogueLoss`), the autograd reference elsewhere."""
    if bias_epilogue and _bias_epilogue_loss_runs(hidden, bias):
        return _BiasEpilogueLoss.apply(hidden, weight, target, bias)
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
    return linear_cross_entropy(hidden_states.reshape(s * b, h), weight, target, bias,
                                bias_epilogue=getattr(self, "fused_ce_bias_epilogue", False))


def applies(model, tp_size: int) -> bool:
    """Whether the fused loss can stand in for this GPT model's output layer + loss (TP 1, no SP gather needed,
    no multi-token prediction)."""
    config = getattr(model, "config", None)
    return (tp_size == 1 and config is not None and not config.sequence_parallel and not config.mtp_num_layers
            and hasattr(model, "_postprocess") and hasattr(model, "output_layer"))


def install(model, vocab_size: int, bias_epilogue: bool = False) -> None:
    """Give this ``GPTModel`` the fused loss (only its last pipeline stage ever uses it); ``bias_epilogue``: a
    padded vocabulary's mask in the GEMM's epilogue (``loss_bias_epilogue``). Idempotent."""
    if not hasattr(model, "_unfused_postprocess"):
        model._unfused_postprocess = model._postprocess
    model.fused_ce_vocab_size = int(vocab_size)
    model.fused_ce_bias_epilogue = bool(bias_epilogue)
    model._postprocess = types.MethodType(fused_postprocess, model)


def uses_fused_loss(model) -> bool:
    """Whether ``model`` (possibly wrapped in DDP / Float16Module) has the fused loss installed."""
    from interop.megatron_model import unwrap

    return hasattr(unwrap(model), "fused_ce_vocab_size")
