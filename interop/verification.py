"""``interop.verify`` (this module: ``interop.verification``): do two checkpoints compute the same function?

Each side is loaded independently by its own producer's code and run on one fixed random batch:
* HF: Transformers' ``AutoModelForCausalLM.from_pretrained`` (fp32).
* Megatron: Megatron-Core ``GPTModel`` chunks built at the checkpoint's **own** layout on TP×PP CPU/gloo ranks
  (:func:`interop.launch.run_on_ranks`), weights loaded by Megatron-Core itself — ``load_state_dict(strict=True)``
  on each rank's ``model_optim_rng.pt`` for the ``torch`` format, ``dist_checkpointing.load`` for ``torch_dist``
  (legacy-key files go through our canonical reader) — then the forward-only pipeline schedule.
The maximum absolute logit difference must stay under a dtype-aware tolerance (fp32 1e-4, fp16 2e-2,
bf16 1e-1, each times ``max(1, max|logit|)``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.layout import Layout
from interop.errors import VerificationError

BASE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class VerifyResult:
    a: str
    b: str
    max_abs_diff: float
    tolerance: float
    max_abs_logit: float
    tokens_shape: tuple[int, int]
    ok: bool

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"verify {verdict}: max |logit diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, "
                f"max |logit| {self.max_abs_logit:.3g}, batch {self.tokens_shape[0]}x{self.tokens_shape[1]})")


def _describe(path, vocab_size: int | None = None) -> tuple[object, "object", torch.dtype]:
    """(checkpoint, ModelConfig, weight dtype) of ``path``."""
    from interop.config_checks import checked_hf_config, checked_megatron_config
    from interop.conversion import _first_dtype, open_source

    ckpt = open_source(path)
    cfg = checked_hf_config(ckpt) if ckpt.kind == "hf" else checked_megatron_config(ckpt, vocab_size)
    return ckpt, cfg, _first_dtype(ckpt)


def fixed_batch(vocab_size: int, max_positions: int, batch: int = 2, seq: int = 16, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, min(seq, max_positions)), generator=gen)


def hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of an HF checkpoint through Transformers' own model, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(path, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Logits of a Megatron checkpoint through Megatron-Core at the checkpoint's own layout (gloo ranks)."""
    from interop.conversion import open_source
    from interop.launch import run_on_ranks

    ckpt = open_source(path)
    if ckpt.format == "torch_dist":  # Megatron-Core's dist_checkpointing unpickles its files itself
        from formats.checkpoint.preflight import check_checkpoint_pickles

        check_checkpoint_pickles(ckpt.path)
    layout = ckpt.layout
    chunks = ckpt.num_chunks if ckpt.format != "torch_dist" else 1
    vpp = layout.interleaved if (ckpt.format == "torch_dist" or chunks > 1) else None
    run_layout = Layout(tp=layout.tp, pp=layout.pp, vpp=vpp)
    if vpp and tokens.shape[0] < layout.pp:
        tokens = tokens.repeat((layout.pp + tokens.shape[0] - 1) // tokens.shape[0], 1)
    n = run_layout.model_parallel_size
    results = run_on_ranks(_rank_logits, n, str(ckpt.path), run_layout, tokens, vocab_size, timeout_s=1800)
    found = [r for r in results if r is not None]
    if len(found) != 1:
        raise VerificationError(f"expected logits from exactly one rank, got {len(found)}", path=path)
    return found[0]


def _rank_logits(path: str, layout: Layout, tokens: torch.Tensor, vocab_size: int | None):
    """One rank of :func:`megatron_logits` (module-level so that ranks can import it)."""
    from megatron.core import parallel_state as ps

    from interop.conversion import open_source
    from interop.convert_megatron import megatron_config, megatron_to_canonical
    from interop.megatron_model import build_gpt_chunks, forward_logits, load_canonical
    from interop.runtime import RuntimeConfig, distributed

    ckpt = open_source(path)
    cfg = megatron_config(ckpt, vocab_size)
    with distributed(RuntimeConfig(layout=layout)):
        chunks = build_gpt_chunks(cfg)
        if ckpt.format == "torch_dist":
            _load_torch_dist(chunks, ckpt)
        elif ckpt.key_style == "mcore":
            _load_torch(chunks, ckpt)
        else:  # legacy / TE key names: Megatron-Core cannot read them into a local-spec model itself
            load_canonical(chunks, megatron_to_canonical(ckpt, cfg), cfg)
        logits = forward_logits(chunks, tokens, cfg)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            return logits[: tokens.shape[0]]
    return None


def _load_torch(chunks, ckpt) -> None:
    from megatron.core import parallel_state as ps

    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    for v, chunk in enumerate(chunks):
        state = {k: (ckpt.check_crc(x, t, p).clone() if isinstance(x, torch.Tensor) else x)
                 for k, x in ckpt.rank_state(t, p, v).items()}
        try:
            chunk.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise VerificationError(
                f"Megatron-Core refuses rank tp={t} pp={p} chunk {v}: {str(exc).splitlines()[0]} "
                f"{' '.join(str(exc).split())[:300]}", path=ckpt.path,
            ) from None


def _load_torch_dist(chunks, ckpt) -> None:
    from megatron.core import dist_checkpointing

    if len(chunks) == 1:
        sharded = chunks[0].sharded_state_dict()
        loaded = dist_checkpointing.load(sharded, str(ckpt.path))
        chunks[0].load_state_dict(loaded, strict=False)
        _check_loaded(chunks[0], loaded, ckpt)
        return
    sharded = {f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}
    loaded = dist_checkpointing.load(sharded, str(ckpt.path))
    for v, c in enumerate(chunks):
        c.load_state_dict(loaded[f"model{v}"], strict=False)
        _check_loaded(c, loaded[f"model{v}"], ckpt)


def _check_loaded(chunk, loaded: dict, ckpt) -> None:
    missing = [k for k in chunk.state_dict() if k not in loaded and not k.endswith("_extra_state")]
    if missing:
        raise VerificationError(f"Megatron-Core loaded no value for {missing[0]}", path=ckpt.path)


def logits_of(path, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    from interop.conversion import open_source

    ckpt = open_source(path)
    if ckpt.kind == "hf":
        return hf_logits(ckpt.path, tokens)
    return megatron_logits(path, tokens, vocab_size)


def verify(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    batch: int = 2,
    seq: int = 16,
    seed: int = 1234,
    tolerance: float | None = None,
    vocab_size: int | None = None,
    raise_on_mismatch: bool = True,
) -> VerifyResult:
    """Compare the logits of checkpoints ``a`` and ``b`` (HF or Megatron, any layout) on a fixed batch."""
    _, cfg_a, dtype_a = _describe(a, vocab_size)
    _, cfg_b, dtype_b = _describe(b, vocab_size)
    v_a = vocab_size or cfg_a.vocab_size
    v_b = vocab_size or cfg_b.vocab_size
    if v_a != v_b:
        raise VerificationError(f"vocabulary sizes differ: {a} has {v_a}, {b} has {v_b}")
    tokens = fixed_batch(v_a, min(cfg_a.max_position_embeddings, cfg_b.max_position_embeddings), batch, seq, seed)
    la = logits_of(a, tokens, vocab_size)
    lb = logits_of(b, tokens, vocab_size)
    if la.shape != lb.shape:
        raise VerificationError(f"logit shapes differ: {tuple(la.shape)} vs {tuple(lb.shape)}")
    diff = (la - lb).abs().max().item()
    scale = max(1.0, la.abs().max().item())
    worst = max((dtype_a, dtype_b), key=lambda d: BASE_TOLERANCE.get(d, 1e-1))
    tol = tolerance if tolerance is not None else BASE_TOLERANCE.get(worst, 1e-1) * scale
    result = VerifyResult(str(a), str(b), diff, tol, la.abs().max().item(), tuple(tokens.shape), diff <= tol)
    if not result.ok and raise_on_mismatch:
        raise VerificationError(result.summary())
    return result
