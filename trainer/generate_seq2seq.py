"""Encoder-decoder generation over a Megatron-Core ``T5Model`` (:mod:`interop.t5`): greedy, sampling, beam search.

Same :class:`~trainer.generate.GenerationConfig` semantics and the same decode loops as the decoder-only
engine (:mod:`trainer.generate`: temperature -> top-k -> top-p with decay, min_new_tokens, per-sequence EOS
stopping, batched beam search with Transformers' length penalty and early stopping); only the model step
differs. The encoder runs once per prompt (beams share it); every decoder layer's cross-attention K/V are
computed once from it; the self-attention K/V go into a preallocated cache that grows by one position per
step. Megatron-Core 0.16's ``T5Model`` inference path keeps no cross-attention cache and recomputes the
relative position bias per call, so the step runs the decoder layers itself with the model's own modules
(norms, ``linear_qkv``/``linear_q``/``linear_kv``/``linear_proj`` — tensor parallel, with their reductions —
and the MLP) and :func:`interop.attention.biased_attention` over the cache.

That step is the general path: :mod:`trainer.generate_seq2seq_fast` serves TP=1 models of our spec (one CUDA
graph per token), this one TP > 1 and a T5 that Megatron-LM trained without Transformer Engine (Megatron-Core's
local spec: learned absolute decoder positions, linear biases, no final norms).

Inputs may be padded on either side (T5's relative positions do not move with the padding; learned ones do, so
``interop generate`` pads on the right; padded encoder
positions are masked out of cross-attention). Every decoder row starts from ``decoder_start_token_id`` alone,
so the decoder needs no padding. TP ranks hold identical gathered logits and so choose identical tokens
(sampling included: same seed, same generator); PP must be 1 (Megatron-Core's T5Model runs at PP=1 only).
"""
from __future__ import annotations

import torch

from trainer.errors import TrainConfigError
from trainer.generate import GenerationConfig, GenerationOutput, beam_loop, sample_loop


class _NoDecoderPadding:
    """The decode loops' mask/position source: decoder rows are never padded and T5 has no position ids."""

    def prefill(self):
        return None, None

    def decode(self, step: int):  # noqa: ARG002 - the loops' interface
        return None, None

    def reorder(self, rows: torch.Tensor) -> None:  # noqa: ARG002
        pass


def _with_bias(output: tuple) -> torch.Tensor:
    """A Megatron module's ``(output, bias)`` with the bias added (row-parallel layers skip the add for the
    fused bias-dropout-add; T5 proper has no biases, a Megatron-LM T5 without TE does)."""
    out, bias = output
    return out if bias is None else out + bias


