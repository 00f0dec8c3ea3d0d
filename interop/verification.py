"""``interop.verify`` (this module: ``interop.verification``): do two checkpoints compute the same function?

Each side is loaded independently by its own producer's code and run on one fixed random batch:
* HF: the family's Transformers class (``AutoModelForCausalLM``, ``MegatronBertForPreTraining``, …) in fp32.
* Megatron: the family's Megatron-Core model (GPTModel, BertModel, …) built at the checkpoint's **own** layout on
  TP×PP CPU/gloo ranks (:func:`interop.launch.run_on_ranks`), weights loaded by Megatron-Core itself —
  ``load_state_dict(strict=True)`` on each rank's ``model_optim_rng.pt`` for the ``torch`` format,
  ``dist_checkpointing.load`` for ``torch_dist`` (legacy-key files go through our canonical reader) — then the
  forward-only pipeline schedule.
Every output the family declares (LM logits; for BERT also the binary-head logits) is compared; encoders get
token-type ids and a padding mask, and per-token outputs are compared at real (unpadded) positions only. The
maximum absolute difference must stay under a dtype-aware tolerance (fp32 1e-4, fp16 2e-2, bf16 1e-1, each
times ``max(1, max|output|)``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from formats.layout import Layout
from interop.checkpoints import config_of, describe, open_source
from interop.errors import VerificationError
from interop.families.base import ModelConfig, get_family

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
    per_output: dict[str, float] | None = None  # output name -> max |diff|

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        parts = ", ".join(f"{k} {v:.3g}" for k, v in (self.per_output or {}).items())
        return (f"verify {verdict}: max |logit diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, "
                f"max |logit| {self.max_abs_logit:.3g}, batch {self.tokens_shape[0]}x{self.tokens_shape[1]}"
                + (f"; {parts}" if len(self.per_output or {}) > 1 else "") + ")")


def fixed_batch(vocab_size: int, max_positions: int, batch: int = 2, seq: int = 16, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, min(seq, max_positions)), generator=gen)


def model_batch(cfg: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 1234,
                max_positions: int | None = None) -> dict[str, torch.Tensor]:
    """The fixed inputs ``--verify`` runs: ``tokens`` for every family; for an encoder also an
    ``attention_mask`` whose later samples end in padding and, with a token-type table, ``tokentype_ids``
    with a second segment."""
    tokens = fixed_batch(cfg.vocab_size, max_positions or cfg.max_position_embeddings, batch, seq, seed)
    out = {"tokens": tokens}
    kind = get_family(cfg.family).kind
    if kind == "encoder-decoder":
        decoder = padded(tokens.flip(1)[:, : max(2, tokens.shape[1] // 2)])
        return {**padded(tokens), **{f"decoder_{k}": v for k, v in decoder.items()}}
    if kind == "encoder":
        out = padded(tokens)
        n, s = tokens.shape
        if cfg.num_tokentypes:
            out["tokentype_ids"] = (torch.arange(s) >= s // 2).long().expand(n, s).contiguous()
    return out


def padded(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``tokens`` and an ``attention_mask`` whose later samples end in padding (sample i in ``3*i`` tokens)."""
    n, s = tokens.shape
    mask = torch.ones(n, s, dtype=torch.long)
    for i in range(1, n):
        mask[i, s - min(s - 1, 3 * i):] = 0
    return {"tokens": tokens, "attention_mask": mask}


