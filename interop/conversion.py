"""``interop.convert`` (this module: ``interop.conversion``): Hugging Face <-> Megatron (``torch``, ``torch_dist``, ``legacy``), streaming.

One canonical tensor at a time flows from the source reader (:mod:`formats.checkpoint`) through the family
rules into the target writer, so peak memory is a few of the largest tensors, not the model. Optimizer and RNG
state are never carried: Megatron outputs are weights-only ``release`` checkpoints (docs/checkpoint-formats.md §1.5, docs/checkpoint-formats.md trap T14).
HF tokenizer / generation-config files travel in ``<megatron dst>/tokenizer/`` and come back on export.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch

from formats.checkpoint import format_named, format_names, writer_for
from formats.layout import Layout
from interop import scratch, streams
from interop.checkpoints import first_dtype, open_source
from interop.convert_megatron import (
    TorchTarget,
    args_namespace,
    canonical_shape,
    dist_extra_state_keys,
    dist_placements,
    extra_state_names,
    iter_checked,
    megatron_to_canonical,
)
from interop.convert_stream import Stream, canonical_to_hf, check_hf_names, hf_plan, hf_to_canonical
from interop.errors import ConversionError
from interop.config_checks import checked_hf_config, checked_megatron_config
from interop.families.base import ModelConfig, families, family_for_hf, get_family
from interop.megatron_args import output_tokenizer_dir
from interop.vocab import TOKENIZER_DIR

LEGACY = "legacy"  # an output choice, not a format: the ``torch`` format with pre-Megatron-Core keys (§2)
FORMATS = (*format_names(kind="megatron"), LEGACY)  # the Megatron outputs convert/reshape can write
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ConvertResult:
    """What a conversion wrote (and, with ``verify=True``, how close the two models are)."""

    src: str
    dst: str
    direction: str  # "hf->megatron" | "megatron->hf" | "megatron->megatron"
    config: ModelConfig
    layout: Layout | None
    format: str
    tensors: int = 0
    bytes: int = 0
    verify: "object | None" = None
    notes: list[str] = field(default_factory=list)


def bound_heap_growth(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation >= ``threshold`` bytes with its own mmap (returned on free).

    glibc raises its mmap threshold dynamically (up to 32 MB) after large frees, so the many few-MB tensor
    shards a conversion creates and frees then come from the heap, which fragments: measured on a 1.4 GB
    GPT-2 TP2xPP2 conversion, anonymous RSS grew steadily to 1 GB instead of staying at ~150 MB. Pinning the
    threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps peak memory at a few tensors. No-op off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConversionError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)") from None


# ---------------------------------------------------------------------------------------------------------
# opening sources


def hf_source(ckpt, *, make_vocab_size_divisible_by: int | None = None) -> tuple[ModelConfig, Stream]:
    """(config, canonical stream) of an :class:`HFCheckpoint`; names checked before anything is read. Tensors
    are copy-on-write mappings of the files (:meth:`HFCheckpoint.map`: no read copy)."""
    cfg = checked_hf_config(ckpt)  # values and sizes checked against the stored tensors (interop.config_checks)
    family = family_for_hf(ckpt.config)
    if make_vocab_size_divisible_by:
        cfg = cfg.replace(make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    stored = {i.name for i in ckpt.tensors()}
    alias = {}
    if family.name == "gpt2":  # files saved from GPT2Model lack the 'transformer.' prefix (docs/checkpoint-formats.md trap T17)
        alias = {f"transformer.{n}": n for n in stored if not n.startswith(("transformer.", "lm_head."))}
    present = (stored - set(alias.values())) | set(alias)
    check_hf_names(family, cfg, present, where=str(ckpt.path))

    def fetch(name: str) -> torch.Tensor:
        return ckpt.map(alias.get(name, name))  # one tensor (a mapping is dropped with it)

    return cfg, hf_to_canonical(family, cfg, fetch)


def megatron_source(ckpt, *, vocab_size: int | None = None) -> tuple[ModelConfig, Stream]:
    cfg = checked_megatron_config(ckpt, vocab_size)
    return cfg, megatron_to_canonical(ckpt, cfg)


class CanonicalSource(NamedTuple):
    """A checkpoint as a run loads it: the architecture, a factory of its canonical tensor stream (each call
    streams afresh, one tensor at a time) and the tokenizer/side files that travel with it."""

    config: ModelConfig
    stream: Callable[[], Stream]
    side_files: list[Path]


def canonical_source(path: str | os.PathLike) -> CanonicalSource:
    """Any checkpoint (HF or Megatron, any format or layout) as a :class:`CanonicalSource`: what training and
    ``interop generate`` load their weights from (:func:`open_source` gives the lazy artifact itself)."""
    ckpt = open_source(path)
    read = hf_source if ckpt.kind == "hf" else megatron_source
    config, _ = read(ckpt)
    return CanonicalSource(config, lambda: read(ckpt)[1], tokenizer_files(ckpt))


def tokenizer_files(ckpt) -> list[Path]:
    """Tokenizer/generation files that belong with a checkpoint (HF side files, or ``tokenizer/`` beside a
    Megatron iteration directory)."""
    if ckpt.kind == "hf":
        return list(ckpt.side_files)
    from formats.checkpoint.confine import check_inside, confinement_root

    for base in (ckpt.path, ckpt.path.parent):
        d = base / TOKENIZER_DIR
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.is_file())
            for p in files:  # copied into outputs: a link leading out of the checkpoint is refused
                check_inside(p, f"tokenizer file {TOKENIZER_DIR}/{p.name}", confinement_root(base))
            return files
    return []


# ---------------------------------------------------------------------------------------------------------
# progress


def progress_bar(stream: Stream, cfg: ModelConfig, desc: str, enabled: bool, itemsize: int) -> Stream:
    """Wrap a canonical stream in a tqdm bar counting bytes (to stderr)."""
    if not enabled:
        yield from stream
        return
    from tqdm import tqdm

    family = get_family(cfg.family)
    total = itemsize * sum(math.prod(canonical_shape(name, cfg)) for name, _ in family.canonical_names(cfg))
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for name, tensor in stream:
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())


def prefetch(stream: Stream, depth: int = 1) -> Stream:
    """Produce the next canonical tensor(s) in a background thread while the caller writes the current one.

    Reading, transposing and splitting (torch ops and file reads release the GIL) then overlap with writing;
    memory grows by ``depth`` tensors. ``INTEROP_PREFETCH=0`` turns it off.
    """
    return streams.prefetch(stream, 0 if os.environ.get("INTEROP_PREFETCH", "1") == "0" else depth)


def cast_stream(stream: Stream, dtype: torch.dtype | None) -> Stream:
    for name, tensor in stream:
        if not tensor.dtype.is_floating_point:
            raise ConversionError(f"{name}: non-floating-point weights ({tensor.dtype}) are not supported")
        yield name, (tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype))


# ---------------------------------------------------------------------------------------------------------
# writing


def write_megatron(
    stream: Iterable[tuple[str, torch.Tensor]],
    dst: str | os.PathLike,
    cfg: ModelConfig,
    layout: Layout,
    fmt: str = "torch_dist",
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    side_files: Iterable[Path] = (),
) -> tuple[int, int]:
    """Write a canonical stream as a weights-only Megatron ``release`` checkpoint; return (tensors, bytes)."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown Megatron format {fmt!r} (use {', '.join(FORMATS)})")
    legacy = fmt == LEGACY
    target = format_named("torch" if legacy else fmt)
    if legacy and not get_family(cfg.family).legacy_format:
        legacy = sorted(n for n, f in families().items() if f.legacy_format)
        raise ConversionError(f"the legacy (pre-Megatron-Core) format is supported for {', '.join(legacy)} only")
    cfg.check_layout(layout.tp, layout.pp, layout.interleaved)
    if legacy and layout.interleaved:
        raise ConversionError("the legacy format does not support virtual pipeline chunks")
    side_files = list(side_files)
    args = args_namespace(
        cfg, layout, dtype,
        ckpt_format=target.name,
        use_legacy_models=legacy,
        no_save_optim=True, no_save_rng=True, iteration=0,
        tokenizer_dir=output_tokenizer_dir(dst, side_files),
    )
    count = nbytes = 0
    stream = iter_checked(stream, cfg)
    if not target.per_rank_files:  # global keys: torch_dist
        with scratch.pool(scratch_bytes(cfg, dtype)), \
                writer_for(target.name, dst, release=True, args=args, force=force) as writer:
            for name, tensor in stream:
                for key, t, gshape, offset in dist_placements(name, tensor, cfg, layout.tp):
                    writer.add(key, t, global_shape=gshape, offset=offset)
                count += 1
                nbytes += tensor.numel() * tensor.element_size()
            for key in dist_extra_state_keys(cfg):
                writer.add_object(key, [None])
            copy_side_files(side_files, writer.tmp)
            writer.finalize()
        return count, nbytes
    style = "legacy" if legacy else "mcore"
    with scratch.pool(scratch_bytes(cfg, dtype)):
        return _write_megatron_torch(stream, dst, cfg, layout, style, args, force, side_files)


