"""``interop.reshape`` (module ``interop.reshaping``): Megatron -> Megatron at a new TP/PP/VPP layout and/or
format, weights and (when the source has it) distributed-optimizer state.

The source is read into the canonical stream one tensor at a time (TP shards merged by the family's split
rules, layers renumbered globally) and written at the target layout. When the source holds distributed-optimizer
state it is kept (with scheduler, iteration and RNG) by :mod:`interop.optimizer_state`, at ``dp`` (default: the
source's DP); ``weights_only=True`` drops it and writes a weights-only ``release`` checkpoint (docs/checkpoint-formats.md §1.5, T14).
"""
from __future__ import annotations

import os

from formats.checkpoint import format_of
from formats.layout import Layout
from interop.checkpoints import first_dtype, open_source
from interop.conversion import (
    LEGACY,
    ConvertResult,
    bound_heap_growth,
    cast_stream,
    megatron_source,
    progress_bar,
    parse_dtype,
    prefetch,
    tokenizer_files,
    with_path,
    write_megatron,
)
from interop.errors import ConversionError


def reshape(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    tp: int,
    pp: int,
    vpp: int | None = None,
    format: str | None = None,
    dtype=None,
    make_vocab_size_divisible_by: int | None = None,
    vocab_size: int | None = None,
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
    dp: int | None = None,
    weights_only: bool = False,
) -> ConvertResult:
    """Rewrite Megatron checkpoint ``src`` at ``tp``/``pp``/``vpp`` in ``format`` (default: the source's)."""
    try:
        return _reshape(src, dst, tp=tp, pp=pp, vpp=vpp, format=format, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, vocab_size=vocab_size,
                        force=force, verify=verify, progress=progress, dp=dp, weights_only=weights_only)
    except ConversionError as exc:
        raise with_path(exc, src) from None


def _reshape(src, dst, *, tp, pp, vpp, format, dtype, make_vocab_size_divisible_by, vocab_size, force, verify,
             progress, dp=None, weights_only=False) -> ConvertResult:
    bound_heap_growth()
    ckpt = open_source(src)
    if ckpt.kind != "megatron":
        raise ConversionError("reshape needs a Megatron checkpoint; use convert for Hugging Face models", path=src)
    fmt = format or (LEGACY if ckpt.key_style == "legacy" else format_of(ckpt).name)
    cfg, stream = megatron_source(ckpt, vocab_size=vocab_size)
    if make_vocab_size_divisible_by:
        cfg = cfg.replace(make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    out_dtype = parse_dtype(dtype)
    weight_dtype = out_dtype or first_dtype(ckpt)
    layout = Layout(tp=tp, pp=pp, vpp=vpp if vpp and vpp > 1 else None)
    if not weights_only:
        from interop.optimizer_state import reshape_hook

        kept = reshape_hook(ckpt, cfg, src, dst, layout, fmt, dp=dp, dtype=out_dtype, force=force,
                            side_files=tokenizer_files(ckpt))
        if kept is not None:
            if verify:
                from interop.verification import verify as run_verify

                kept.verify = run_verify(src, dst, vocab_size=vocab_size, raise_on_mismatch=True)
            return kept
    stream = progress_bar(prefetch(cast_stream(stream, out_dtype)), cfg, "reshape", progress, weight_dtype.itemsize)
    n, b = write_megatron(stream, dst, cfg, layout, fmt, dtype=weight_dtype, force=force,
                          side_files=tokenizer_files(ckpt))
    result = ConvertResult(str(src), str(dst), "megatron->megatron", cfg, layout, fmt, n, b,
                           notes=["optimizer and RNG state were dropped (weights-only release checkpoint)"])
    if verify:
        from interop.verification import verify as run_verify

        result.verify = run_verify(src, dst, vocab_size=vocab_size, raise_on_mismatch=True)
    return result
