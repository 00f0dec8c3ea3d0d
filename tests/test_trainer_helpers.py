"""Shared pieces of the trainer tests (no tests here): a learnable corpus written by Megatron-Core's own
``IndexedDatasetBuilder`` (so the producer, not our writer, makes the files the trainer reads)."""
import numpy as np
import torch

VOCAB = 256
EOD = 0


def write_corpus(prefix: str, docs: int = 200, seed: int = 0) -> str:
    """Documents that are counting runs with a per-document stride: next token is predictable."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        length = int(rng.integers(20, 90))
        start, stride = int(rng.integers(1, VOCAB)), int(rng.integers(1, 4))
        ids = (start + stride * np.arange(length)) % (VOCAB - 1) + 1  # never EOD inside a document
        builder.add_item(torch.from_numpy(np.append(ids, EOD).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix
