"""``interop data preprocess``: documents -> tokens -> ``{prefix}_{key}_{level}.bin/.idx``, Megatron's naming
and byte layout (spec §3), written by :class:`formats.indexed.IndexedWriter`.

Parallelism: a reader thread parses input (JSON, file reads) while the main thread hands whole batches to
the Rust tokenizer (``encode_batch_fast`` on ``workers`` Rayon threads, GIL released) and writes them with
one vectorised ``add_documents`` call per batch. Slow (Python) tokenizers are encoded by a process pool of
``workers`` processes instead. Output is identical to Megatron-LM's ``preprocess_data.py`` with the same
tokenizer: same empty-document rule, EOD counted in the last sequence, dtype from the vocabulary size.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from formats.errors import FormatError, InteropError
from formats.indexed import create_writer, default_dtype, dtype_for_vocab
from interop.data.sources import expand_inputs, iter_documents
from interop.data.tokenizer import LoadedTokenizer, load_tokenizer
from interop.streams import prefetch


@dataclass
class PreprocessConfig:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    eod_token: str | None = None
    workers: int = 1
    impl: str = "mmap"
    split_sentences: bool = False
    text_unit: str = "file"  # plain-text inputs: one document per "file" or per "line"
    batch_size: int = 1024  # documents per tokenizer call (and at most _BATCH_BYTES of input)
    force: bool = False
    progress: bool = True


@dataclass
class PreprocessResult:
    outputs: dict[str, str]  # json key -> dataset prefix
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def output_prefix(prefix: str, key: str, level: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_{document|sentence}``."""
    return f"{prefix}_{key}_{level}"


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    if cfg.workers < 1:
        raise InteropError(f"--workers must be >= 1, got {cfg.workers}")
    splitter = _sentence_splitter() if cfg.split_sentences else None
    files = expand_inputs(cfg.inputs)
    os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.workers))  # read once, on the first batch encode
    tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    if cfg.append_eod and tok.eod_id is None:
        raise InteropError(f"{cfg.tokenizer}: --append-eod needs an EOS/EOD token; name one with --eod-token")
    dtype = default_dtype(cfg.impl, dtype_for_vocab(tok.vocab_size))  # lazy/cached: int32, as Megatron-LM
    level = "sentence" if splitter else "document"
    outputs = {key: output_prefix(cfg.output_prefix, key, level) for key in cfg.json_keys}
    writers = {}
    try:
        for key, prefix in outputs.items():
            writers[key] = create_writer(prefix, impl=cfg.impl, dtype=dtype, force=cfg.force)
        stats = _run(cfg, files, tok, writers, splitter)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return PreprocessResult(outputs, stats["docs"], stats["tokens"], stats["bytes"], stats["seconds"], str(dtype))


_BATCH_BYTES = 4 << 20  # also cap a batch by input size: the token lists of a batch live as Python ints


def _batches(files, keys, text_unit, batch_size):
    batch, size = [], 0
    for doc in iter_documents(files, keys, text_unit):
        batch.append(doc)
        size += doc[1]
        if len(batch) >= batch_size or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _run(cfg: PreprocessConfig, files, tok: LoadedTokenizer, writers, splitter) -> dict:
    from tqdm import tqdm

    stats = {"docs": 0, "tokens": 0, "bytes": 0}
    start = time.perf_counter()
    batches = prefetch(_batches(files, cfg.json_keys, cfg.text_unit, cfg.batch_size), 4, name="preprocess-reader")
    pool = None
    if tok.backend is None and cfg.workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(cfg.workers, _pool_init, (cfg.tokenizer, cfg.eod_token))
    bar = tqdm(unit="doc", desc="preprocess", disable=not cfg.progress, mininterval=0.5, dynamic_ncols=True)
    try:
        encoded = _encode_stream(batches, tok, cfg.json_keys, splitter, pool)
        for batch_docs, nbytes, per_key in encoded:
            for key, segments in per_key.items():
                stats["tokens"] += _write_batch(writers[key], segments, tok.eod_id if cfg.append_eod else None, splitter)
            stats["docs"] += batch_docs
            stats["bytes"] += nbytes
            bar.update(batch_docs)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats['tokens'] / max(elapsed, 1e-9):,.0f} tok/s, {stats['bytes'] / 1e6 / max(elapsed, 1e-9):.1f} MB/s")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    stats["seconds"] = time.perf_counter() - start
    return stats


