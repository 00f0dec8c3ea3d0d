"""Loading a tokenizer for preprocessing: anything Transformers loads from a local directory, or a bare
``tokenizer.json`` for ``tokenizers``.

Encoding goes through the Rust ``tokenizers.Tokenizer`` whenever one exists (every "fast" tokenizer has
one): ``encode_batch_fast`` runs on Rayon threads without the GIL, which is where the speed over
Megatron-LM's per-document ``tokenizer(text)`` calls comes from. Slow (Python) tokenizers fall back to
batched ``tokenizer(texts)`` calls. The vocabulary size used for the dtype rule is Megatron's: the HF
wrapper reports ``len(tokenizer)`` (added tokens included).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from formats.errors import FormatError


@dataclass
class LoadedTokenizer:
    source: str
    vocab_size: int  # Megatron's count (added tokens included): decides uint16 vs int32
    eod_id: int | None
    backend: Any  # tokenizers.Tokenizer, or None for slow tokenizers
    hf: Any  # the transformers tokenizer, or None for a bare tokenizer.json

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]
        return self.hf(texts, add_special_tokens=True)["input_ids"]


def load_tokenizer(source: str, eod_token: str | None = None) -> LoadedTokenizer:
    """Load from a directory (``AutoTokenizer``, local files only) or a ``tokenizer.json`` file."""
    if os.path.isfile(source):
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(source)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise FormatError(f"not a tokenizers JSON file ({str(exc).splitlines()[0]})", path=source) from None
        eod = _token_id(backend.token_to_id, eod_token, source) if eod_token else guess_eod(backend)
        return LoadedTokenizer(source, backend.get_vocab_size(with_added_tokens=True), eod, backend, None)
    if not os.path.isdir(source):
        raise FormatError("no such tokenizer directory or tokenizer.json", path=source)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/… for unusable directories
        raise FormatError(f"cannot load a tokenizer from it ({str(exc).splitlines()[0]})", path=source) from None
    backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
    if eod_token:
        eod = _token_id(lambda t: hf.convert_tokens_to_ids(t) if t in hf.get_vocab() else None, eod_token, source)
    else:
        eod = hf.eos_token_id
    return LoadedTokenizer(source, len(hf), eod, backend, hf)


def load_fast_tokenizer(source: str) -> Any:
    """The Rust ``tokenizers.Tokenizer`` of ``source`` — a ``tokenizer.json``, or a directory holding one (read
    directly, no Transformers import) or holding what ``AutoTokenizer`` loads — for training and generation,
    which encode and decode with it; a slow-only tokenizer is a one-line error."""
    file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
    loaded = load_tokenizer(file if os.path.exists(file) else source)
    if loaded.backend is None:
        raise FormatError("needs a fast tokenizer (tokenizer.json)", path=source)
    return loaded.backend


def _token_id(lookup, token: str, source: str) -> int:
    token_id = lookup(token)
    if token_id is None:
        raise FormatError(f"EOD token {token!r} is not in the vocabulary", path=source)
    return token_id


def guess_eod(backend) -> int | None:
    for token in ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"):
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
