"""A static-shape T5 decode engine over a TP=1 Megatron-Core ``T5Model`` (our :mod:`interop.t5` spec), replayed as
one CUDA graph per token.

Why: :mod:`trainer.generate_seq2seq` runs Megatron-Core's modules eagerly per decoder step — ~20 kernels and as many
Python calls per layer and step — which on a T5-large is several times slower than Transformers with a static
cache, although the decoder's weights stream in well under a millisecond. This engine is the encoder-decoder
sibling of :mod:`trainer.generate_fast` (same recipe, its constants): the encoder runs once with Megatron-Core's
own modules; every decoder layer's cross-attention K/V are computed once into static buffers; the self-attention
K/V go into a preallocated cache; every per-step value (the token, the step counter) lives in a persistent device
buffer, so one decode step is captured once in a ``torch.cuda.CUDAGraph`` and replayed for every token.

The decoder's relative position bias of step ``t`` is row ``t`` of the causal ``[heads, L, L]`` table (Megatron's
own bucketing and bias table, computed once, future keys masked with the dtype's minimum, as Transformers masks),
picked on the device by the step counter: a step attends over every cache slot, the unfilled ones masked by that
row, so one graph serves every step. The per-layer maths (RMSNorm, the q/k/v/o GEMMs on the ``T5Model``'s own
parameter tensors — no copies —, ReLU or gated tanh-GELU MLP, residuals, the tied head with its bias or the untied
head; T5 v1.0's output scaling is already folded into the decoder's final norm by the tensor map) are pure tensor
functions shared by all layers and compiled once each with ``torch.compile`` on the CUDA graph path (eager on the
CPU); the cache write and the two SDPA calls stay eager between them (see :mod:`trainer.generate_fast` for why).
Beam search reorders the filled self-attention cache by beam index outside the graph; the cross K/V of a
prompt's beams are identical and are expanded once.

Unsupported models (TP/PP > 1, learned absolute positions, biases, non-RMS norms, a core attention without our
relative bias) are reported by :func:`unsupported_reason`; :func:`trainer.generate_seq2seq.generate_seq2seq` then
uses its Megatron-Core path.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.generate_fast import CACHE_ALIGN, COMPILE, COMPILE_MODE

captures = 0  # CUDA graphs captured in this process (tests: a graph is replayed, not re-captured per step)
runs = 0  # generate calls served by this engine (tests: the engine is actually used)


@dataclass(frozen=True)
class T5DecodeArch:
    """What the decode step needs of a T5 decoder, read from the model's own config and modules."""

    num_layers: int
    heads: int
    head_dim: int
    gated: bool
    activation: Callable[[torch.Tensor], torch.Tensor]
    eps: float
    softmax_scale: float


