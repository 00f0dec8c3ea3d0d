"""The true vocabulary size of a Megatron checkpoint (docs/checkpoint-formats.md §10.1), and where it came from.

Megatron stores the **padded** table (``padded_vocab_size`` rows, docs/checkpoint-formats.md §4.2); exporting those rows to HF gives a
model that predicts ids no tokenizer produces. The true size is recoverable from what each producer records:

* ours: ``args.true_vocab_size``;
* Transformers' old ``checkpoint_reshaping_and_interoperability.py``: ``args.orig_vocab_size``;
* Megatron-LM with ``--tokenizer-type NullTokenizer --vocab-size V``: ``V + 1`` (the tokenizer appends EOD;
  MLM16 ``_NullTokenizer.vocab_size``);
* ``HuggingFaceTokenizer``: ``len()`` of the tokenizer at ``args.tokenizer_model`` when that is a local directory
  inside or next to the checkpoint (never the Hub: MLM16 ``_HuggingFaceTokenizer.vocab_size`` is ``len()``);
* ``GPT2BPETokenizer``: the entries of ``args.vocab_file`` when it is readable, else GPT-2's 50,257;
  ``BertWordPieceLowerCase/Case``: the lines of a readable ``args.vocab_file``.

Anything else is unknown: :func:`true_vocab_size` then refuses in one line and asks for ``--vocab-size`` rather
than silently exporting padding rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from interop.errors import ConversionError

GPT2_BPE_VOCAB = 50257  # GPT-2's vocab.json (MLM16 _GPT2BPETokenizer.vocab_size = len(encoder))
TOKENIZER_DIR = "tokenizer"  # where our writers put the source's tokenizer files (beside iter_*/release)


@dataclass(frozen=True)
class VocabInfo:
    """``true``: rows a tokenizer can produce (None when unknown); ``padded``: rows Megatron stores; ``source``:
    where ``true`` came from (or why it is unknown), in words a user can act on."""

    true: int | None
    padded: int | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def infer_vocab(ckpt, vocab_size: int | None = None, padded: int | None = None) -> VocabInfo:
    """What the producer of Megatron checkpoint ``ckpt`` recorded about its vocabulary.

    ``vocab_size`` (the user's ``--vocab-size``) wins; ``padded`` is the stored row count when the args lack
    ``padded_vocab_size``.
    """
    args = ckpt.args
    get: Callable[..., Any] = lambda k, d=None: getattr(args, k, d) if args is not None else d  # noqa: E731
    padded = _int(get("padded_vocab_size")) or padded
    true, source = _true_size(get, _search_dirs(ckpt), vocab_size)
    return VocabInfo(true, padded, source)


def true_vocab_size(ckpt, vocab_size: int | None = None) -> int:
    """The true V of ``ckpt`` (see :func:`infer_vocab`); a one-line :class:`ConversionError` when it cannot be
    told or contradicts the stored rows."""
    info = infer_vocab(ckpt, vocab_size)
    if info.true is None:
        keep = f" (--vocab-size {info.padded} keeps every stored row)" if info.padded else ""
        raise ConversionError(f"cannot tell the true vocabulary size: {info.source}; pass --vocab-size N{keep}",
                              path=ckpt.path)
    if info.padded is not None and info.true > info.padded:
        raise ConversionError(f"true vocabulary {info.true} ({info.source}) exceeds the {info.padded} stored rows",
                              path=ckpt.path)
    return info.true


# ---------------------------------------------------------------------------------------------------------------


def _true_size(get: Callable[..., Any], dirs: list[Path], vocab_size: int | None) -> tuple[int | None, str]:
    if vocab_size:
        return int(vocab_size), "--vocab-size"
    for field, producer in (("true_vocab_size", "interop"), ("orig_vocab_size", "Transformers' reshaping script")):
        if _int(get(field)):
            return _int(get(field)), f"args.{field} ({producer})"
    kind = get("tokenizer_type")
    if kind == "NullTokenizer" and _int(get("vocab_size")):
        return _int(get("vocab_size")) + 1, f"NullTokenizer: args.vocab_size {_int(get('vocab_size'))} + EOD"
    if kind in _COUNTED:
        field, want_dir, count, fallback = _COUNTED[kind]
        where = _local(get(field), dirs, want_dir=want_dir)
        n = count(where) if where is not None else None
        if n:
            extra = int(get("vocab_extra_ids", 0) or 0) if kind.startswith("BertWordPiece") else 0
            return n + extra, f"{kind} {field} {where}"
        if fallback:
            return fallback, f"{kind} (GPT-2's {fallback:,} tokens)"
        return None, f"{kind} {field} {get(field)!r} is not readable beside the checkpoint"
    if kind:
        return None, f"args record tokenizer_type {kind} without a size"
    return None, "args record no true_vocab_size/orig_vocab_size and no tokenizer_type"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _search_dirs(ckpt) -> list[Path]:
    """Directories a relative tokenizer path may be relative to: the iteration directory, the save directory
    and the directory holding that. The working directory is deliberately not one of them."""
    path = Path(ckpt.path).resolve()
    return [path, *list(path.parents)[:2]]


def _local(name: Any, dirs: list[Path], *, want_dir: bool) -> Path | None:
    """``name`` as an existing local file/directory: absolute, or relative to one of ``dirs``; also our own
    ``tokenizer/`` folder beside the checkpoint. Never a Hub id."""
    candidates: list[Path] = []
    if isinstance(name, str) and name:
        p = Path(name)
        candidates += [p] if p.is_absolute() else [d / p for d in dirs]
    if want_dir:
        candidates += [d / TOKENIZER_DIR for d in dirs]
    for c in candidates:
        if (c.is_dir() if want_dir else c.is_file()):
            return c
    return None


def _line_count(path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


def _json_len(path: Path) -> int | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return len(data) if isinstance(data, dict) else None


def _hf_tokenizer_len(directory: Path) -> int | None:
    """``len(tokenizer)`` of a local HF tokenizer directory (added tokens included), offline."""
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tok_json)).get_vocab_size(with_added_tokens=True)
        except Exception:  # noqa: BLE001 - fall back to Transformers' own loader below
            pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "cannot tell", reported by the caller
        return None


# tokenizer_type -> (args field naming its files, a directory?, how to count them, size when they are not here)
_COUNTED: dict[str, tuple[str, bool, Callable[[Path], int | None], int | None]] = {
    "HuggingFaceTokenizer": ("tokenizer_model", True, _hf_tokenizer_len, None),
    "GPT2BPETokenizer": ("vocab_file", False, _json_len, GPT2_BPE_VOCAB),
    "BertWordPieceLowerCase": ("vocab_file", False, _line_count, None),
    "BertWordPieceCase": ("vocab_file", False, _line_count, None),
}