def scratch_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Scratch memory a conversion keeps for reuse (:mod:`interop.scratch`): twice its largest tensor — the
    one being written and the one being prepared (peak RSS stays within 3x the largest tensor)."""
    family = get_family(cfg.family)
    largest = max(math.prod(canonical_shape(name, cfg)) for name, _ in family.canonical_names(cfg))
    return 2 * largest * dtype.itemsize


def _write_megatron_torch(stream, dst, cfg: ModelConfig, layout: Layout, style: str, args, force: bool,
                          side_files: list[Path]) -> tuple[int, int]:
    count = nbytes = 0
    target = TorchTarget(cfg, layout, style)
    extras = extra_state_names(cfg, layout, style)
    expected: dict = {k: dict(v) for k, v in target.expected().items()}
    for (p, v), names in extras.items():
        for t in range(layout.tp):
            expected.setdefault((t, p, v), {}).update({n: None for n in names})
    with writer_for("torch", dst, layout=layout, release=True, args=args, force=force, expected=expected) as writer:
        for name, tensor in stream:
            for stored, shard, t, p, v in target.placements(name, tensor):
                writer.add(stored, shard, t, p, v)
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
        for (p, v), names in extras.items():
            for t in range(layout.tp):
                for n in names:
                    writer.add(n, None, t, p, v)
        copy_side_files(side_files, writer.tmp)
        writer.finalize()
    return count, nbytes


def copy_side_files(files: list[Path], root: Path) -> None:
    if not files:
        return
    d = root / TOKENIZER_DIR
    d.mkdir(exist_ok=True)
    for f in files:
        shutil.copy2(f, d / f.name)


def write_hf(
    stream: Iterable[tuple[str, torch.Tensor]],
    dst: str | os.PathLike,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    side_files: Iterable[Path] = (),
) -> tuple[int, int]:
    """Write a canonical stream as an HF model directory (config, safetensors, tokenizer/generation files)."""
    import json

    from formats.checkpoint import HFCheckpointWriter

    family = get_family(cfg.family)
    config = family.hf_config(cfg, dtype)
    side_files = list(side_files)
    plan = hf_plan(family, cfg, dtype, canonical_shape)
    count = nbytes = 0
    with scratch.pool(scratch_bytes(cfg, dtype)), \
            HFCheckpointWriter(dst, config, max_shard_size, side_files, force, plan=plan) as writer:
        for name, tensor in canonical_to_hf(family, cfg, iter_checked(stream, cfg)):
            writer.add(name, tensor)
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
        if not any(f.name == "generation_config.json" for f in side_files):
            gen = {k: cfg.hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.hf.get(k) is not None}
            (writer.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        writer.finalize()
    return count, nbytes


# ---------------------------------------------------------------------------------------------------------
# the API


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    format: str = "torch_dist",
    dtype: str | torch.dtype | None = None,
    make_vocab_size_divisible_by: int | None = None,
    max_shard_size: str | int = "5GB",
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Convert HF -> Megatron (``tp``/``pp``/``vpp``/``format``) or Megatron -> HF, decided by what ``src`` is.

    ``dtype``: output dtype (default: keep). ``vocab_size``: true vocabulary of a Megatron source that does not
    record it (ours always do). ``tokenizer``: a directory of tokenizer files to ship with the output.
    ``verify``: afterwards compare both checkpoints' logits (:func:`interop.verify`); a mismatch
    raises :class:`~interop.errors.VerificationError` after the output was written.
    """
    try:
        return _convert(src, dst, tp=tp, pp=pp, vpp=vpp, format=format, dtype=dtype,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by, max_shard_size=max_shard_size,
                        vocab_size=vocab_size, tokenizer=tokenizer, force=force, verify=verify, progress=progress)
    except ConversionError as exc:
        raise with_path(exc, src) from None