def unsupported_reason(inner) -> str | None:
    """Why the fast engine cannot run this (unwrapped) ``T5Model``, or None when it can."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (
            ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1):
        return "tensor or pipeline parallel size > 1"
    config = inner.config
    if getattr(config, "sequence_parallel", False):
        return "sequence parallel"
    if getattr(inner, "position_embedding_type", None) != "relative":
        return f"position embedding {getattr(inner, 'position_embedding_type', None)} (not T5's relative bias)"
    if getattr(config, "num_query_groups", None) not in (None, config.num_attention_heads):
        return "grouped-query attention"
    norms = [inner.decoder.final_layernorm]
    for layer in inner.decoder.layers:
        norms += [layer.input_layernorm, layer.pre_cross_attn_layernorm, layer.pre_mlp_layernorm]
        linears = (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                   layer.cross_attention.linear_q, layer.cross_attention.linear_kv,
                   layer.cross_attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2)
        if any(getattr(lin, "weight", None) is None or getattr(lin, "bias", None) is not None for lin in linears):
            return "linear layers with biases or without their own weights (Transformer-Engine fused spec)"
        if getattr(layer.self_attention.core_attention, "softmax_scale", None) is None:
            return f"core attention {type(layer.self_attention.core_attention).__name__} (not interop.t5's)"
    if any(not isinstance(n, torch.nn.RMSNorm) for n in norms):
        return "decoder norms are not torch RMSNorm"
    if inner.share_embeddings_and_output_weights is False and inner.lm_head.output_layer.weight is None:
        return "untied head without its own weight"
    return None


def read_arch(inner) -> T5DecodeArch:
    config = inner.config
    attn = inner.decoder.layers[0].self_attention
    return T5DecodeArch(
        num_layers=len(inner.decoder.layers),
        heads=config.num_attention_heads,
        head_dim=config.kv_channels,
        gated=bool(config.gated_linear_unit),
        activation=config.activation_func,
        eps=inner.decoder.layers[0].input_layernorm.eps,
        softmax_scale=attn.core_attention.softmax_scale,
    )


@functools.lru_cache(maxsize=None)
def step_functions(arch: T5DecodeArch) -> tuple:
    """The decode step's four per-layer pure functions (weights are arguments, the architecture is closed over:
    every layer shares one compiled version). Activations are ``[B, hidden]``, one token per row; q is
    ``[B, heads, 1, d]``, the new self-attention K/V ``[2, B, heads, 1, d]`` as the cache write takes them."""
    heads, d, eps = arch.heads, arch.head_dim, arch.eps

    def norm(x, w):
        return F.rms_norm(x, (x.size(-1),), w, eps)

    def self_qkv(x, norm_w, qkv_w):
        """Norm + fused QKV (Megatron's per-head [q, k, v] layout)."""
        qkv = F.linear(norm(x, norm_w), qkv_w).view(x.size(0), heads, 3, d)
        return qkv[:, :, 0, None], qkv[:, :, 1:].permute(2, 0, 1, 3).unsqueeze(3)

    def after_self(x, attn_out, proj_w, cross_norm_w, q_w):
        """Self-attention output projection + residual, then the cross-attention query."""
        x = x + F.linear(attn_out, proj_w)
        return x, F.linear(norm(x, cross_norm_w), q_w).view(x.size(0), heads, 1, d)

    def mlp(x, attn_out, proj_w, norm_w, fc1_w, fc2_w):
        """Cross-attention output projection + residual, norm, MLP + residual."""
        x = x + F.linear(attn_out, proj_w)
        h = F.linear(norm(x, norm_w), fc1_w)
        if arch.gated:
            gate, up = h.chunk(2, dim=-1)
            h = arch.activation(gate) * up
        else:
            h = arch.activation(h)
        return x + F.linear(h, fc2_w)

    def after_cross(x, attn_out, proj_w, norm_w, fc1_w, fc2_w, next_norm_w, next_qkv_w):
        """This layer's MLP, then the next layer's norm + QKV (the residual add fuses with the norm)."""
        x = mlp(x, attn_out, proj_w, norm_w, fc1_w, fc2_w)
        return (x, *self_qkv(x, next_norm_w, next_qkv_w))

    def last(x, attn_out, proj_w, norm_w, fc1_w, fc2_w, final_norm_w, head_w, head_b):
        """The last layer's MLP, the final norm (v1.0's output scaling folded in) and the head."""
        return F.linear(norm(mlp(x, attn_out, proj_w, norm_w, fc1_w, fc2_w), final_norm_w), head_w, head_b)

    return self_qkv, after_self, after_cross, last


@functools.lru_cache(maxsize=None)
def compiled_step_functions(arch: T5DecodeArch, mode: str | None = None) -> tuple:
    """:func:`step_functions` through ``torch.compile`` (lazily, at the first call; static shapes)."""
    return tuple(torch.compile(fn, fullgraph=True, dynamic=False, mode=mode) for fn in step_functions(arch))


class Seq2SeqDecodeEngine:
    """Static buffers and the capturable decode step for ``rows`` decoder rows over ``enc_len`` encoder
    positions and up to ``max_new`` tokens; :meth:`load` fills in one batch's encoder output."""

    def __init__(self, inner, rows: int, enc_len: int, max_new: int, use_graph: bool, compile: bool | None = None):
        # submodules and tensors only, never the T5Model itself: engines live in a weak-keyed map of models
        self.arch = arch = read_arch(inner)
        self.word_embeddings = inner.embedding.word_embeddings.weight
        self.device, self.dtype = self.word_embeddings.device, self.word_embeddings.dtype
        self.rows, self.enc_len, self.max_new = rows, enc_len, max_new
        self.length = -(-max_new // CACHE_ALIGN) * CACHE_ALIGN
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graph_requested = use_graph
        self.compile = (COMPILE and self.use_graph) if compile is None else compile
        self.compiled, self.compile_failed = False, False
        self.params = list(inner.parameters())
        self.signature = tuple(p.data_ptr() for p in self.params)
        dev, shape = self.device, (rows, arch.heads, enc_len, arch.head_dim)
        self.kv_cache = torch.zeros((arch.num_layers, 2, rows, arch.heads, self.length, arch.head_dim),
                                    dtype=self.dtype, device=dev)
        self.cross_kv = torch.zeros((arch.num_layers, 2, *shape), dtype=self.dtype, device=dev)
        self.cross_bias = torch.zeros((rows, 1, 1, enc_len), dtype=self.dtype, device=dev)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write_index = torch.zeros(1, dtype=torch.long, device=dev)
        # the causal relative bias of every (query, key) pair, future keys masked: row t is step t's bias
        table = inner.decoder_relative_pos_emb._compute_bias(self.length, self.length)[0].to(self.dtype)
        future = torch.ones(self.length, self.length, dtype=torch.bool, device=dev).triu(1)
        self.self_bias = table.masked_fill(future, torch.finfo(self.dtype).min).contiguous()  # [heads, L, L]
        layers = list(inner.decoder.layers)
        self._qkv_args = [(lay.input_layernorm.weight, lay.self_attention.linear_qkv.weight) for lay in layers]
        self._self_out_args = [(lay.self_attention.linear_proj.weight, lay.pre_cross_attn_layernorm.weight,
                                lay.cross_attention.linear_q.weight) for lay in layers]
        self._mlp_args = [(lay.cross_attention.linear_proj.weight, lay.pre_mlp_layernorm.weight,
                           lay.mlp.linear_fc1.weight, lay.mlp.linear_fc2.weight) for lay in layers]
        self._kv_weights = [lay.cross_attention.linear_kv.weight for lay in layers]
        head = inner.lm_head.output_layer
        tied = inner.share_embeddings_and_output_weights
        self._head_args = (inner.decoder.final_layernorm.weight,
                           inner.shared_embedding_or_output_weight() if tied else head.weight, head.bias)
        self._fns = step_functions(arch)
        self.graph = None  # (CUDA graph, static logits)

    def fits(self, rows: int, enc_len: int, max_new: int, use_graph: bool) -> bool:
        return (rows, enc_len, use_graph) == (self.rows, self.enc_len, self.graph_requested) \
            and max_new <= self.length and tuple(p.data_ptr() for p in self.params) == self.signature

    def load(self, encoder_out: torch.Tensor, key_pad: torch.Tensor, repeat: int) -> None:
        """One batch: cross-attention K/V of every layer from the encoder output ``[s, b, h]`` (expanded to
        ``repeat`` beams per input), its padding ``[b, s]`` (True = pad) as an additive mask; step 0."""
        a = self.arch
        for i, weight in enumerate(self._kv_weights):
            kv = F.linear(encoder_out, weight).view(*encoder_out.shape[:2], a.heads, 2, a.head_dim)
            self.cross_kv[i].copy_(kv.permute(3, 1, 2, 0, 4).repeat_interleave(repeat, dim=1))
        pad = key_pad.repeat_interleave(repeat, dim=0)[:, None, None, :]
        self.cross_bias.copy_(torch.zeros_like(self.cross_bias).masked_fill(pad, torch.finfo(self.dtype).min))
        self.write_index.zero_()

    def _decode_step(self) -> torch.Tensor:
        """Logits ``[rows, padded V]`` from the persistent buffers only (no host values, no syncs): capturable."""
        a = self.arch
        self_qkv, after_self, after_cross, last = self._fns
        bias = self.self_bias.index_select(1, self.write_index)[None]  # [1, heads, 1, L]
        x = F.embedding(self.tokens, self.word_embeddings)
        q, kv = self_qkv(x, *self._qkv_args[0])
        for i in range(a.num_layers):
            self.kv_cache[i].index_copy_(3, self.write_index, kv)
            out = F.scaled_dot_product_attention(q, self.kv_cache[i, 0], self.kv_cache[i, 1], attn_mask=bias,
                                                 scale=a.softmax_scale)
            x, q = after_self(x, out.reshape(x.size(0), -1), *self._self_out_args[i])
            out = F.scaled_dot_product_attention(q, self.cross_kv[i, 0], self.cross_kv[i, 1],
                                                 attn_mask=self.cross_bias, scale=a.softmax_scale)
            out = out.reshape(x.size(0), -1)
            if i + 1 < a.num_layers:
                x, q, kv = after_cross(x, out, *self._mlp_args[i], *self._qkv_args[i + 1])
            else:
                return last(x, out, *self._mlp_args[i], *self._head_args)
        raise AssertionError("a T5 decoder has at least one layer")

    def _compile_step(self) -> None:
        """Swap in the compiled functions and run them once; on any compiler failure warn once and stay eager."""
        try:
            self._fns = compiled_step_functions(self.arch, COMPILE_MODE)
            for _ in range(2):
                self._decode_step()  # idempotent: rewrites the same cache slot from the same inputs
            self.compiled = True
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the uncompiled step, same maths
            self._fns, self.compile_failed = step_functions(self.arch), True
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            warnings.warn(f"fast T5 generation: torch.compile of the decode step failed, using the uncompiled "
                          f"step: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          stacklevel=3)

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step (PyTorch's recipe); a failed capture warns and the
        engine goes on eagerly (same results, slower)."""
        global captures
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if self.compile and not self.compiled and not self.compile_failed:
                self._compile_step()
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
                logits = self._decode_step()
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            warnings.warn(f"CUDA graph capture of the T5 decode step failed, decoding eagerly: {exc}", stacklevel=3)
            self.use_graph = False
            return
        self.graph = (graph, logits)
        captures += 1

    def decode(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Logits ``[rows, padded V]`` of one new token per row at decoder position ``step`` (the graph's
        static output when graphed: read it before the next step)."""
        self.tokens.copy_(tokens.reshape(-1))
        self.write_index.fill_(step)
        if self.use_graph:
            if self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph[0].replay()
                return self.graph[1]
        if self.compile and not self.compiled and not self.compile_failed:
            self._compile_step()
        return self._decode_step()

    def reorder(self, rows: torch.Tensor, end: int) -> None:
        """Beam search: cache row i continues old row ``rows[i]`` (filled slots only, outside the graph)."""
        part = self.kv_cache[:, :, :, :, :end]
        part.copy_(part.index_select(2, rows))


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(inner, rows: int, enc_len: int, max_new: int, use_graph: bool) -> Seq2SeqDecodeEngine:
    """The model's engine, reused across calls of the same shape (its buffers and CUDA graph are the big
    allocations and the capture the slow part); rebuilt when the shape changes or the parameters moved."""
    engine = _ENGINES.get(inner)
    if engine is None or not engine.fits(rows, enc_len, max_new, use_graph):
        _ENGINES.pop(inner, None)
        del engine  # free the old buffers before allocating new ones
        engine = Seq2SeqDecodeEngine(inner, rows, enc_len, max_new, use_graph)
        _ENGINES[inner] = engine
    return engine


def release(inner) -> bool:
    """Free the model's engine (buffers, CUDA graph) now, e.g. before training goes on."""
    return _ENGINES.pop(inner, None) is not None


class FastSeq2SeqStepper:
    """The decode loops' stepper interface (see :class:`trainer.generate_seq2seq.Seq2SeqStepper`) over a
    :class:`Seq2SeqDecodeEngine`: the encoder runs here once, then every call is one graphed decoder step."""

    last = True

    def __init__(self, inner, vocab_size: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 repeat: int, max_new: int, use_graph: bool = True):
        from megatron.core import parallel_state as ps

        from interop.t5.forward import megatron_masks

        global runs
        self.vocab_size = vocab_size
        self.pp_group = ps.get_pipeline_model_parallel_group()
        enc_mask, _, _ = megatron_masks(attention_mask)
        encoder_out = inner(input_ids, None, enc_mask, None, None, output_encoder_hidden_only=True)
        rows = input_ids.size(0) * repeat
        self.engine = engine_for(inner, rows, input_ids.size(1), max_new, use_graph)
        self.engine.load(encoder_out, enc_mask[:, 0, 0], repeat)
        self.length = 0
        runs += 1

    def __call__(self, tokens, positions, mask, all_positions: bool = False):  # noqa: ARG002 - loops' interface
        if tokens.size(1) != 1:
            raise AssertionError("the T5 decoder is fed one token per step")
        logits = self.engine.decode(tokens, self.length)
        self.length += 1
        # a copy: the graph's output buffer is overwritten by the next replay
        return logits[:, None, : self.vocab_size].to(torch.float32, copy=True)

    def start_decode(self) -> None:
        pass

    def reorder(self, rows: torch.Tensor) -> None:
        self.engine.reorder(rows, self.length)

    def broadcast(self, tensor, shape, dtype):  # noqa: ARG002 - one stage: the tokens are already here
        return tensor