def _encode_stream(batches, tok, keys, splitter, pool):
    """Yield ``(n_docs, n_bytes, {key: per-document lists of token-id lists (one per segment)})``."""
    def segment(batch):
        per_key = {}
        for k, key in enumerate(keys):
            texts = [texts[k] for texts, _ in batch]
            per_key[key] = [splitter(t) for t in texts] if splitter else [[t] for t in texts]
        return per_key

    def encode(per_key):
        out = {}
        for key, docs in per_key.items():
            flat = [s for doc in docs for s in doc]
            ids = tok.encode_batch(flat) if pool is None else None
            out[key] = (docs, ids, flat)
        return out

    if pool is None:
        for batch in batches:
            encoded = encode(segment(batch))
            yield len(batch), sum(n for _, n in batch), {k: _regroup(d, ids) for k, (d, ids, _) in encoded.items()}
        return
    # process pool: each task is one key's segments of one batch; imap keeps input order
    def tasks():
        for batch in batches:
            per_key = segment(batch)
            meta.append((len(batch), sum(n for _, n in batch), {k: d for k, d in per_key.items()}))
            for key in keys:
                yield [s for doc in per_key[key] for s in doc]

    meta: list = []
    results = pool.imap(_pool_encode, tasks())
    while True:
        try:
            first = next(results)
        except StopIteration:
            return
        n_docs, nbytes, docs_per_key = meta.pop(0)
        per_key = {}
        for i, key in enumerate(keys):
            ids = first if i == 0 else next(results)
            per_key[key] = _regroup(docs_per_key[key], ids)
        yield n_docs, nbytes, per_key


def _regroup(docs, ids):
    out, pos = [], 0
    for doc in docs:
        out.append(ids[pos: pos + len(doc)])
        pos += len(doc)
    return out


def _write_batch(writer, docs: list[list[list[int]]], eod: int | None, splitter) -> int:
    """Write one batch of documents (each a list of segment id lists); return the tokens written."""
    if splitter is None:  # document level: one sequence per non-empty document, vectorised
        seqs = [doc[0] for doc in docs]
        if eod is not None:
            seqs = [s + [eod] if s else s for s in seqs]
        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, total)
        writer.add_documents(flat, lengths)
        return total
    total = 0
    for doc in docs:
        segs = [list(s) for s in doc if len(s)]
        if segs and eod is not None:
            segs[-1].append(eod)
        lengths = [len(s) for s in segs]
        writer.add_document(np.fromiter(itertools.chain.from_iterable(segs), np.int64, sum(lengths)), lengths)
        total += sum(lengths)
    return total


_POOL_TOKENIZER: LoadedTokenizer | None = None


def _pool_init(source: str, eod_token: str | None) -> None:
    global _POOL_TOKENIZER
    _POOL_TOKENIZER = load_tokenizer(source, eod_token)


def _pool_encode(texts: list[str]) -> list[list[int]]:
    return _POOL_TOKENIZER.encode_batch(texts)


def _sentence_splitter():
    """NLTK punkt, only if it and its data are installed locally (nothing is downloaded)."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt")
    except (ImportError, LookupError):
        raise InteropError("--split-sentences needs NLTK with the 'punkt' data installed locally "
                           "(pip install nltk; python -m nltk.downloader punkt); nothing is downloaded at run time") from None
    from nltk.tokenize import sent_tokenize

    return lambda text: sent_tokenize(text)
