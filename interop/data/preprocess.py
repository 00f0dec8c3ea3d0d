"""``interop data preprocess``: documents -> tokens -> ``{prefix}_{key}_{level}.bin/.idx``, Megatron's naming
and byte layout (docs/indexed-formats.md §3), written by :class:`formats.indexed.IndexedWriter`.

Parallelism: a reader thread parses input (JSON, file reads) while the main thread hands whole batches to
the encoder and writes them with one vectorised ``add_documents`` call per batch. Encoders, fastest first:
- regex-split byte-level BPE tokenizers (GPT-2, Llama-3 style; see :mod:`interop.data.piece_cache`) at document
  level: each distinct pre-tokenized piece is encoded once and cached; ``workers`` processes (forked, see
  :func:`_piece_pool`) each keep their own cache and return int32 arrays; documents the cache cannot provably
  handle go through the Rust tokenizer there;
- other Rust ("fast") tokenizers: ``encode_batch_fast`` on ``workers`` Rayon threads, GIL released;
- slow (Python) tokenizers: a process pool of ``workers`` processes.
Output is identical to Megatron-LM's ``preprocess_data.py`` with the same tokenizer: same empty-document rule,
EOD counted in the last sequence, dtype from the vocabulary size.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from formats.errors import InteropError
from formats.indexed import create_writer, default_dtype, dtype_for_vocab
from interop.data.piece_cache import PieceEncoder, plan_for
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
            writers[key] = create_writer(prefix, impl=cfg.impl, dtype=dtype, force=cfg.force, inputs=files)
        stats = _run(cfg, files, tok, writers, splitter)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return PreprocessResult(outputs, stats["docs"], stats["tokens"], stats["bytes"], stats["seconds"], str(dtype))


_BATCH_BYTES = 4 << 20  # also cap a batch by input size: the token lists of a batch live as Python ints
_POOL_BATCH_BYTES = 1 << 20  # piece path with a pool: one task per batch, small enough to balance the workers


def _batches(files, keys, text_unit, batch_size, max_bytes=_BATCH_BYTES):
    batch, size = [], 0
    for doc in iter_documents(files, keys, text_unit):
        batch.append(doc)
        size += doc[1]
        if len(batch) >= batch_size or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _run(cfg: PreprocessConfig, files, tok: LoadedTokenizer, writers, splitter) -> dict:
    from tqdm import tqdm

    stats = {"docs": 0, "tokens": 0, "bytes": 0}
    start = time.perf_counter()
    plan = plan_for(tok.backend) if tok.backend is not None and splitter is None else None
    encoder = PieceEncoder(tok.backend, plan) if plan is not None else None
    pool = None
    if cfg.workers > 1 and encoder is not None:
        pool = _piece_pool(encoder, cfg.workers)  # before the reader thread starts
    elif cfg.workers > 1 and tok.backend is None:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(cfg.workers, _pool_init, (cfg.tokenizer, cfg.eod_token))
    # the piece path spreads batches over processes: smaller batches keep both busy up to the end
    max_bytes = _POOL_BATCH_BYTES if plan is not None and pool is not None else _BATCH_BYTES
    batches = prefetch(_batches(files, cfg.json_keys, cfg.text_unit, cfg.batch_size, max_bytes), 4, name="preprocess-reader")
    eod = tok.eod_id if cfg.append_eod else None
    bar = tqdm(unit="doc", desc="preprocess", disable=not cfg.progress, mininterval=0.5, dynamic_ncols=True)
    finished = False
    try:
        if plan is not None:
            encoded = _piece_stream(batches, cfg.json_keys, pool, encoder)
        else:
            encoded = _encode_stream(batches, tok, cfg.json_keys, splitter, pool)
        for batch_docs, nbytes, per_key in encoded:
            for key, docs in per_key.items():
                if splitter is None:
                    flat, lengths = docs if plan is not None else _pack([doc[0] for doc in docs])
                    stats["tokens"] += _write_documents(writers[key], flat, lengths, eod)
                else:
                    stats["tokens"] += _write_segmented(writers[key], docs, eod)
            stats["docs"] += batch_docs
            stats["bytes"] += nbytes
            bar.update(batch_docs)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats['tokens'] / max(elapsed, 1e-9):,.0f} tok/s, {stats['bytes'] / 1e6 / max(elapsed, 1e-9):.1f} MB/s")
        finished = True
    finally:
        bar.close()
        if pool is not None:
            _shut_down(pool, finished)
    stats["seconds"] = time.perf_counter() - start
    return stats


def _shut_down(pool, finished: bool) -> None:
    """Close a worker pool: after a finished run, let the idle workers take their stop sentinels and exit
    (``close`` + ``join``); after an error or an interrupt, kill them (``terminate``).

    Why not always ``terminate``: it first takes the task queue's read lock, which an idle worker holds while it
    blocks reading the next task; under load that wait was seen to last until the worker was killed by hand (a
    hung ``test_preprocess_fast`` run)."""
    if finished:
        pool.close()
        pool.join()
    else:
        pool.terminate()


def _piece_stream(batches, keys, pool, encoder):
    """The piece-cache path (document level): yield ``(n_docs, n_bytes, {key: (flat ids, lengths)})``, encoded
    in-process by ``encoder`` or, with a pool, one task per batch and key (``imap`` keeps input order)."""
    if pool is None:
        for batch in batches:
            yield len(batch), sum(n for _, n in batch), {key: _pack(encoder.encode_batch([texts[k] for texts, _ in batch]))
                                                          for k, key in enumerate(keys)}
        return
    meta: list = []

    def tasks():
        for batch in batches:
            meta.append((len(batch), sum(n for _, n in batch)))
            for k in range(len(keys)):
                yield [texts[k] for texts, _ in batch]

    results = pool.imap(_piece_encode, tasks())
    for first in results:
        n_docs, nbytes = meta.pop(0)
        yield n_docs, nbytes, {key: first if i == 0 else next(results) for i, key in enumerate(keys)}


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


def _pack(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (one flat int32 array, per-list lengths): cheap to pickle, one writer call."""
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    return np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(lengths.sum())), lengths