def with_path(exc: ConversionError, src) -> ConversionError:
    """Name the source in a conversion error that does not name a file yet (one-line CLI errors)."""
    if exc.path is not None:
        return exc
    return type(exc)(str(exc), path=src)


def _convert(src, dst, *, tp, pp, vpp, format, dtype, make_vocab_size_divisible_by, max_shard_size, vocab_size,
             tokenizer, force, verify, progress) -> ConvertResult:
    bound_heap_growth()
    ckpt = open_source(src)
    out_dtype = parse_dtype(dtype)
    side = tokenizer_files(ckpt)
    if tokenizer is not None:
        tdir = Path(tokenizer)
        if not tdir.is_dir():
            raise ConversionError("tokenizer directory does not exist", path=tokenizer)
        side = sorted(p for p in tdir.iterdir() if p.is_file())
    if ckpt.kind == "hf":
        if vpp is not None and vpp <= 1:
            vpp = None
        layout = Layout(tp=tp, pp=pp, vpp=vpp)
        cfg, stream = hf_source(ckpt, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        weight_dtype = out_dtype or first_dtype(ckpt)
        stream = progress_bar(prefetch(cast_stream(stream, out_dtype)), cfg, "convert", progress, weight_dtype.itemsize)
        n, b = write_megatron(stream, dst, cfg, layout, format, dtype=weight_dtype, force=force, side_files=side)
        result = ConvertResult(str(src), str(dst), "hf->megatron", cfg, layout, format, n, b)
    else:
        cfg, stream = megatron_source(ckpt, vocab_size=vocab_size)
        weight_dtype = out_dtype or first_dtype(ckpt)
        stream = progress_bar(prefetch(cast_stream(stream, out_dtype)), cfg, "convert", progress, weight_dtype.itemsize)
        n, b = write_hf(stream, dst, cfg, dtype=weight_dtype, max_shard_size=max_shard_size, force=force,
                        side_files=side)
        result = ConvertResult(str(src), str(dst), "megatron->hf", cfg, None, "safetensors", n, b)
    if verify:
        from interop.verification import verify as run_verify

        result.verify = run_verify(src, dst, vocab_size=vocab_size, raise_on_mismatch=True)
    return result

