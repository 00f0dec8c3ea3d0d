"""dtype-code tables of the indexed formats, per producer.

The same one-byte (mmap) or eight-byte (TNTIDX) code means different element types depending on who
wrote the file (docs/indexed-formats.md §1.2): codes 6 and 7 flipped between float64/float32 over Megatron's history and
fairseq added 9/10. A reader therefore picks a table per variant and reports when the code is one of
the ambiguous ones, so that a user can override the element type.
"""
from __future__ import annotations

import numpy as np

#: Megatron-Core (all versions) and Megatron-LM since 2023-06: what every current Megatron reader uses.
MEGATRON_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
#: fairseq since 2021-02: 6 and 7 both float64 (it writes 6), plus uint32/uint64.
FAIRSEQ_CODES: dict[int, np.dtype] = {
    **MEGATRON_CODES, 7: np.dtype(np.float64), 9: np.dtype(np.uint32), 10: np.dtype(np.uint64),
}
#: Codes whose meaning depends on the producer's version; the reader says so (``dtype_note``).
AMBIGUOUS_CODES = {
    6: "code 6 is float64 for Megatron-Core/fairseq but float32 for Megatron-LM of May-June 2023",
    7: "code 7 is float32 for Megatron-Core but float64 for fairseq and Megatron-LM before May 2023",
}

#: Megatron-LM's legacy (TNTIDX) writer has no uint16 entry: these are the element types it can write.
LEGACY_WRITABLE = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


def code_for(dtype: np.dtype | type, table: dict[int, np.dtype] = MEGATRON_CODES) -> int:
    """The code a writer emits for ``dtype`` (first match, as every producer does)."""
    dtype = np.dtype(dtype)
    for code, value in table.items():
        if value == dtype:
            return code
    raise ValueError(f"no dtype code for {dtype} in this format")


def dtype_for_vocab(vocab_size: int | None) -> np.dtype:
    """Megatron's writer rule (``preprocess_data.py``): uint16 iff the vocabulary has < 65500 entries."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def fits(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every value of an integer array is representable in ``dtype`` (floats: always)."""
    dtype = np.dtype(dtype)
    if values.size == 0 or dtype.kind == "f" or np.can_cast(values.dtype, dtype, "safe"):
        return True
    if values.dtype.kind == "f" and dtype.kind in "iu":
        return bool(np.array_equal(values, np.round(values))) and _in_range(values, dtype)
    return _in_range(values, dtype)


def _in_range(values: np.ndarray, dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return int(values.min()) >= info.min and int(values.max()) <= info.max
