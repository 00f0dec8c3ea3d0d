"""T5 (Transformers ``t5``/``mt5``) in Megatron-Core without Transformer Engine, exact to Transformers.

* :mod:`interop.t5.config` — the architecture (:class:`T5Config`) and its HF config round trip;
* :mod:`interop.t5.spec` — layer/block specs with that attention and the final norms, :func:`build_t5_model`;
* :mod:`interop.t5.tensor_map` — HF <-> Megatron-Core ``T5Model`` tensor names, folds and TP split rules;
* :mod:`interop.t5.forward` — masks and full-vocabulary logits.

Pipeline parallelism: Megatron-Core 0.16.1's ``T5Model`` runs at PP=1 only. It still has ``add_encoder`` /
``add_decoder`` and ``set_input_tensor`` for two inputs, but the encoder/decoder pipeline split is gone
(``ModelType.encoder_and_decoder`` is a deprecated alias of ``encoder_or_decoder``; no schedule reads
``xattn_needed`` or sends the encoder output along), and ``pre_process``/``post_process`` would cut *both*
stacks at the same layers, which no schedule can run. Tensor parallelism works at any TP dividing the heads
and the FFN size (the relative position bias is computed once per stack and scattered by heads).
"""
from interop.t5.config import T5Config

__all__ = ["T5Config"]
