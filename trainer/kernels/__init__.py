"""Fused training kernels for the trainer's Megatron-Core models, chosen automatically.

Each kernel is switched on only where it applies (a CUDA device, 16-bit mixed precision, the layout it
supports, its package importable); everywhere else the unfused Megatron-Core path runs, with nothing for the
user to set. ``disabled`` (benchmark ablations) switches a kernel off by name; ``forced`` (CPU tests) switches
one on where it would not apply by itself, so its wiring can be tested against the unfused path on CPU ranks.
The ``CANDIDATES`` are built and tested but stay off until a GPU run shows them faster: ``enabled`` switches
one on where it applies (``tools/bench/bench_train_gpu.py --enable``, its ablation mode).

- ``grad_accum_fusion``: weight-gradient GEMMs accumulate straight into the fp32 ``main_grad``
  (:mod:`trainer.kernels.grad_accum`; Megatron-Core's ``gradient_accumulation_fusion`` without apex); a
  ``main_grad`` view off a 16-byte boundary gets an aligned fp32 GEMM + add instead (cuBLAS's slow kernels).
- ``linear_cross_entropy``: output layer + cross entropy in chunks, no logits tensor
  (:mod:`trainer.kernels.linear_cross_entropy`, Liger's kernel; TP 1, bf16 and an unpadded vocabulary only).
- ``swiglu_fusion``: Megatron-Core's own fused SwiGLU (``bias_activation_fusion`` for gated SiLU MLPs).
- ``cudnn_attention``: PyTorch's SDPA tries cuDNN's fused attention first (Hopper-tuned; PyTorch's default order
  puts its FlashAttention-2 kernel first), falling back to flash / memory-efficient / math for inputs cuDNN
  does not take (:func:`sdpa_backends`, used by :class:`trainer.attention.SDPAttention`).
- ``padded_linear_cross_entropy``: the fused loss for a padded vocabulary (GPT-2's 50,257 -> 50,304); the
  padded weight rows stay in the GEMMs (aligned) and a lowest-value bias masks their logits. On since an
  H200 ablation (2026-12-07, GPT-2 1.3B, seq 2048, micro-batch 8 x 2) measured it 1.055x the unfused loss,
  4.7 GB less peak memory, the same loss after 15 steps (BENCHMARKS.md, training speed).
- ``bias_gelu_fusion``: Megatron-Core's compiled bias + tanh-GELU for MLPs whose activation is exactly that
  (GPT-2's ``gelu_new``; never BERT's erf GELU): one kernel each way instead of a broadcast add, a GELU and its
  backward. ``bias_epilogue``: the QKV bias added in the GEMM's epilogue (:mod:`trainer.kernels.bias_epilogue`).
  ``rope_fusion``: Megatron-Core's RoPE compiled (:mod:`trainer.kernels.rope`). ``sdpa_gqa``: grouped keys and
  values straight into SDPA (``enable_gqa``) instead of repeated per query head. On since a 1×H100 ablation
  (2026-12-07, seq 2048, micro-batch 8 x 2, each alone against the defaults of the day in one job): GPT-2 1.3B
  1.021x and 1.018x, Llama 1.2B 1.057x and 1.021x, the same losses (BENCHMARKS.md, training speed).

Candidates (issue 22; GPU + bf16 only), off unless ``enabled``: ``compiled_layer`` measured 1.008x on an H200
(GPT-2, noise); ``liger_norm`` 1.002x (GPT-2) and 0.994x (Llama) in the 1×H100 job above:

- ``liger_norm``: Liger's Triton LayerNorm / RMSNorm forward + backward in place of torch's norms
  (:mod:`trainer.kernels.liger_norm`).
- ``compiled_layer``: regional ``torch.compile`` of each transformer layer with its GEMMs, attention core and
  collectives left eager, so inductor fuses the elementwise work between them (norms with the residual adds)
  (:mod:`trainer.kernels.compiled_layer`).
- ``qkv_rope``: RoPE on the packed QKV projection output through Megatron-Core's ``fused_single_qkv_rope`` hook, one
  Triton kernel each way, no split and no gradient concatenation (:mod:`trainer.kernels.qkv_rope`); where it
  applies it replaces ``rope_fusion``.
- ``swiglu_kernel``: SwiGLU forward and backward as Triton kernels that read each input once, in place of
  Megatron-Core's compiled ``swiglu_fusion`` functions (:mod:`trainer.kernels.swiglu`).
- ``gelu_bias_grad``: the backward pass of ``bias_gelu_fusion`` as a Triton kernel that also sums the bias gradient
  (:mod:`trainer.kernels.bias_gelu_grad`).
- ``padded_loss_columns``: ``padded_linear_cross_entropy`` telling Liger's kernel the true vocabulary instead of
  adding a masking bias to every logit (:mod:`trainer.kernels.linear_cross_entropy`).

The Triton kernels of ``qkv_rope``, ``swiglu_kernel`` and ``gelu_bias_grad`` (:mod:`trainer.kernels.training_triton`)
run under Triton's interpreter on CPU tensors too (``TRITON_INTERPRET=1``), which is how the CPU tests check them
inside tiny training runs. None of the four has run on a GPU yet (written 2026-12-07; no device was lent after the
profile that motivated them): their GPU tests and ablation rows 23–26 of ``tools/bench/bench_train_gpu.py`` wait.
"""
from __future__ import annotations

