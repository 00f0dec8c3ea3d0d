"""``interop data``: preprocess, inspect, convert, merge and verify Megatron/fairseq indexed datasets.

Heavy imports (numpy, tokenizers, transformers) happen inside the commands so ``interop --help`` stays fast.
"""
from __future__ import annotations

import json

import click

IMPLS = ["mmap", "lazy", "cached", "fairseq-mmap", "fairseq-lazy", "fairseq-cached"]  # = formats.indexed.IMPL_CHOICES


@click.group("data")
def data_group() -> None:
    """Megatron-LM / Megatron-Core / fairseq indexed datasets (.bin/.idx pairs)."""


@data_group.command("preprocess")
@click.option("--input", "inputs", multiple=True, required=True,
              help="JSONL (.jsonl/.json[.gz]) or plain text files; globs allowed; repeatable.")
@click.option("--tokenizer", required=True, help="A local tokenizer directory (AutoTokenizer) or tokenizer.json.")
@click.option("--output-prefix", required=True, help="Writes {prefix}_{key}_document.bin/.idx (Megatron's naming).")
@click.option("--json-keys", default="text", show_default=True, help="Comma- or space-separated JSON fields; one dataset each.")
@click.option("--append-eod", is_flag=True, help="Append the EOS/EOD token to every non-empty document.")
@click.option("--eod-token", default=None, help="Token to use as EOD (default: the tokenizer's EOS).")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes (byte-level BPE piece cache, slow tokenizers) or Rust tokenizer threads.")
@click.option("--impl", type=click.Choice(IMPLS), default="mmap", show_default=True)
@click.option("--split-sentences", is_flag=True, help="One item per sentence (needs NLTK punkt installed locally).")
@click.option("--text-unit", type=click.Choice(["file", "line"]), default="file", show_default=True,
              help="Plain-text inputs: one document per file or per non-empty line.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def preprocess_command(inputs, tokenizer, output_prefix, json_keys, append_eod, eod_token, workers, impl,
                       split_sentences, text_unit, force) -> None:
    """Tokenize a corpus into indexed datasets, byte-compatible with Megatron-LM's preprocess_data.py."""
    from interop.data.preprocess import PreprocessConfig, preprocess

    keys = [k for k in json_keys.replace(",", " ").split() if k]
    result = preprocess(PreprocessConfig(list(inputs), tokenizer, output_prefix, keys, append_eod, eod_token, workers,
                                         impl, split_sentences, text_unit, force=force))
    for key, prefix in result.outputs.items():
        click.echo(f"wrote {prefix}.bin/.idx ({key})")
    click.echo(f"{result.documents} documents, {result.tokens} tokens, dtype {result.dtype}, "
               f"{result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s")


@data_group.command("inspect")
@click.argument("prefix")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--dtype", default=None, help="Override the element type (ambiguous float codes 6/7).")
@click.option("--show", type=int, default=0, help="Also print the first N sequences' token ids.")
def inspect_command(prefix, as_json, dtype, show) -> None:
    """What a dataset is: variant, dtype, sequences, documents, tokens, length percentiles, empty documents."""
    from formats.indexed import open_dataset
    from formats.indexed.verify import summarize

    with open_dataset(prefix, dtype=dtype) as ds:
        info = summarize(ds)
        samples = [ds.get(i)[:32].tolist() if not ds.multimodal else ds.get(i)[0][:32].tolist()
                   for i in range(min(show, len(ds)))]
    if as_json:
        click.echo(json.dumps({**info, **({"samples": samples} if show else {})}, indent=2))
        return
    lengths = info["sequence_length"]
    click.echo(f"{info['prefix']}: {info['variant']}{' (multimodal)' if info['multimodal'] else ''}, "
               f"dtype {info['dtype']} (code {info['dtype_code']})")
    if info["dtype_note"]:
        click.echo(f"  note: {info['dtype_note']}")
    docs = f"{info['documents']:,} documents ({info['empty_documents']} empty)" if info["has_document_index"] \
        else "no document index"
    click.echo(f"  {info['sequences']:,} sequences, {docs}, {info['tokens']:,} tokens")
    if lengths:
        click.echo("  sequence length: " + ", ".join(f"{k} {v:,}" for k, v in lengths.items()))
    click.echo(f"  files: .idx {info['idx_bytes']:,} bytes, .bin {info['bin_bytes']:,} bytes")
    for i, ids in enumerate(samples):
        click.echo(f"  [{i}] {ids}")


@data_group.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--impl", type=click.Choice(IMPLS), default="mmap", show_default=True, help="Output variant.")
@click.option("--dtype", default=None, help="Output element type (default: the source's; values are range-checked).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def convert_command(src, dst, impl, dtype, force) -> None:
    """Rewrite any readable variant as any writable one (document boundaries kept where the target has them)."""
    from formats.indexed import create_writer, default_dtype, open_dataset

    with open_dataset(src) as ds:
        with create_writer(dst, impl=impl, dtype=dtype or default_dtype(impl, ds.dtype), multimodal=ds.multimodal,
                           force=force, inputs=[src, ds.header.idx_path, ds.header.bin_path]) as w:
            w.add_index(ds)
        click.echo(f"wrote {w.prefix}.bin/.idx: {impl}, {len(ds)} sequences, {ds.num_tokens} tokens")


@data_group.command("merge")
@click.argument("output")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def merge_command(output, inputs, force) -> None:
    """Concatenate datasets in the given order (like Megatron's merge_datasets.py), streaming, keeping
    document boundaries. INPUTS are prefixes; a directory means every pair in it, in sorted order."""
    import os

    from formats.errors import FormatError
    from formats.indexed import create_writer, read_header
    from tqdm import tqdm

    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted({os.path.join(item, n[:-4]) for n in os.listdir(item) if n.endswith((".idx", ".bin"))})
            if not names:
                raise FormatError("directory holds no .bin/.idx pair", path=item)
            prefixes.extend(names)
        else:
            prefixes.append(item[:-4] if item.endswith((".idx", ".bin")) else item)
    headers = [read_header(p) for p in prefixes]
    first = headers[0]
    for h in headers[1:]:
        if h.dtype != first.dtype:
            raise FormatError(f"dtype {h.dtype} differs from {first.dtype} of {first.idx_path}", path=h.idx_path)
        if h.multimodal != first.multimodal:
            raise FormatError("multimodal and plain datasets cannot be merged", path=h.idx_path)
    with create_writer(output, impl=first.variant, dtype=first.dtype, multimodal=first.multimodal, force=force,
                       inputs=[*inputs, *prefixes]) as w:
        for prefix in tqdm(prefixes, desc="merge", unit="dataset", disable=len(prefixes) < 2):
            w.add_index(prefix)
    click.echo(f"wrote {w.prefix}.bin/.idx from {len(prefixes)} datasets, {w.num_tokens} tokens")


@data_group.command("verify")
@click.argument("prefix")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--dtype", default=None, help="Override the element type (ambiguous float codes 6/7).")
def verify_command(prefix, as_json, dtype) -> None:
    """Check magic, version, dtype, array sizes vs file sizes, pointers, document index and .bin size."""
    from formats.errors import FormatError
    from formats.indexed.verify import verify

    report = verify(prefix, dtype=dtype)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for f in report.findings:
            click.echo(f"{'ok  ' if f.ok else 'FAIL'} {f.check}: {f.message}")
    if not report.ok:
        bad = [f for f in report.findings if not f.ok]
        raise FormatError(f"{len(bad)} check(s) failed: {bad[0].message}", path=prefix)