def hf_outputs(path, batch: dict[str, torch.Tensor], cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The family's outputs of an HF checkpoint through Transformers' own model, in fp32."""
    import transformers

    if cfg is None:
        cfg = config_of(open_source(path))
    family = get_family(cfg.family)
    model = getattr(transformers, family.hf_class(cfg)).from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    if "tokentype_ids" in batch:
        kwargs["token_type_ids"] = batch["tokentype_ids"]
    if "decoder_tokens" in batch:  # an encoder-decoder: teacher-forced decoder inputs, padded too
        kwargs.update(decoder_input_ids=batch["decoder_tokens"], decoder_attention_mask=batch["decoder_attention_mask"])
    with torch.no_grad():
        out = model(batch["tokens"], **kwargs)
    return {o.name: getattr(out, o.hf_attr).float() for o in family.outputs(cfg)}


def hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    """LM logits of an HF checkpoint through Transformers' own model, in fp32."""
    return hf_outputs(path, {"tokens": tokens})["logits"]


def megatron_outputs(path, batch: dict[str, torch.Tensor], vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The family's outputs of a Megatron checkpoint through Megatron-Core at the checkpoint's own layout
    (gloo ranks)."""
    from interop.launch import run_on_ranks

    ckpt = open_source(path)
    if ckpt.format == "torch_dist":  # Megatron-Core's dist_checkpointing unpickles its files itself
        from formats.checkpoint.preflight import check_checkpoint_pickles

        check_checkpoint_pickles(ckpt.path)
    layout = ckpt.layout
    chunks = ckpt.num_chunks if ckpt.format != "torch_dist" else 1
    vpp = layout.interleaved if (ckpt.format == "torch_dist" or chunks > 1) else None
    run_layout = Layout(tp=layout.tp, pp=layout.pp, vpp=vpp)
    n = batch["tokens"].shape[0]
    if vpp and n < layout.pp:
        reps = (layout.pp + n - 1) // n
        batch = {k: v.repeat(reps, 1) for k, v in batch.items()}
    results = run_on_ranks(_rank_outputs, run_layout.model_parallel_size, str(ckpt.path), run_layout, batch,
                           vocab_size, timeout_s=1800)
    found = [r for r in results if r is not None]
    if len(found) != 1:
        raise VerificationError(f"expected outputs from exactly one rank, got {len(found)}", path=path)
    return {k: v[:n] for k, v in found[0].items()}


def megatron_logits(path, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """LM logits of a decoder Megatron checkpoint (see :func:`megatron_outputs`)."""
    return megatron_outputs(path, {"tokens": tokens}, vocab_size)["logits"]


def _rank_outputs(path: str, layout: Layout, batch: dict[str, torch.Tensor], vocab_size: int | None):
    """One rank of :func:`megatron_outputs` (module-level so that ranks can import it)."""
    from megatron.core import parallel_state as ps

    from interop.convert_megatron import megatron_config
    from interop.megatron_model import build_chunks, forward_outputs
    from interop.runtime import RuntimeConfig, distributed

    ckpt = open_source(path)
    cfg = megatron_config(ckpt, vocab_size)
    with distributed(RuntimeConfig(layout=layout)):
        chunks = build_chunks(cfg)
        load_weights(chunks, ckpt, cfg)
        outputs = forward_outputs(chunks, batch, cfg)
        if outputs is not None and ps.get_tensor_model_parallel_rank() == 0:
            return outputs
    return None


def load_weights(chunks, ckpt, cfg: ModelConfig) -> None:
    """Load this rank's chunks from a Megatron checkpoint the way Megatron-Core itself does: ``torch_dist`` with
    ``dist_checkpointing.load``, Megatron-Core-key ``torch`` files with ``load_state_dict(strict=True)``; legacy /
    TE key names (which Megatron-Core cannot read into a local-spec model) through our canonical reader."""
    from interop.convert_megatron import megatron_to_canonical
    from interop.megatron_model import load_canonical

    if ckpt.format == "torch_dist":
        _load_torch_dist(chunks, ckpt)
    elif ckpt.key_style == "mcore":
        _load_torch(chunks, ckpt)
    else:
        load_canonical(chunks, megatron_to_canonical(ckpt, cfg), cfg)


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


def outputs_of(path, batch: dict[str, torch.Tensor], vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    ckpt = open_source(path)
    if ckpt.kind == "hf":
        return hf_outputs(ckpt.path, batch)
    return megatron_outputs(path, batch, vocab_size)


def logits_of(path, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    return outputs_of(path, {"tokens": tokens}, vocab_size)["logits"]


def compare_outputs(cfg: ModelConfig, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                    attention_mask: torch.Tensor | None = None) -> tuple[dict[str, float], float]:
    """Per output: max |a - b| (per-token outputs at unpadded positions only); and the largest |a|."""
    diffs, scale = {}, 0.0
    for out in get_family(cfg.family).outputs(cfg):
        if out.name not in a or out.name not in b:
            raise VerificationError(f"output {out.name} is missing on one side")
        x, y = a[out.name], b[out.name]
        if x.shape != y.shape:
            raise VerificationError(f"{out.name} shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if out.per_token and attention_mask is not None:
            keep = attention_mask.bool()
            x, y = x[keep], y[keep]
        diffs[out.name] = (x - y).abs().max().item()
        scale = max(scale, x.abs().max().item())
    return diffs, scale


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
    """Compare the outputs of checkpoints ``a`` and ``b`` (HF or Megatron, any layout) on a fixed batch."""
    _, cfg_a, dtype_a = describe(a, vocab_size)
    _, cfg_b, dtype_b = describe(b, vocab_size)
    if cfg_a.family != cfg_b.family:
        raise VerificationError(f"different model families: {a} is {cfg_a.family}, {b} is {cfg_b.family}")
    v_a = vocab_size or cfg_a.vocab_size
    v_b = vocab_size or cfg_b.vocab_size
    if v_a != v_b:
        raise VerificationError(f"vocabulary sizes differ: {a} has {v_a}, {b} has {v_b}")
    inputs = model_batch(cfg_a.replace(vocab_size=v_a), batch, seq, seed,
                         min(cfg_a.max_position_embeddings, cfg_b.max_position_embeddings))
    la = outputs_of(a, inputs, vocab_size)
    lb = outputs_of(b, inputs, vocab_size)
    diffs, peak = compare_outputs(cfg_a, la, lb, inputs.get("decoder_attention_mask", inputs.get("attention_mask")))
    diff = max(diffs.values())
    scale = max(1.0, peak)
    worst = max((dtype_a, dtype_b), key=lambda d: BASE_TOLERANCE.get(d, 1e-1))
    tol = tolerance if tolerance is not None else BASE_TOLERANCE.get(worst, 1e-1) * scale
    result = VerifyResult(str(a), str(b), diff, tol, peak, tuple(inputs["tokens"].shape), diff <= tol, diffs)
    if not result.ok and raise_on_mismatch:
        raise VerificationError(result.summary())
    return result