class Seq2SeqStepper:
    """One decoder step over ``[rows, s]`` tokens with cached encoder output; the loops' stepper interface
    (``__call__``, ``start_decode``, ``reorder``, ``broadcast``, ``last``, ``pp_group``)."""

    last = True

    def __init__(self, model, vocab_size: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 repeat: int, max_len: int):
        from megatron.core import parallel_state as ps

        from interop.t5.forward import megatron_masks

        if ps.get_pipeline_model_parallel_world_size() != 1:
            raise TrainConfigError("encoder-decoder generation needs PP=1 (Megatron-Core's T5Model has no PP)")
        if getattr(model.config, "sequence_parallel", False):
            raise TrainConfigError("generation needs sequence_parallel off")
        self.model, self.vocab_size = model, vocab_size
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.layers = list(model.decoder.layers)
        attn = self.layers[0].self_attention
        self.heads, self.head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        enc_mask, _, _ = megatron_masks(attention_mask)
        encoder_out = model(input_ids, None, enc_mask, None, None, output_encoder_hidden_only=True)
        # the padding of the encoder output as an additive mask, made once for every step and layer
        pad = enc_mask.repeat_interleave(repeat, dim=0)
        self.cross_bias = torch.zeros(pad.shape, dtype=encoder_out.dtype, device=pad.device).masked_fill(
            pad, torch.finfo(encoder_out.dtype).min)
        self.cross_kv = [self._cross_kv(layer, encoder_out, repeat) for layer in self.layers]
        rows = input_ids.size(0) * repeat
        shape = (rows, self.heads, max_len, self.head_dim)
        self.cache = [(encoder_out.new_empty(shape), encoder_out.new_empty(shape)) for _ in self.layers]
        self.length = 0
        # T5 proper: the causal relative bias; a Megatron-LM T5 without TE (Megatron-Core's local spec): learned
        # absolute decoder positions instead, linear biases, no final norms
        self.relative = getattr(model, "decoder_relative_pos_emb", None) is not None
        self.bias = self._decoder_bias(max_len).to(encoder_out.dtype) if self.relative else None

    def _cross_kv(self, layer, encoder_out: torch.Tensor, repeat: int):
        """Cross-attention K and V ``[rows, heads, s_enc, d]`` from the encoder output, once."""
        kv, _ = layer.cross_attention.linear_kv(encoder_out)  # [s, b, heads * 2d], per head [k_h; v_h]
        kv = kv.view(*kv.shape[:2], self.heads, 2 * self.head_dim)
        k, v = kv.split(self.head_dim, dim=-1)
        return tuple(t.permute(1, 2, 0, 3).repeat_interleave(repeat, dim=0) for t in (k, v))

    def _decoder_bias(self, max_len: int) -> torch.Tensor:
        """This rank's heads of the causal relative bias for every (query, key) pair up to ``max_len``."""
        from megatron.core import parallel_state as ps

        bias = self.model.decoder_relative_pos_emb._compute_bias(max_len, max_len)  # [1, heads, L, L]
        rank = ps.get_tensor_model_parallel_rank()
        return bias[:, rank * self.heads:(rank + 1) * self.heads]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.heads, self.head_dim).permute(1, 2, 0, 3)  # [s, b, n·d] -> [b, n, s, d]

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(2, 0, 1, 3).reshape(t.size(2), t.size(0), self.heads * self.head_dim)

    def __call__(self, tokens, positions, mask, all_positions: bool = False):  # noqa: ARG002 - loops' interface
        from interop.attention import biased_attention, combine_masks
        from interop.t5.forward import gather_vocab

        start, seq = self.length, tokens.size(1)
        end = start + seq
        causal = combine_masks(None, True, seq, end, tokens.device) if seq > 1 else None  # one token sees all
        bias = None
        if self.relative:
            bias = self.bias[:, :, start:end, :end]
            if causal is not None:
                bias = bias.masked_fill(causal, torch.finfo(bias.dtype).min)
            causal = None
        position_ids = None if self.relative else torch.arange(start, end, device=tokens.device).expand_as(tokens)
        x = self.model.embedding(input_ids=tokens, position_ids=position_ids)  # [s, b, h]
        for layer, (k_cache, v_cache), (k_cross, v_cross) in zip(self.layers, self.cache, self.cross_kv):
            q, k, v = layer.self_attention.get_query_key_value_tensors(layer.input_layernorm(x), None)
            k_cache[:, :, start:end] = k.permute(1, 2, 0, 3)
            v_cache[:, :, start:end] = v.permute(1, 2, 0, 3)
            out = biased_attention(q.permute(1, 2, 0, 3), k_cache[:, :, :end], v_cache[:, :, :end], bias, causal,
                                   self.scale)
            x = x + _with_bias(layer.self_attention.linear_proj(self._merge(out)))
            q, _ = layer.cross_attention.linear_q(layer.pre_cross_attn_layernorm(x))
            out = biased_attention(self._heads(q), k_cross, v_cross, self.cross_bias, None, self.scale)
            x = x + _with_bias(layer.cross_attention.linear_proj(self._merge(out)))
            x = x + _with_bias(layer.mlp(layer.pre_mlp_layernorm(x)))
        if self.model.decoder.final_layernorm is not None:  # Megatron-Core's local spec has none (no TE)
            x = self.model.decoder.final_layernorm(x)
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights \
            else None
        logits = self.model.lm_head(x, word_embeddings_weight=weight)  # [s, b, Vp/TP]
        self.length = end
        return gather_vocab(logits.transpose(0, 1), self.vocab_size)

    def start_decode(self) -> None:
        pass

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues old row ``rows[i]`` (filled cache prefix only; the cross K/V of a
        prompt's beams are identical and stay)."""
        for k_cache, v_cache in self.cache:
            k_cache[:, :, : self.length] = k_cache[:, :, : self.length].index_select(0, rows)
            v_cache[:, :, : self.length] = v_cache[:, :, : self.length].index_select(0, rows)

    def broadcast(self, tensor, shape, dtype):  # noqa: ARG002 - PP=1: nothing to send
        return tensor


def generate_seq2seq(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    config: GenerationConfig,
    vocab_size: int,
    decoder_start_token_id: int = 0,
    progress: bool = False,
    engine: str = "auto",
) -> GenerationOutput:
    """Generate decoder continuations for padded encoder ``input_ids`` [B, S] (1 = real in
    ``attention_mask``) with a Megatron-Core ``T5Model`` built by :func:`interop.t5.spec.build_t5_model`.

    Call on every TP rank with the same inputs; returns the same tokens everywhere (the decoder start token
    excluded, EOS included when produced). ``vocab_size`` is the true vocabulary.
    ``engine``: "auto" runs :mod:`trainer.generate_seq2seq_fast` (static buffers, one CUDA graph replay per token
    on GPU, eager on CPU) where it applies (TP=1, our relative-bias spec), else this module's Megatron-Core path
    (the reason is kept in ``last_engine``); "megatron" forces the latter, "fast" the former (error if
    unsupported), "fast-eager" the fast engine without CUDA graphs.
    """
    from tqdm import tqdm

    from interop.megatron_model import unwrap

    if engine not in ENGINES:
        raise TrainConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")

    if config.return_prompt_logits:
        raise TrainConfigError("return_prompt_logits is for decoder-only prompts; T5's decoder has none")
    if input_ids.dim() != 2 or input_ids.size(0) == 0 or input_ids.size(1) == 0:
        raise TrainConfigError(
            f"input_ids must be [batch, length] with at least one token, got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise TrainConfigError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                               f"{tuple(input_ids.shape)}")
    inner = unwrap(model[0] if isinstance(model, (list, tuple)) else model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    beams = config.num_beams
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows = input_ids.size(0) * beams
    start = torch.full((rows, 1), decoder_start_token_id, dtype=torch.long, device=device)
    eos = torch.tensor(list(config.eos_token_ids), dtype=torch.long, device=device)
    bar = tqdm(total=config.max_new_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            stepper = _make_stepper(engine, inner, vocab_size, input_ids, attention_mask, beams,
                                    config.max_new_tokens)
            loop = beam_loop if beams > 1 else sample_loop
            return loop(stepper, _NoDecoderPadding(), start, config, eos, device, bar)
    finally:
        bar.close()
        if was_training:
            inner.train()


ENGINES = ("auto", "megatron", "fast", "fast-eager")
#: (engine that ran the last call: "fast" or "megatron", why the fast one did not apply or None)
last_engine: tuple[str, str | None] = ("", None)


def _make_stepper(engine: str, inner, vocab_size: int, input_ids, attention_mask, beams: int, max_new: int):
    global last_engine
    reason = "engine='megatron' requested"
    if engine != "megatron":
        from trainer.generate_seq2seq_fast import FastSeq2SeqStepper, unsupported_reason

        reason = unsupported_reason(inner)
        if reason is None:
            last_engine = ("fast", None)
            return FastSeq2SeqStepper(inner, vocab_size, input_ids, attention_mask, beams, max_new,
                                      use_graph=engine != "fast-eager")
        if engine != "auto":
            raise TrainConfigError(f"the fast T5 generation engine does not support this model: {reason}")
    last_engine = ("megatron", reason)
    return Seq2SeqStepper(inner, vocab_size, input_ids, attention_mask, beams, max_new)
