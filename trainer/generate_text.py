"""Text in, text out: load any checkpoint (HF or Megatron, through ``interop.conversion``) with its tokenizer,
build the Megatron-Core model at the requested TP x PP, generate, detokenize.

This is what ``interop generate`` calls. Without CUDA and without a ``torchrun`` environment, a layout of
more than one rank runs on local gloo ranks (:func:`interop.launch.run_on_ranks`); on GPUs one process per
rank is expected (``torchrun --nproc-per-node TP*PP -m interop generate ...``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from formats.layout import Layout
from interop.conversion import canonical_source
from trainer.errors import TrainConfigError
from trainer.generate import GenerationConfig, generate, left_pad
from trainer.sources import shipped_tokenizer


@dataclass
class TextRequest:
    """One ``interop generate`` invocation."""

    checkpoint: str
    prompts: list[str]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    layout: Layout = field(default_factory=Layout)
    tokenizer: str | None = None  # default: tokenizer.json shipped with the checkpoint
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    add_bos: bool = False
    eos_token_ids: tuple[int, ...] | None = None  # default: the checkpoint's eos_token_id, else the tokenizer's EOD
    progress: bool = True


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    score: float | None = None


def _tokenizer_path(request: TextRequest, side_files) -> str:
    path = request.tokenizer or shipped_tokenizer(side_files)
    if path:
        return path
    raise TrainConfigError(
        "no tokenizer.json ships with this checkpoint; pass --tokenizer", path=request.checkpoint
    )


def _eos_ids(request: TextRequest, cfg, tokenizer) -> tuple[int, ...]:
    from trainer.data import eod_id

    if request.eos_token_ids is not None:
        return tuple(request.eos_token_ids)
    eos = cfg.hf.get("eos_token_id")
    if eos is None:
        eos = eod_id(tokenizer)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _encode(request: TextRequest, cfg, tokenizer) -> list[list[int]]:
    prompts = []
    bos = cfg.hf.get("bos_token_id")
    if request.add_bos and bos is None:
        raise TrainConfigError("--add-bos: the checkpoint declares no bos_token_id", path=request.checkpoint)
    for text in request.prompts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if request.add_bos:
            ids = [int(bos)] + ids
        if not ids:
            raise TrainConfigError(f"prompt {text!r} encodes to no tokens")
        if max(ids) >= cfg.vocab_size:
            raise TrainConfigError(
                f"the tokenizer produced id {max(ids)} but the model has {cfg.vocab_size} tokens", path=request.checkpoint
            )
        prompts.append(ids)
    longest = max(len(p) for p in prompts) + request.config.max_new_tokens
    if cfg.position_embedding_type == "learned_absolute" and longest > cfg.max_position_embeddings:
        raise TrainConfigError(
            f"prompt + max_new_tokens = {longest} tokens exceeds the model's {cfg.max_position_embeddings} positions"
        )
    return prompts


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rank_main(request: TextRequest) -> list[Completion] | None:
    """Body of one rank; returns the completions on global rank 0, None elsewhere."""
    from interop.families import get_family
    from interop.megatron_model import build_gpt_model, build_model, load_canonical
    from interop.runtime import RuntimeConfig, distributed
    from interop.data.tokenizer import load_fast_tokenizer

    cfg, stream, side = canonical_source(request.checkpoint)
    tokenizer = load_fast_tokenizer(_tokenizer_path(request, side))
    prompts = _encode(request, cfg, tokenizer)
    eos = _eos_ids(request, cfg, tokenizer)
    config = dataclasses.replace(request.config, eos_token_ids=eos)
    dtype = DTYPES[request.dtype]
    seq2seq = get_family(cfg.family).kind == "encoder-decoder"
    with distributed(RuntimeConfig(layout=request.layout, seed=config.seed)) as rt:
        build = build_model if seq2seq else build_gpt_model  # an encoder-decoder was checked by the CLI
        model = build(cfg, params_dtype=dtype, pipeline_dtype=dtype,
                      bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
        load_canonical(model, stream(), cfg)
        if seq2seq:
            out = _generate_seq2seq(model, prompts, cfg, config, request.progress and rt.is_main)
        else:
            pad = eos[0] if eos else 0
            ids, mask = left_pad(prompts, pad)
            out = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                           progress=request.progress and rt.is_main)
        if not rt.is_main:
            return None
    per_prompt = config.num_return_sequences if config.num_beams > 1 else 1
    completions = []
    for i, tokens in enumerate(out.tokens):
        shown = tokens[:-1] if tokens and tokens[-1] in eos else tokens
        score = float(out.beam_scores.view(-1)[i]) if out.beam_scores is not None else None
        completions.append(Completion(
            request.prompts[i // per_prompt], tokenizer.decode(shown, skip_special_tokens=False), tokens,
            out.logprobs[i] if out.logprobs else None, score,
        ))
    return completions


def _generate_seq2seq(model, prompts: list[list[int]], cfg, config: GenerationConfig, progress: bool):
    """An encoder-decoder (T5): prompts are the encoder inputs (right-padded with the model's pad token), every
    decoder row starts from its ``decoder_start_token_id`` (Transformers' default: the pad token)."""
    from trainer.generate_seq2seq import generate_seq2seq

    pad = int(cfg.hf.get("pad_token_id") or 0)
    start = cfg.hf.get("decoder_start_token_id")
    ids, mask = left_pad(prompts, pad)
    # padded on the right: a T5 with learned absolute positions (Megatron-LM's without TE) numbers encoder
    # positions from the left edge, as it was trained; T5's relative bias does not care
    shift = (mask == 0).sum(1, keepdim=True)
    rotate = (torch.arange(ids.size(1)) + shift) % ids.size(1)
    ids, mask = ids.gather(1, rotate), mask.gather(1, rotate)
    return generate_seq2seq(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                            decoder_start_token_id=pad if start is None else int(start), progress=progress)


def generate_text(request: TextRequest, timeout_s: float = 3600.0) -> list[Completion]:
    """Run :func:`rank_main` on as many ranks as the layout needs (local gloo ranks on CPU)."""
    from interop.launch import run_on_ranks

    if not request.prompts:
        raise TrainConfigError("no prompts given")
    if request.dtype not in DTYPES:
        raise TrainConfigError(f"unknown dtype {request.dtype!r} (use fp32, bf16 or fp16)")
    world = request.layout.tp * request.layout.pp
    cfg, _, _ = canonical_source(request.checkpoint)
    cfg.check_layout(request.layout.tp, request.layout.pp)
    if "WORLD_SIZE" in os.environ or world == 1 or torch.cuda.is_available():
        result = rank_main(request)
        if result is None:  # a torchrun rank other than 0
            return []
        return result
    return run_on_ranks(rank_main, world, request, timeout_s=timeout_s)[0]