import torch

CANDIDATES = ("liger_norm", "compiled_layer", "qkv_rope", "swiglu_kernel", "gelu_bias_grad", "padded_loss_columns")
KERNELS = ("grad_accum_fusion", "linear_cross_entropy", "padded_linear_cross_entropy", "swiglu_fusion",
           "cudnn_attention", "bias_gelu_fusion", "bias_epilogue", "rope_fusion", "sdpa_gqa") + CANDIDATES
disabled: set[str] = set()
enabled: set[str] = set()
forced: set[str] = set()


def _on(name: str, natural: bool) -> bool:
    default = name not in CANDIDATES or name in enabled
    return name not in disabled and ((natural and default) or name in forced)


def _gpu_16bit(cfg) -> bool:
    return torch.cuda.is_available() and cfg.mixed_precision in ("bf16", "fp16")


def _gpu_bf16(bf16: bool) -> bool:
    return torch.cuda.is_available() and bf16


def _mlp_activation(attr: str, replacement=None) -> None:
    """Megatron-Core's MLP calls its fused activations through module-level names (``bias_swiglu_impl``,
    ``bias_gelu_impl``): point one at ``replacement`` (process-wide), or back at Megatron-Core's own (None)."""
    from megatron.core.fusions import fused_bias_gelu, fused_bias_swiglu
    from megatron.core.transformer import mlp

    own = {"bias_swiglu_impl": fused_bias_swiglu.bias_swiglu_impl, "bias_gelu_impl": fused_bias_gelu.bias_gelu_impl}
    setattr(mlp, attr, replacement or own[attr])


def _mlp_activation_is(attr: str, replacement) -> bool:
    from megatron.core.transformer import mlp

    return getattr(mlp, attr) is replacement


def liger_norm_on(config) -> bool:
    """Whether the norms of a model with this TransformerConfig are Liger's (:mod:`trainer.kernels.liger_norm`)."""
    from trainer.kernels import liger_norm

    return _on("liger_norm", _gpu_bf16(bool(getattr(config, "bf16", False))) and liger_norm.available())


def config_overrides(cfg, model_config=None) -> dict:
    """TransformerConfig fields for the kernels that Megatron-Core switches itself (set before layers are built)."""
    from trainer.kernels import grad_accum

    out = {}
    if _on("grad_accum_fusion", _gpu_16bit(cfg) and grad_accum.cuda_kernel_available()):
        grad_accum.install()
        out["gradient_accumulation_fusion"] = True
    gated_silu = model_config is not None and getattr(model_config, "gated_linear_unit", False) \
        and getattr(model_config, "activation", None) == "silu"
    if gated_silu and _on("swiglu_fusion", _gpu_16bit(cfg)):
        # Megatron-Core recognises SwiGLU by identity (``activation_func is F.silu``); ours is the same function
        out.update(bias_activation_fusion=True, activation_func=torch.nn.functional.silu)
    if bias_gelu_applies(model_config) and _on("bias_gelu_fusion", _gpu_16bit(cfg)):
        # Megatron-Core's fused bias + GELU is the tanh approximation (GPT-2's ``gelu_new``), compiled; it
        # recognises GELU by identity (``activation_func is F.gelu``) and never calls that function itself
        out.update(bias_activation_fusion=True, activation_func=torch.nn.functional.gelu)
    return out


def bias_gelu_applies(model_config) -> bool:
    """Whether Megatron-Core's fused bias + tanh-GELU computes this model's MLP activation exactly: tanh GELU
    (never the erf GELU of BERT), a bias on the first MLP linear, no gated unit."""
    return (model_config is not None and getattr(model_config, "activation", None) == "gelu_tanh"
            and getattr(model_config, "add_bias_linear", False)
            and not getattr(model_config, "gated_linear_unit", False))


