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

- ``qkv_rope``: RoPE on the packed QKV projection output through Megatron-Core's ``fused_single_qkv_rope`` hook, one
  Triton kernel each way, no split and no gradient concatenation (:mod:`trainer.kernels.qkv_rope`); where it
  applies it replaces ``rope_fusion``. ``swiglu_kernel``: SwiGLU forward and backward as Triton kernels that read
  each input once, in place of Megatron-Core's compiled ``swiglu_fusion`` functions (:mod:`trainer.kernels.swiglu`).
  ``norm_kernel``: LayerNorm / RMSNorm as Triton kernels whose backward reads the input and the output gradient once
  (torch's reads them twice: input gradient, then weight gradient) (:mod:`trainer.kernels.norm`). On since a 1×H100
  ablation (2026-12-07, seq 2048, micro-batch 16 x 1, each against the defaults of the day in one job): Llama 1.2B
  1.020x (``qkv_rope``), 1.009x (``swiglu_kernel``), 1.021x (both), 1.003x (``norm_kernel``); GPT-2 1.3B 1.012x
  (``norm_kernel``); the same losses (BENCHMARKS.md, training speed).

- ``add_norm``: each residual add (with its bias) and the norm after it as one Triton kernel each way, the bias and
  residual gradients inside the norm's backward (:mod:`trainer.kernels.add_norm`; needs ``norm_kernel``).
  ``adamw_kernel``: the optimizer step as one Triton pass per parameter with the clip scale and the bf16 copy inside
  (:mod:`trainer.kernels.adamw`; :func:`adamw_kernel_on`, installed by the trainer on its optimizer).
  ``loss_bias_epilogue``: the padded vocabulary's masking bias added in the logits GEMM's epilogue, no bias-gradient
  sums (:class:`trainer.kernels.linear_cross_entropy._BiasEpilogueLoss`, with Liger's cross-entropy kernel).
  ``qkv_split``: the backward of Megatron-Core's QKV split packs the query, key and value gradients in one Triton
  kernel that also sums them for the QKV bias gradient, which the QKV linear then does not sum again
  (:mod:`trainer.kernels.qkv_split`; with ``bias_epilogue``: GPT-2, BERT). On since a 1×H100 ablation (2026-12-08,
  seq 2048, micro-batch 16 x 1, against the defaults of the day in one job): GPT-2 1.3B 1.017x (all four), Llama
  1.2B 1.021x (``add_norm`` and ``adamw_kernel``), the same losses (BENCHMARKS.md, training speed).

Candidates, off unless ``enabled``: ``compiled_layer`` (on a GPU in 16 bit only), regional ``torch.compile`` of each
transformer layer with its GEMMs, attention core and collectives left eager, so inductor fuses the elementwise work
between them (:mod:`trainer.kernels.compiled_layer`); 1.014x at 8 x 2 and 0.99-1.00x at 16 x 1 on a 1×H100 (noise).
``adamw_multi_tensor`` (with ``adamw_kernel``): the large parameters launched as soon as each is ready and the small
ones (biases, norm weights) in one launch per group of like ones (:mod:`trainer.kernels.adamw`); ``pinned_batches``:
the next step's micro-batches gathered and pinned while the GPU finishes the current step, and the GPT step's copies
of them asynchronous (:meth:`trainer.step.GPTTrainStep.get_batch`);
``wgrad_first_write`` (with ``grad_accum_fusion``): each linear weight's first weight-gradient GEMM of a step writes its
``main_grad`` instead of adding to zeros, and the step's zeroing of the gradient buffer skips those ranges
(:mod:`trainer.kernels.wgrad_first_write`). None of the three measured yet.
Tried and removed (measured no faster; docs/experiments.md): Liger's norms, a bias-GELU backward summing the bias
gradient, the padded-vocabulary loss by columns, gradient clipping with the norm left on the GPU.

The Triton kernels of ``qkv_rope``, ``swiglu_kernel``, ``norm_kernel``, ``add_norm``, ``adamw_kernel`` and
``qkv_split`` (:mod:`trainer.kernels.training_triton`) run under Triton's interpreter on CPU tensors too
(``TRITON_INTERPRET=1``), which is how the CPU tests check them inside tiny training runs (and that a step with them
reads no more tensor values on the host than one without). The interpreter accepts code that Triton's compiler
rejects, so ``tests/test_trainer_kernels_compile.py`` also compiles every launch of their launchers for sm_90 and
sm_80, from ``meta`` tensors of the benchmark shapes, without a GPU.
"""
from __future__ import annotations

import torch

CANDIDATES = ("compiled_layer", "adamw_multi_tensor", "pinned_batches", "wgrad_first_write")
KERNELS = ("grad_accum_fusion", "linear_cross_entropy", "padded_linear_cross_entropy", "swiglu_fusion",
           "cudnn_attention", "bias_gelu_fusion", "bias_epilogue", "rope_fusion", "sdpa_gqa", "qkv_rope",
           "swiglu_kernel", "norm_kernel", "add_norm", "adamw_kernel", "loss_bias_epilogue", "qkv_split") + CANDIDATES
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


def _mlp_swiglu(replacement=None) -> None:
    """Megatron-Core's MLP calls its fused SwiGLU through the module-level name ``bias_swiglu_impl``: point it at
    ``replacement`` (process-wide), or back at Megatron-Core's own (None)."""
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.transformer import mlp

    mlp.bias_swiglu_impl = replacement or fused_bias_swiglu.bias_swiglu_impl


def _mlp_swiglu_is(replacement) -> bool:
    from megatron.core.transformer import mlp

    return mlp.bias_swiglu_impl is replacement


def adamw_kernel_on() -> bool:
    """Whether the trainer steps its optimizer with :mod:`trainer.kernels.adamw` (a GPU, Triton importable)."""
    from trainer.kernels.norm import available

    return _on("adamw_kernel", torch.cuda.is_available() and available())


def adamw_multi_tensor_on() -> bool:
    """Whether the AdamW kernel (where :func:`adamw_kernel_on`) launches as the ``adamw_multi_tensor`` candidate."""
    from trainer.kernels.norm import available

    return _on("adamw_multi_tensor", torch.cuda.is_available() and available())


def pinned_batches_on() -> bool:
    """Whether the trainer gathers the next step's micro-batches into pinned host memory during the current step and
    the GPT step copies them to the GPU asynchronously (a GPU; candidate)."""
    return _on("pinned_batches", torch.cuda.is_available())


def wgrad_first_write_on(config) -> bool:
    """Whether the fused weight-gradient GEMMs of a model with this TransformerConfig overwrite the ranges that the
    step's zeroing leaves alone (:mod:`trainer.kernels.wgrad_first_write`; with ``grad_accum_fusion``; candidate)."""
    return _on("wgrad_first_write", bool(getattr(config, "gradient_accumulation_fusion", False)))


def norm_kernel_on(config) -> bool:
    """Whether the norms of a model with this TransformerConfig are :mod:`trainer.kernels.norm`'s (16-bit CUDA)."""
    from trainer.kernels.norm import available

    natural = torch.cuda.is_available() and bool(getattr(config, "bf16", False) or getattr(config, "fp16", False))
    return _on("norm_kernel", natural and available())


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
    process-wide one (Megatron-Core's SwiGLU function) follows the latest model built in the process."""
    from trainer.kernels import add_norm, bias_epilogue, compiled_layer, qkv_rope, qkv_split, rope, swiglu
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
        for chunk in chunks:
            # the padding mask in the logits GEMM's epilogue (``loss_bias_epilogue``; a padded vocabulary only)
            lce.install(chunk, vocab_size, bias_epilogue=_on("loss_bias_epilogue", torch.cuda.is_available()))
        names.append(name)
    if _on("compiled_layer", _gpu_16bit(cfg)):
        for chunk in chunks:
            compiled_layer.install(chunk)
        names.append("compiled_layer")
    if _on("add_norm", _gpu_16bit(cfg)) and sum([add_norm.install(c) for c in chunks]):
        names.append("add_norm")
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
        if _on("qkv_split", _gpu_16bit(cfg)) and sum([qkv_split.install(c) for c in chunks]):
            names.append("qkv_split")
    fused_activation = bool(getattr(config, "bias_activation_fusion", False))
    swiglu_on = fused_activation and bool(getattr(config, "gated_linear_unit", False))
    swiglu_kernel = swiglu_on and _on("swiglu_kernel", _gpu_16bit(cfg))
    _mlp_swiglu(swiglu.fused_bias_swiglu if swiglu_kernel else None)
    if swiglu_kernel:
        names.append("swiglu_kernel")
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


def active_in(trainer) -> dict[str, bool]:
    """:func:`active` for a set-up :class:`trainer.loop.Trainer`'s first model chunk, plus what runs outside the
    model: the optimizer's AdamW kernel and its ``adamw_multi_tensor`` launches, and steps that found their
    micro-batches gathered ahead (``pinned_batches``) — for benchmark reports and tests."""
    from trainer.kernels import adamw

    return dict(active(trainer.model[0], trainer.tc), adamw_kernel=adamw.is_installed(trainer.optimizer),
                adamw_multi_tensor=adamw.is_multi_tensor(trainer.optimizer),
                pinned_batches=trainer.prefetched_steps > 0)


def active(model, config) -> dict[str, bool]:
    """Which kernels a built model chunk (possibly wrapped) runs, by name — for benchmark reports and tests.
    ``config`` is its TransformerConfig. ``cudnn_attention`` is decided per call (:func:`sdpa_backends`)."""
    from interop.megatron_model import unwrap
    from trainer.kernels import add_norm, bias_epilogue, compiled_layer, norm, qkv_rope, qkv_split, rope, swiglu
    from trainer.kernels import linear_cross_entropy as lce
    from trainer.kernels.wgrad_first_write import tracker_of

    inner = unwrap(model)
    first_write = tracker_of(model)
    fused_activation = bool(config.bias_activation_fusion)
    fused_loss = lce.uses_fused_loss(model)
    masked = fused_loss and getattr(inner, "vocab_size", 0) > inner.fused_ce_vocab_size
    return {
        "grad_accum_fusion": bool(config.gradient_accumulation_fusion),
        "wgrad_first_write": first_write is not None and first_write.first_writes > 0,
        "linear_cross_entropy": fused_loss and not masked,
        "padded_linear_cross_entropy": masked,
        "loss_bias_epilogue": masked and inner.fused_ce_bias_epilogue and lce.liger_function() is not None,
        "swiglu_fusion": bool(config.bias_activation_fusion and config.gated_linear_unit),
        "compiled_layer": compiled_layer.is_compiled(inner),
        "add_norm": add_norm.is_installed(inner),
        "norm_kernel": any(norm.is_triton_norm(m) for m in inner.modules()),
        "bias_gelu_fusion": bool(config.bias_activation_fusion and not config.gated_linear_unit),
        "bias_epilogue": bias_epilogue.is_installed(inner),
        "qkv_split": qkv_split.is_installed(inner),
        "rope_fusion": rope.is_fused(config) and rope.applies(inner),
        "qkv_rope": qkv_rope.is_installed(config),
        "swiglu_kernel": fused_activation and config.gated_linear_unit
        and _mlp_swiglu_is(swiglu.fused_bias_swiglu),
        "sdpa_gqa": (config.num_query_groups or config.num_attention_heads) < config.num_attention_heads
        and _on("sdpa_gqa", torch.cuda.is_available() and (config.bf16 or config.fp16)),
    }
