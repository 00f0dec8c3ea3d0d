"""Megatron and fairseq indexed datasets (``.bin``/``.idx`` pairs): sniffing readers and streaming writers.

    ds = open_dataset("data/wiki_text_document")      # any variant; ds[i], ds.get(i, off, n), ds.sizes
    with create_writer("out/merged", dtype=ds.dtype) as w:
        w.add_index(ds)                                 # or w.add_item(tokens); w.end_document()

Byte layouts and the traps they hide: ``docs/indexed-formats.md``.
"""
from formats.indexed.dtypes import dtype_for_vocab
from formats.indexed.header import IMPL_CHOICES, IndexHeader, Variant, read_header
from formats.indexed.reader import IndexedDataset, open_dataset
from formats.indexed.writer import IndexedWriter, create_writer, default_dtype

__all__ = [
    "IMPL_CHOICES", "IndexHeader", "IndexedDataset", "IndexedWriter", "Variant", "create_writer", "default_dtype",
    "dtype_for_vocab", "open_dataset", "read_header",
]
