"""Data for the encoder training tests: a WordPiece ``tokenizer.json`` over a 100-token vocabulary
(``[PAD] [UNK] [CLS] [SEP] [MASK]`` then ``w5`` … ``w99``) and a sentence-level indexed corpus written by
Megatron-Core's own ``IndexedDatasetBuilder`` (documents of 2-6 sentences; a sentence is a counting run with a
per-document stride, so masked tokens are predictable from their neighbours and the loss falls)."""
from __future__ import annotations

import os

import numpy as np
import torch

VOCAB = 100
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FIRST_WORD = len(SPECIALS)


def write_wordpiece_tokenizer(directory: str, drop: str | None = None) -> str:
    """``directory/tokenizer.json`` (``drop``: leave that special token out of the vocabulary)."""
    from tokenizers import models

    names = [t for t in SPECIALS if t != drop] + [f"w{i}" for i in range(FIRST_WORD, VOCAB)]
    return _save(models.WordPiece({t: i for i, t in enumerate(names)}, unk_token="[UNK]"), directory)


def _save(model, directory: str) -> str:
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SENTINELS = 10  # <extra_id_0> … <extra_id_9>: the last ids of the vocabulary, as in T5's tokenizer


def write_t5_tokenizer(directory: str, sentinels: int = SENTINELS) -> str:
    """``directory/tokenizer.json``: ``<pad> </s> <unk>``, words ``w3`` …, then the sentinels (100 ids in all)."""
    from tokenizers import models

    words = [f"w{i}" for i in range(len(T5_SPECIALS), VOCAB - SENTINELS)]
    names = list(T5_SPECIALS) + words + [f"<extra_id_{i}>" for i in range(sentinels)]
    return _save(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"), directory)


def write_sentence_corpus(prefix: str, docs: int = 120, seed: int = 0, first: int = FIRST_WORD,
                          end: int = VOCAB) -> str:
    """Sentences of word ids in ``[first, end)``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    span = end - first
    for _ in range(docs):
        start, stride = int(rng.integers(0, span)), int(rng.integers(1, 4))
        pos = 0
        for _ in range(int(rng.integers(2, 7))):
            length = int(rng.integers(4, 14))
            ids = (start + stride * (pos + np.arange(length))) % span + first
            pos += length
            builder.add_item(torch.from_numpy(ids.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix
