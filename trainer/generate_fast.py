"""A static-shape decode engine over a TP=1/PP=1 Megatron-Core GPTModel, replayed as one CUDA graph per token.

Why: Megatron-Core's modules and its ``StaticInferenceContext`` spend ~40 ms of Python and kernel launches per
decode step on a 1.3B model whose weights stream in under a millisecond. This engine runs the same maths
(GPT-2 and StarCoder: learned positions, LayerNorm, tanh-GELU, biases, StarCoder's multi-query attention as one
K/V group; Llama family: rotate-half RoPE with the model's own rotary table, RMSNorm, SwiGLU, GQA/MQA, optional
QKV bias; BLOOM: ALiBi, the word-embedding LayerNorm) straight on the GPTModel's own parameter tensors
(no copies), with every per-step value held in persistent device buffers, so one decode step can be captured
once in a ``torch.cuda.CUDAGraph`` and replayed for every token. On the CPU (tests) the same code runs eagerly.

Layout: a preallocated KV cache ``[layers, 2 (K, V), batch, kv_heads, length, head_dim]`` in the model's dtype;
prefill (eager) writes the prompt's K/V into slots ``[0, S)``; decode step ``t`` writes slot ``S + t``
(``write_index``, a 1-element device tensor). Attention of a decode step, 16-bit cache on CUDA with Triton (any
head size up to 256: BLOOM-1b1's 96 too): the kernels of :mod:`trainer.decode_attention` read exactly the filled
slots (the fill level is read on the device) and write the new K/V, so one graph serves every step. Otherwise (CPU,
fp32): one ``index_copy_`` per layer writes K and V, and SDPA attends over the filled slots rounded up to
``ATTEND_BUCKET`` with a mask (slot <= write_index and not left padding); one graph is captured per attended length.
(Under Triton's interpreter, ``TRITON_INTERPRET=1``, the kernels serve fp16/fp32 CPU caches too: the CPU tests.)
ALiBi (BLOOM, :mod:`interop.alibi`): a score gets ``slope_h · (key slot − query slot)``. Transformers' BLOOM adds
``slope_h · key position`` with positions counted from a row's first real token (the attention mask's cumsum);
per query that differs by a constant (softmax cancels it), and with left padding a row's pad count shifts key
and query slots alike, so slot distances are exactly Transformers' position distances over the unmasked keys.
The relative form is ≤ 0 and small near the diagonal (bf16 keeps its precision). Prefill adds the
``[1, heads, S, S]`` bias to SDPA's mask; the SDPA decode step adds ``[heads, L]`` built from ``write_index``;
the Triton kernels add ``slope · distance`` per tile from a per-head slope vector (no bias tensor).
Unsupported models (TP/PP > 1, Transformer-Engine spec, MoE,
qk-layernorm, ...) are reported by :func:`unsupported_reason`; ``generate`` then uses the Megatron-Core path.

Compiled step (GPU, default with the CUDA graph): a decode step is ~1.5 ms of small elementwise kernels (norms,
bias adds, GELU, residuals, RoPE) around ~0.9 ms of weight streaming. The step is split into three pure tensor
functions (see :func:`step_functions`) shared by all layers (same shapes, weights passed as arguments) and
compiled once each with ``torch.compile``: inductor fuses each residual add with the following norm (across the
layer boundary too) and RoPE into few kernels; GPT-2's bias + tanh-GELU rides on the fc1 GEMM as cuBLASLt's
epilogue. The cache write and SDPA stay eager between them (in-place writes into a graph input would be
functionalised into copies of the whole cache). The compiled functions are warmed up, then captured in OUR
CUDA graphs. Compile time is therefore independent of depth. If compiling or running the compiled step fails,
the engine warns once and captures the uncompiled step instead (same maths).
``COMPILE = False`` (or ``INTEROP_FAST_COMPILE=0``) opts out.
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainer import decode_attention
from trainer.generate_model import model_and_gpt

CACHE_ALIGN = 64  # cache length rounded up: aligned masks keep SDPA on its fused kernels
# a decode step attends over the filled cache slots rounded up to this many (one CUDA graph per length):
# attention reads the whole attended K/V, ~a quarter of a step's memory traffic at full length
ATTEND_BUCKET = CACHE_ALIGN
captures = 0  # CUDA graphs captured in this process (tests check that a graph is replayed, not re-captured)
# compile the decode step's per-layer maths with torch.compile before capturing it (CUDA graph path only)
COMPILE = os.environ.get("INTEROP_FAST_COMPILE", "1") != "0"
# torch.compile mode for the step functions (None: inductor's default; e.g. "max-autotune-no-cudagraphs")
COMPILE_MODE = os.environ.get("INTEROP_FAST_COMPILE_MODE") or None
# 16-bit caches on CUDA: attention + cache write by trainer.decode_attention's Triton kernels (reads exactly the
# filled slots; one graph for every step) instead of index_copy_ + SDPA over a bucketed length
FUSED_ATTENTION = os.environ.get("INTEROP_FAST_ATTENTION", "1") != "0"
compiled_captures = 0  # of ``captures``, those whose graph replays the compiled step


@dataclass(frozen=True)
class DecodeArch:
    """The architecture the engine needs, read from a GPTModel's own config and modules."""

    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    rope: bool
    gated: bool
    activation: Callable[[torch.Tensor], torch.Tensor]
    softmax_scale: float
    learned_positions: bool = True  # a position-embedding table added to the word embedding (GPT-2, StarCoder)
    alibi: bool = False  # ALiBi core attention (BLOOM): no position embedding at all


