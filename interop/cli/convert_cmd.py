"""``interop convert`` / ``reshape`` / ``verify``: move model weights between HF and Megatron layouts.

torch/transformers/megatron are imported inside the commands so that ``interop --help`` stays fast. A failed
``--verify`` (logits differ past the tolerance) prints the numbers and exits 1; bad input exits 2 (the
group's ``error: …`` convention).
"""
from __future__ import annotations

import click

from interop.cli.options import parallel_option

# interop.conversion.FORMATS (the registry's Megatron formats + legacy keys), spelled out so that importing this
# module (``interop --help`` does) does not import torch; tests/test_cli_options.py keeps the two equal
FORMAT_CHOICE = click.Choice(["torch_dist", "torch", "legacy"])
DTYPE_CHOICE = click.Choice(["fp32", "bf16", "fp16"])


def _report(result) -> None:
    if result.layout is not None:
        where = f"{result.format} at {result.layout}"
    else:
        where = "Hugging Face safetensors"
    click.echo(
        f"wrote {result.dst}: {result.config.family} ({result.config.num_layers} layers, hidden "
        f"{result.config.hidden_size}, vocab {result.config.vocab_size}) as {where}; "
        f"{result.tensors} tensors, {result.bytes / 1e6:.1f} MB"
    )
    for note in result.notes:
        click.echo(f"note: {note}")


def _run_verified(fn, verify: bool, **kwargs) -> None:
    """Write first, report, then verify (so a mismatch leaves the output for inspection and exits 1).

    ``gc.freeze()`` first: what this process has imported (torch: ~10^5 objects) lives until it exits, and
    without the freeze every full collection during the conversion walks all of it again (3–4 % of an XL
    conversion's CPU time; XL HF -> torch median 6.86 -> 6.32 s in 3 alternated runs)."""
    import gc

    from formats.staging import check_output_location

    check_output_location(kwargs["dst"], [kwargs["src"], kwargs.get("tokenizer")])  # --force must not eat a source
    gc.freeze()
    result = fn(verify=False, **kwargs)
    _report(result)
    if verify:
        from interop.verification import verify as run_verify

        outcome = run_verify(kwargs["src"], kwargs["dst"], vocab_size=kwargs.get("vocab_size"), raise_on_mismatch=False)
        click.echo(outcome.summary())
        if not outcome.ok:
            raise click.exceptions.Exit(1)


@click.command("convert")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@parallel_option("tp", default=1, show_default=True, help="Tensor-parallel size, in ranks (HF -> Megatron).")
@parallel_option("pp", default=1, show_default=True, help="Pipeline-parallel size, in stages (HF -> Megatron).")
@parallel_option("vpp", default=None,
                 help="Virtual pipeline chunks per stage (interleaved; needs --pp >= 2) [default: none].")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="torch_dist", show_default=True,
              help="Megatron output format; legacy = pre-Megatron-Core keys (GPT-2 only).")
@click.option("--make-vocab-size-divisible-by", type=int, default=None,
              help="Vocab padding multiple (per TP rank) for Megatron outputs [default: 128].")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Output dtype [default: keep the source's].")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest HF output shard, in bytes or with a unit (5GB, 500MB, 2GiB).")
@click.option("--vocab-size", type=int, default=None,
              help="True vocabulary size of a Megatron source that does not record it (drops padding rows).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help="Tokenizer directory to ship with the output (default: the source's own tokenizer files).")
@click.option("--verify", is_flag=True, help="Compare source and output logits afterwards; exit 1 on mismatch.")
@click.option("--force", is_flag=True, help="Replace an existing DST.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_command(src, dst, tp, pp, vpp, fmt, make_vocab_size_divisible_by, dtype, max_shard_size, vocab_size,
                    tokenizer, verify, force, no_progress) -> None:
    """Convert SRC to DST: Hugging Face -> Megatron (at --tp/--pp/--vpp, --format) or Megatron (any format and
    layout) -> Hugging Face, decided by what SRC is. Streams one tensor at a time. Megatron outputs are
    weights-only `release` checkpoints (no optimizer/RNG state). Megatron pickles are read with a restricted
    unpickler; only convert checkpoints you trust."""
    from interop.conversion import convert

    _run_verified(convert, verify, src=src, dst=dst, tp=tp, pp=pp, vpp=vpp, format=fmt, dtype=dtype,
                  make_vocab_size_divisible_by=make_vocab_size_divisible_by, max_shard_size=max_shard_size,
                  vocab_size=vocab_size, tokenizer=tokenizer, force=force, progress=not no_progress)


@click.command("reshape")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@parallel_option("tp", required=True, help="Target tensor-parallel size, in ranks.")
@parallel_option("pp", required=True, help="Target pipeline-parallel size, in stages.")
@parallel_option("vpp", default=None, help="Target virtual pipeline chunks per stage [default: none].")
@click.option("--dp", type=int, default=None,
              help="Target data-parallel size for the optimizer state [default: the source's].")
@click.option("--weights-only", is_flag=True, help="Drop optimizer, scheduler and RNG state (a `release` checkpoint).")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None, help="Target format [default: the source's].")
@click.option("--make-vocab-size-divisible-by", type=int, default=None, help="Vocab padding multiple per TP rank.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Output dtype [default: keep].")
@click.option("--vocab-size", type=int, default=None, help="True vocabulary size if the source does not record it.")
@click.option("--verify", is_flag=True, help="Compare source and output logits afterwards; exit 1 on mismatch.")
@click.option("--force", is_flag=True, help="Replace an existing DST.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def reshape_command(src, dst, tp, pp, vpp, dp, weights_only, fmt, make_vocab_size_divisible_by, dtype, vocab_size,
                    verify, force, no_progress) -> None:
    """Rewrite Megatron checkpoint SRC at a new TP/PP/VPP(/DP) layout and/or format. Distributed-optimizer
    state, LR scheduler, iteration and RNG are kept when SRC has them (torch or torch_dist output), so training
    resumes at the new layout; --weights-only drops them (a weights-only `release` checkpoint)."""
    from interop.reshaping import reshape

    _run_verified(reshape, verify, src=src, dst=dst, tp=tp, pp=pp, vpp=vpp, format=fmt, dtype=dtype,
                  make_vocab_size_divisible_by=make_vocab_size_divisible_by, vocab_size=vocab_size, force=force,
                  progress=not no_progress, dp=dp, weights_only=weights_only)


@click.command("verify")
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--batch", type=int, default=2, show_default=True, help="Sequences in the fixed random batch.")
@click.option("--seq", type=int, default=16, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--tolerance", type=float, default=None,
              help="Max abs logit difference [default: dtype-aware: fp32 1e-4, fp16 2e-2, bf16 1e-1, x max(1,|logit|)].")
@click.option("--vocab-size", type=int, default=None, help="True vocabulary size if a Megatron side does not record it.")
def verify_command(a, b, batch, seq, seed, tolerance, vocab_size) -> None:
    """Compare the logits of two checkpoints (HF via Transformers, Megatron via Megatron-Core at its own layout
    on CPU ranks) on a fixed random batch; exit 1 past the tolerance."""
    from interop.verification import verify

    outcome = verify(a, b, batch=batch, seq=seq, seed=seed, tolerance=tolerance, vocab_size=vocab_size,
                     raise_on_mismatch=False)
    click.echo(outcome.summary())
    if not outcome.ok:
        raise click.exceptions.Exit(1)