def _write_documents(writer, flat: np.ndarray, lengths: np.ndarray, eod: int | None) -> int:
    """Write one batch of document-level data (one sequence per non-empty document, EOD appended to each
    non-empty one as Megatron-LM does); return the tokens written."""
    if eod is not None:
        nonempty = lengths > 0
        flat = np.insert(flat, np.cumsum(lengths)[nonempty], eod)
        lengths = lengths + nonempty
    writer.add_documents(flat, lengths)
    return int(flat.size)


def _write_segmented(writer, docs: list[list[list[int]]], eod: int | None) -> int:
    """Write documents of several sequences (sentence level); return the tokens written."""
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


_PIECE_ENCODER: PieceEncoder | None = None


def _piece_pool(encoder: PieceEncoder, workers: int):
    """Worker processes for the piece path. Forked on Linux when this process runs no other Python thread
    (tqdm's monitor, which only sleeps, aside): children inherit the encoder (no re-import of the caller's main
    module, no tokenizer re-parse, as Megatron-LM's own fork pool); otherwise spawned, each child rebuilding
    the encoder from the tokenizer's JSON."""
    global _PIECE_ENCODER
    import multiprocessing
    import sys
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != "tqdm_monitor"]
    if sys.platform.startswith("linux") and not others:
        _PIECE_ENCODER = encoder
        return multiprocessing.get_context("fork").Pool(workers)
    return multiprocessing.get_context("spawn").Pool(workers, _piece_init, (encoder.backend.to_str(),))


def _piece_init(tokenizer_json: str) -> None:
    global _PIECE_ENCODER
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    _PIECE_ENCODER = PieceEncoder(backend, plan_for(backend))


def _piece_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _pack(_PIECE_ENCODER.encode_batch(texts))


def _sentence_splitter():
    """The offline sentence splitter (:mod:`interop.data.sentences`)."""
    from interop.data.sentences import sentence_splitter

    return sentence_splitter()