def unsupported_reason(inner) -> str | None:
    """Why the fast engine cannot run this (unwrapped) GPTModel, or None when it can."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1
    ):
        return "tensor/pipeline parallel model"
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "decoder") or not getattr(inner, "pre_process", False) \
            or not getattr(inner, "post_process", False):
        return "not a whole GPTModel"
    checks = {
        "mixture of experts": getattr(config, "num_moe_experts", None),
        "multi-latent attention": getattr(config, "multi_latent_attention", False),
        "qk layernorm": getattr(config, "qk_layernorm", False),
        "zero-centered gamma": getattr(config, "layernorm_zero_centered_gamma", False),
        "post-layernorm residual": getattr(config, "apply_residual_connection_post_layernorm", False),
        "fp32 residual": getattr(config, "fp32_residual_connection", False),
        "sequence parallel": getattr(config, "sequence_parallel", False),
        "context parallel": getattr(config, "context_parallel_size", 1) > 1,
    }
    for reason, flag in checks.items():
        if flag:
            return reason
    if config.normalization not in ("LayerNorm", "RMSNorm"):
        return f"normalization {config.normalization}"
    kind = getattr(inner, "position_embedding_type", None)
    alibi = [is_alibi(getattr(layer.self_attention, "core_attention", None)) for layer in inner.decoder.layers]
    if kind == "none" and alibi and all(alibi):
        pass  # ALiBi: the score bias is the only position information
    elif kind not in ("learned_absolute", "rope"):
        return f"position embedding {kind}"
    elif any(alibi):
        return f"ALiBi together with {kind} position embedding"
    extra_norm = getattr(inner.embedding, "word_embeddings_layernorm", None)
    if extra_norm is not None and not isinstance(extra_norm, torch.nn.LayerNorm):
        return f"embedding norm {type(extra_norm).__name__}"
    if kind == "rope":
        rotary = getattr(inner, "rotary_pos_emb", None)
        if type(rotary).__name__ != "RotaryEmbedding" or getattr(rotary, "rotary_interleaved", False):
            return "rotary embedding variant"
    for layer in inner.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        parts = (layer.input_layernorm, layer.pre_mlp_layernorm, getattr(attn, "linear_qkv", None),
                 getattr(attn, "linear_proj", None), getattr(mlp, "linear_fc1", None), getattr(mlp, "linear_fc2", None))
        if any(p is None or type(p).__name__ == "IdentityOp" for p in parts):
            return "layer spec without separate norms/linears (Transformer-Engine fused spec)"
        if not (isinstance(layer.input_layernorm, (torch.nn.LayerNorm, torch.nn.RMSNorm))
                or type(layer.input_layernorm).__name__ == "FusedLayerNorm"):
            return f"norm module {type(layer.input_layernorm).__name__}"
    return None


def read_arch(inner) -> DecodeArch:
    config = inner.config
    head_dim = config.kv_channels
    return DecodeArch(
        num_layers=len(inner.decoder.layers),
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        groups=config.num_query_groups or config.num_attention_heads,
        head_dim=head_dim,
        rope=inner.position_embedding_type == "rope",
        gated=bool(config.gated_linear_unit),
        activation=config.activation_func,
        softmax_scale=config.softmax_scale or head_dim ** -0.5,
        learned_positions=inner.position_embedding_type == "learned_absolute",
        alibi=is_alibi(inner.decoder.layers[0].self_attention.core_attention),
    )


def is_alibi(core_attention) -> bool:
    """Whether a layer's core attention is :class:`interop.alibi.AlibiSDPAttention` (BLOOM)."""
    from interop.alibi import AlibiSDPAttention

    return isinstance(core_attention, AlibiSDPAttention)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE on the first ``rot_dim`` channels (``cos``/``sin`` broadcast to x)."""
    rot = cos.size(-1)
    if rot == x.size(-1):
        return x * cos + _rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1)


class DecodeEngine:
    """Buffers, prefill and the (capturable) decode step for ``batch`` rows and up to ``max_len`` tokens."""

    def __init__(self, inner, batch: int, max_len: int, use_graph: bool, compile: bool | None = None):
        # submodules only, never the GPTModel itself: the engine lives in a weak-keyed map of models
        self.embedding, self.final_norm = inner.embedding, inner.decoder.final_layernorm
        self.params = list(inner.parameters())
        self.arch = arch = read_arch(inner)
        weight = inner.embedding.word_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.batch, self.max_len = batch, max_len
        self.length = -(-max_len // CACHE_ALIGN) * CACHE_ALIGN
        self.graph_requested = use_graph
        self.use_graph = use_graph and self.device.type == "cuda"
        # compile: None = the module default (``COMPILE``) for the CUDA graph path, eager otherwise
        self.compile = (COMPILE and self.use_graph) if compile is None else compile
        self.compiled = False  # True once the compiled step is the one in use
        self.compile_failed = False  # tried once and fell back: not tried again for this engine
        self.signature = self._signature()
        dev = self.device
        # K and V of a layer side by side ([layers, 2, B, groups, L, d]): a decode step writes both with one kernel
        shape = (arch.num_layers, 2, batch, arch.groups, self.length, arch.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
        self.k_cache, self.v_cache = self.kv_cache[:, 0], self.kv_cache[:, 1]  # [layers, B, groups, L, d] views
        self.fused_attention = FUSED_ATTENTION and decode_attention.supported(
            self.kv_cache[0], arch.heads // arch.groups, arch.head_dim)
        # ALiBi: fp32 slopes of every head (TP1: this rank holds them all), [groups, r] as queries are grouped
        self.slopes = (inner.decoder.layers[0].self_attention.core_attention.slopes.to(dev, torch.float32)
                       .contiguous() if arch.alibi else None)
        # decode-step inputs: persistent buffers, updated with copy_/fill_ outside the graph
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.write_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.pad = torch.zeros(batch, self.length, dtype=torch.bool, device=dev)
        self.slots = torch.arange(self.length, device=dev)
        # beam search with the fused attention: cache row holding slot s of row b (the cache itself never moves)
        self.row_table = torch.arange(batch, dtype=torch.int32, device=dev)[:, None].repeat(1, self.length)
        self.use_row_table = False  # set by the first reorder, cleared by prefill (graphs are captured per mode)
        if arch.rope:
            # get_emb, not forward(): forward's lru_cache would hand this inference-mode tensor to training
            freqs = inner.rotary_pos_emb.get_emb(self.length).reshape(self.length, -1).float()  # Megatron's table
            self.cos, self.sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        self.layers = list(inner.decoder.layers)
        self.output_weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
                              else inner.output_layer.weight)
        self.graphs: dict[tuple, tuple] = {}  # (attended length, row table in use) -> (CUDA graph, static logits)
        norm = self.layers[0].input_layernorm
        self._norm_kind = "rmsnorm" if isinstance(norm, torch.nn.RMSNorm) else "layernorm"
        self._norm_eps = getattr(norm, "eps", None)
        self._layer_args = [self._layer_tensors(layer) for layer in self.layers]
        from interop.families.base import gelu_tanh

        # GPT-2's bias + tanh-GELU as cuBLASLt's epilogue of the fc1 GEMM (CUDA only: on CPU the same aten op
        # applies the exact GELU)
        fused_gelu = (self.device.type == "cuda" and arch.activation is gelu_tanh and not arch.gated
                      and all(args[1][5] is not None for args in self._layer_args))
        self._step_key = (arch, self._norm_kind, self._norm_eps, fused_gelu)
        self._step_fns = step_functions(*self._step_key)  # eager; compiled ones replace them

    def _signature(self) -> tuple:
        """Parameter storage addresses: a graph replays fixed addresses, so a moved model needs a new engine."""
        return tuple(p.data_ptr() for p in self.params)

    def fits(self, batch: int, max_len: int, use_graph: bool, compile: bool | None = None) -> bool:
        wanted = (COMPILE and self.use_graph) if compile is None else compile
        return (batch == self.batch and max_len <= self.length and use_graph == self.graph_requested
                and wanted == self.compile and self._signature() == self.signature)

    # ------------------------------------------------------------------------------------------ the maths

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        x = F.embedding(tokens, emb.word_embeddings.weight)
        if self.arch.learned_positions:
            x = x + F.embedding(positions, emb.position_embeddings.weight)
        norm = getattr(emb, "word_embeddings_layernorm", None)  # BLOOM (interop.families.bloom)
        return x if norm is None else norm(x)

    def _rope_tables(self, positions: torch.Tensor):
        """cos/sin at real-token positions ([B, S] -> [B, S, 1, 1, rot] for prefill, [B] -> [B, 1, 1, rot] for a
        decode step: broadcast over groups and heads), once per pass (shared by every layer); None without RoPE."""
        if not self.arch.rope:
            return None
        return tuple(table[positions].unsqueeze(-2).unsqueeze(-2) for table in (self.cos, self.sin))

    def _qkv(self, layer, x, rope):
        """q [B, S, heads, d], k and v [B, S, groups, d] from the grouped QKV layout (docs/checkpoint-formats.md §4.3)."""
        a = self.arch
        r = a.heads // a.groups
        b, s, _ = x.shape
        linear = layer.self_attention.linear_qkv
        qkv = F.linear(x, linear.weight, linear.bias).view(b, s, a.groups, r + 2, a.head_dim)
        qk, v = qkv[..., : r + 1, :], qkv[..., r + 1, :]  # a group's r query heads and its key are adjacent
        if rope is not None:
            qk = _rope(qk, *rope)  # one pass over queries and keys
        return qk[..., :r, :].reshape(b, s, a.heads, a.head_dim), qk[..., r, :], v

    def _mlp_block(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        proj = layer.self_attention.linear_proj
        x = x + F.linear(attn_out, proj.weight, proj.bias)
        h = layer.pre_mlp_layernorm(x)
        fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
        h = F.linear(h, fc1.weight, fc1.bias)
        if self.arch.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.arch.activation(gate) * up
        else:
            h = self.arch.activation(h)
        return x + F.linear(h, fc2.weight, fc2.bias)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.final_norm(x), self.output_weight)

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, key_pad: torch.Tensor,
                all_positions: bool) -> torch.Tensor:
        """Eager pass over the whole left-padded prompt [B, S]; fills cache slots [0, S); padded-vocab logits."""
        a = self.arch
        b, s = tokens.shape
        self.pad.zero_()
        self.pad[:, :s].copy_(key_pad)
        self.row_table.copy_(torch.arange(b, dtype=torch.int32, device=self.device)[:, None].expand_as(self.row_table))
        self.use_row_table = False
        causal = torch.ones(s, s, dtype=torch.bool, device=self.device).tril()
        # padding queries attend to themselves only: a fully masked row would give NaN, which then leaks
        # through 0 * NaN into later layers' masked keys
        allowed = (causal[None] & ~key_pad[:, None, :]) | torch.eye(s, dtype=torch.bool, device=self.device)
        allowed = allowed[:, None]
        if self.slopes is not None:  # ALiBi: slope · (j − i) on the allowed scores, [B, heads, S, S]
            from interop.alibi import alibi_bias

            bias = alibi_bias(self.slopes, s, s, torch.float32, self.device)
            allowed = bias.masked_fill(~allowed, float("-inf")).to(self.dtype)
        x = self._embed(tokens, positions)
        rope = self._rope_tables(positions)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), rope)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, groups, S, d]
            self.k_cache[i, :, :, :s].copy_(k)
            self.v_cache[i, :, :, :s].copy_(v)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed,
                                                 scale=a.softmax_scale, enable_gqa=a.groups != a.heads)
            x = self._mlp_block(layer, x, out.transpose(1, 2).reshape(b, s, a.heads * a.head_dim))
        if not all_positions:
            x = x[:, -1:]
        return self._head(x)

    # ------------------------------------------------------------------ decode step: pure per-layer functions

    def _layer_tensors(self, layer) -> tuple:
        """A layer's parameters in the argument order of :func:`step_functions`' two functions (tensors or None;
        a norm that is not torch's own is passed as its module: eager only)."""
        attn, mlp = layer.self_attention, layer.mlp
        return (*_norm_args(layer.input_layernorm), attn.linear_qkv.weight, attn.linear_qkv.bias), (
            attn.linear_proj.weight, attn.linear_proj.bias, *_norm_args(layer.pre_mlp_layernorm),
            mlp.linear_fc1.weight, mlp.linear_fc1.bias, mlp.linear_fc2.weight, mlp.linear_fc2.bias)

    def attend_length(self, write_index: int) -> int:
        """Cache slots a step writing slot ``write_index`` attends over: the filled ones, rounded up (the fused
        attention reads the fill level on the device: one length, one graph)."""
        if self.fused_attention:
            return self.length
        return min(self.length, -(-(write_index + 1) // ATTEND_BUCKET) * ATTEND_BUCKET)

    def graph_key(self, write_index: int) -> tuple:
        """Key of the captured graph that a step writing slot ``write_index`` replays (graphs differ by attended
        length and by whether attention reads through the beam row table)."""
        return self.attend_length(write_index), self.use_row_table

    def _decode_step(self, attend_len: int) -> torch.Tensor:
        """One token per row from the persistent buffers only (no host values, no syncs): capturable.
        Attends over cache slots [0, attend_len) (the rest is unfilled: masked anyway).

        Kernels per layer: the compiled functions run a layer's MLP together with the NEXT layer's norm and
        QKV, so that the residual add and the norm fuse into one kernel across the layer boundary; between
        them, one cache write (K and V together) and SDPA."""
        a = self.arch
        first, middle, last = self._step_fns
        if not self.fused_attention:
            attend = (self.slots[:attend_len] <= self.write_index)[None] & ~self.pad[:, :attend_len]  # [B, L]
            # additive mask built once per step (a boolean one would be converted again in every layer's SDPA)
            bias = torch.zeros(attend.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill_(~attend, float("-inf"))[:, None, None, :]  # [B, 1, 1, L]
            if self.slopes is not None:  # ALiBi: + slope · (slot − write_index), [B, groups, r, L]
                distance = (self.slots[:attend_len] - self.write_index).to(torch.float32)
                alibi = self.slopes.view(a.groups, a.heads // a.groups, 1) * distance
                bias = bias + alibi.to(self.dtype)
        x = self._embed(self.tokens, self.positions)  # [B, H]
        cos, sin = self._rope_tables(self.positions) or (None, None)
        q, kv = first(x, *self._layer_args[0][0], cos, sin)
        for i, (_, args_out) in enumerate(self._layer_args):
            if self.fused_attention:
                out = decode_attention.decode_attention(q, kv, self.kv_cache[i], self.pad, self.write_index,
                                                        a.softmax_scale,
                                                        self.row_table if self.use_row_table else None,
                                                        self.slopes)
            else:
                self.kv_cache[i].index_copy_(3, self.write_index, kv)
                cache = self.kv_cache[i, :, :, :, :attend_len]
                out = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=bias, scale=a.softmax_scale)
                out = out.reshape(x.size(0), a.heads * a.head_dim)
            if i + 1 < a.num_layers:
                x, q, kv = middle(x, out, *args_out, *self._layer_args[i + 1][0], cos, sin)
            else:
                x = last(x, out, *args_out)
        return self._head(x)

    def _compile_step(self, attend_len: int) -> bool:
        """Swap in the compiled per-layer functions and run them once (compiles now); False, with one warning,
        if this model's norms are not torch's own or the compile / first run fails."""
        if any(isinstance(t, torch.nn.Module) for args in self._layer_args for part in args for t in part):
            self.compile_failed = True
            _warn_once("fast generation: norms are not torch LayerNorm/RMSNorm, decode step not compiled")
            return False
        try:
            self._step_fns = compiled_step_functions(*self._step_key, COMPILE_MODE)
            for _ in range(2):
                self._decode_step(attend_len)  # compiles (once per function: every layer has the same shapes)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to the uncompiled step
            self._step_fns, self.compile_failed = step_functions(*self._step_key), True
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            _warn_once(f"fast generation: torch.compile of the decode step failed, using the uncompiled step: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return False
        self.compiled = True
        return True

    def _capture(self, attend_len: int) -> None:
        """Warm up on a side stream (allocator, kernel choice), then capture one step (PyTorch's recipe).

        A capture that fails (an op this torch/CUDA build cannot capture) is reported once and the engine
        goes on eagerly: same code, same results, only slower.
        """
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if self.compile and not self.compiled and not self.compile_failed:
                self._compile_step(attend_len)  # warms the compiled functions up too
            for _ in range(2):
                self._decode_step(attend_len)  # idempotent: rewrites the same cache slot from the same inputs
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
                static_logits = self._decode_step(attend_len)
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            if self.compiled:  # the compiled step would not capture: capture the uncompiled one instead
                _warn_once(f"fast generation: CUDA graph capture of the compiled decode step failed, capturing "
                           f"the uncompiled step: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                self._step_fns, self.compiled = step_functions(*self._step_key), False
                self.compile_failed = True
                self.graphs.clear()  # graphs of other lengths replay the compiled step: recapture them too
                return self._capture(attend_len)
            warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {exc}", stacklevel=2)
            self.use_graph = False
            return
        self.graphs[(attend_len, self.use_row_table)] = (graph, static_logits)
        global captures, compiled_captures
        captures += 1
        compiled_captures += int(self.compiled)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, write_index: int,
               key_pad: torch.Tensor) -> torch.Tensor:
        """Logits [B, padded V] for one new token per row written at cache slot ``write_index``.

        The returned tensor is the graph's static output when graphed: read it before the next step.
        """
        self.tokens.copy_(tokens.reshape(-1))
        self.positions.copy_(positions.reshape(-1))
        self.write_index.fill_(write_index)
        self.pad[:, : key_pad.size(1)].copy_(key_pad)
        key = self.graph_key(write_index)
        attend_len = key[0]
        if not self.use_graph:
            if self.compile and not self.compiled and not self.compile_failed:
                self._compile_step(attend_len)
            return self._decode_step(attend_len)
        if key not in self.graphs:
            self._capture(attend_len)
            if not self.use_graph:
                return self._decode_step(attend_len)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def reorder(self, rows: torch.Tensor, end: int) -> None:
        """Beam search: cache row i continues old row ``rows[i]`` (filled slots only, outside the graph).

        With the fused attention only the row table moves (rows of the table = filled slots' owners); the cache
        stays, and each row keeps writing its new K/V into its own cache row. Otherwise only the rows that change
        are copied. (Copying every row moved the whole filled cache twice per step — GPT-2 1.3B, 64 rows: ~3 GB
        at mid-run — most of a beam step's time.)"""
        if self.fused_attention:
            filled = self.row_table[:, :end]
            filled.copy_(filled.index_select(0, rows))
            self.use_row_table = True
            return
        moved = (rows != torch.arange(rows.numel(), device=rows.device)).nonzero().flatten()
        if moved.numel() == 0:
            return
        part = self.kv_cache[:, :, :, :, :end]  # [layers, 2 (K, V), B, groups, end, d]
        part.index_copy_(2, moved, part.index_select(2, rows[moved]))  # sources read before any row is written


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def step_functions(arch: DecodeArch, norm_kind: str, eps: float | None, fused_gelu: bool = False) -> tuple:
    """The decode step's three per-layer functions for one architecture: pure tensor functions (weights are
    arguments, the architecture is closed over), so that every layer — and every engine of this architecture —
    shares one compiled version of each: ``first`` (norm + QKV + RoPE of layer 0), ``middle`` (output
    projection and MLP of layer i, then norm + QKV + RoPE of layer i + 1) and ``last`` (projection and MLP of
    the last layer). Activations are [B, H]: one decode token per row."""
    groups, head_dim = arch.groups, arch.head_dim
    r = arch.heads // groups

    def first(x, norm_w, norm_b, qkv_w, qkv_b, cos, sin):
        """q [B, groups, r, d] (a group's r query heads in the place of the query sequence: GQA without
        repeating K/V) and the new K/V [2, B, groups, 1, d], as the cache write takes them."""
        b = x.size(0)
        qkv = F.linear(_norm(x, norm_w, norm_b, eps, norm_kind), qkv_w, qkv_b).view(b, groups, r + 2, head_dim)
        if cos is None:  # views of the GEMM output: no copy
            return qkv[:, :, :r], qkv[:, :, r:].permute(2, 0, 1, 3).unsqueeze(3)
        qk = _rope(qkv[:, :, : r + 1], cos, sin)  # a group's r query heads and its key are adjacent
        return qk[:, :, :r], torch.stack((qk[:, :, r], qkv[:, :, r + 1])).unsqueeze(3)

    def mlp(x, attn_out, proj_w, proj_b, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b):
        """Output projection + residual, norm, MLP + residual."""
        x = x + F.linear(attn_out, proj_w, proj_b)
        h = _norm(x, norm_w, norm_b, eps, norm_kind)
        if fused_gelu:
            h = torch._addmm_activation(fc1_b, h, fc1_w.t(), use_gelu=True)
        else:
            h = F.linear(h, fc1_w, fc1_b)
            if arch.gated:
                gate, up = h.chunk(2, dim=-1)
                h = arch.activation(gate) * up
            else:
                h = arch.activation(h)
        return x + F.linear(h, fc2_w, fc2_b)

    def middle(x, attn_out, proj_w, proj_b, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b,
               next_norm_w, next_norm_b, next_qkv_w, next_qkv_b, cos, sin):
        x = mlp(x, attn_out, proj_w, proj_b, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b)
        return (x, *first(x, next_norm_w, next_norm_b, next_qkv_w, next_qkv_b, cos, sin))

    return first, middle, mlp


@functools.lru_cache(maxsize=None)
def compiled_step_functions(arch: DecodeArch, norm_kind: str, eps: float | None, fused_gelu: bool = False,
                            mode: str | None = None) -> tuple:
    """:func:`step_functions` through ``torch.compile`` (compiled lazily, at the first call; static shapes:
    a new batch size compiles once more, a new layer, engine or attended length does not)."""
    return tuple(torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
                 for fn in step_functions(arch, norm_kind, eps, fused_gelu))


def _norm_args(norm) -> tuple:
    """(weight, bias or None) of torch's LayerNorm/RMSNorm or a subclass with their maths (the trainer's Triton
    norms, :mod:`trainer.kernels.norm`); (the module, None) for any other norm (eager only)."""
    if isinstance(norm, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return norm.weight, getattr(norm, "bias", None)
    return norm, None


def _norm(x, weight, bias, eps, kind: str) -> torch.Tensor:
    """torch.nn.LayerNorm / RMSNorm's own forward, functional (modules as compiled arguments would recompile
    per layer); a norm of another type is its module, called."""
    if isinstance(weight, torch.nn.Module):
        return weight(x)
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def engine_for(inner, batch: int, max_len: int, use_graph: bool, compile: bool | None = None) -> DecodeEngine:
    """The model's engine, reused across ``generate`` calls of the same shape (one per model: its cache and
    graph are the big allocations); rebuilt when the shape grows or the parameters moved."""
    engine = _ENGINES.get(inner)
    if engine is None or not engine.fits(batch, max_len, use_graph, compile):
        _ENGINES.pop(inner, None)
        del engine  # free the old cache before allocating the new one
        engine = DecodeEngine(inner, batch, max_len, use_graph, compile)
        _ENGINES[inner] = engine
    return engine


def engine_of(model) -> DecodeEngine | None:
    """The model's current engine (kept between ``generate`` calls), or None: benchmarks report what it ran."""
    return _ENGINES.get(model_and_gpt(model)[1])


def release(model) -> bool:
    """Free the model's engine (KV cache, CUDA graph and its pool) now, e.g. before training goes on; it is
    otherwise kept until the model is garbage collected, so that the next ``generate`` call replays it."""
    return _ENGINES.pop(model_and_gpt(model)[1], None) is not None


class FastStepper:
    """``generate``'s stepper interface (see ``trainer.generate._Stepper``) over a :class:`DecodeEngine`.

    Masks arrive in Megatron's convention (True = masked): the prefill mask [B, 1, S, S] whose last query row
    is the prompt's key padding, and decode masks [B, 1, 1, end] that are the key padding itself.
    """

    last = True

    def __init__(self, model, inner, batch: int, max_len: int, vocab_size: int, use_graph: bool):
        from megatron.core import parallel_state

        self.model, self.inner = model, inner
        self.engine = engine_for(inner, batch, max_len, use_graph)
        self.vocab_size = vocab_size
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.device = self.engine.device
        self.offset = 0  # filled cache slots

    def __call__(self, tokens, positions, mask, all_positions: bool = False):
        if self.offset == 0:
            logits = self.engine.prefill(tokens, positions, mask[:, 0, -1, :], all_positions)
        else:
            logits = self.engine.decode(tokens, positions, self.offset, mask[:, 0, 0, :])[:, None]
        self.offset += tokens.size(1)
        # a copy: the graph's output buffer is overwritten by the next replay
        return logits[..., : self.vocab_size].to(torch.float32, copy=True)

    def start_decode(self) -> None:
        """Nothing to switch: prefill and decode are separate methods of the engine."""

    def reorder(self, rows: torch.Tensor) -> None:
        self.engine.reorder(rows, self.offset)

    def broadcast(self, tensor, shape, dtype):
        return tensor  # one stage: the tokens are already here