def install(chunks: list, cfg, vocab_size: int, tp_size: int) -> list[str]:
    """Per-model kernels on freshly built chunks; returns the names installed (for logs and tests). The
    process-wide ones (Megatron-Core's MLP activations) follow the latest model built in the process."""
    from trainer.kernels import bias_epilogue, bias_gelu_grad, compiled_layer, qkv_rope, rope, swiglu
    from trainer.kernels import linear_cross_entropy as lce

    names = []
    # bf16 only: Liger forms the gradients in the forward pass, before fp16's loss scale could protect them.
    # Llama-3's unpadded 128,256 was faster than the unfused loss on an H100; GPT-2's padded one is faster only
    # with the padding rows kept in the weight and masked (cut off: unaligned GEMM rows, slower).
    padded = getattr(chunks[0], "vocab_size", vocab_size) if chunks else vocab_size
    # A padded vocabulary keeps its aligned rows, masked: ``padded_linear_cross_entropy``.
    name = "linear_cross_entropy" if padded == vocab_size else "padded_linear_cross_entropy"
    natural = _gpu_bf16(cfg.mixed_precision == "bf16") and lce.liger_function() is not None
    if _on(name, natural) and all(lce.applies(c, tp_size) for c in chunks):
        columns = name == "padded_linear_cross_entropy" and _on("padded_loss_columns", natural)
        for chunk in chunks:
            lce.install(chunk, vocab_size, columns=columns)
        names.append(name)
        if columns:
            names.append("padded_loss_columns")
    if _on("compiled_layer", _gpu_16bit(cfg)):
        for chunk in chunks:
            compiled_layer.install(chunk)
        names.append("compiled_layer")
    config = chunks[0].config if chunks else None
    if _on("qkv_rope", _gpu_16bit(cfg)) and chunks and all(qkv_rope.applies(c, tp_size) for c in chunks):
        for chunk in chunks:
            qkv_rope.install(chunk.config)
        names.append("qkv_rope")
    elif _on("rope_fusion", _gpu_16bit(cfg)) and any(rope.applies(c) for c in chunks):
        for chunk in chunks:
            rope.install(chunk.config)
        names.append("rope_fusion")
    if _on("bias_epilogue", _gpu_16bit(cfg)) and sum([bias_epilogue.install(c) for c in chunks]):
        names.append("bias_epilogue")
    fused_activation = bool(getattr(config, "bias_activation_fusion", False))
    swiglu_on = fused_activation and bool(getattr(config, "gated_linear_unit", False))
    swiglu_kernel = swiglu_on and _on("swiglu_kernel", _gpu_16bit(cfg))
    _mlp_activation("bias_swiglu_impl", swiglu.fused_bias_swiglu if swiglu_kernel else None)
    if swiglu_kernel:
        names.append("swiglu_kernel")
    gelu_on = fused_activation and not getattr(config, "gated_linear_unit", False)
    gelu_kernel = gelu_on and _on("gelu_bias_grad", _gpu_16bit(cfg))
    _mlp_activation("bias_gelu_impl", bias_gelu_grad.fused_bias_gelu if gelu_kernel else None)
    if gelu_kernel:
        names.append("gelu_bias_grad")
    return names


def sdpa_backends(tensor: torch.Tensor):
    """SDPA backends in priority order for this input, or None for PyTorch's own choice (CPU, 32-bit, disabled)."""
    if not (tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16) and _on("cudnn_attention", True)):
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def native_gqa(tensor: torch.Tensor) -> bool:
    """Whether SDPA gets grouped-query keys and values as they are (``enable_gqa``; cuDNN and flash attention
    read each key/value head for its group of query heads) rather than repeated to one head per query head."""
    return _on("sdpa_gqa", tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16))


def active(model, config) -> dict[str, bool]:
    """Which kernels a built model chunk (possibly wrapped) runs, by name — for benchmark reports and tests.
    ``config`` is its TransformerConfig. ``cudnn_attention`` is decided per call (:func:`sdpa_backends`)."""
    from interop.megatron_model import unwrap
    from trainer.kernels import bias_epilogue, bias_gelu_grad, compiled_layer, liger_norm, qkv_rope, rope, swiglu
    from trainer.kernels import linear_cross_entropy as lce

    inner = unwrap(model)
    fused_activation = bool(config.bias_activation_fusion)
    fused_loss = lce.uses_fused_loss(model)
    masked = fused_loss and getattr(inner, "vocab_size", 0) > inner.fused_ce_vocab_size
    return {
        "grad_accum_fusion": bool(config.gradient_accumulation_fusion),
        "linear_cross_entropy": fused_loss and not masked,
        "padded_linear_cross_entropy": masked,
        "padded_loss_columns": masked and bool(getattr(inner, "fused_ce_columns", False)),
        "swiglu_fusion": bool(config.bias_activation_fusion and config.gated_linear_unit),
        "liger_norm": any(isinstance(m, (liger_norm.LigerLayerNorm, liger_norm.LigerRMSNorm))
                          for m in inner.modules()),
        "compiled_layer": compiled_layer.is_compiled(inner),
        "bias_gelu_fusion": bool(config.bias_activation_fusion and not config.gated_linear_unit),
        "bias_epilogue": bias_epilogue.is_installed(inner),
        "rope_fusion": rope.is_fused(config) and rope.applies(inner),
        "qkv_rope": qkv_rope.is_installed(config),
        "swiglu_kernel": fused_activation and config.gated_linear_unit
        and _mlp_activation_is("bias_swiglu_impl", swiglu.fused_bias_swiglu),
        "gelu_bias_grad": fused_activation and not config.gated_linear_unit
        and _mlp_activation_is("bias_gelu_impl", bias_gelu_grad.fused_bias_gelu),
        "sdpa_gqa": (config.num_query_groups or config.num_attention_heads) < config.num_attention_heads
        and _on("sdpa_gqa", torch.cuda.is_available() and (config.bf16 or config.fp16)),
    }
