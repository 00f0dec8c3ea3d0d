"""Exact fast encoding for regex-split byte-level BPE tokenizers: encode each distinct pre-tokenized piece once.

Why: the Rust ``tokenizers`` pipeline redoes the regex split, the byte-level map, the BPE merges and builds a
full ``Encoding`` (offsets, masks, type ids) for every word of every document; Megatron-style corpora repeat
the same words millions of times. For a pipeline that is provably "split by a regex, byte-level map and BPE
each piece independently", the ids of a document are the concatenation of the ids of its pieces, so we split
in C (the stdlib ``re`` with an ASCII spelling of the pattern for pure-ASCII documents, the ``regex`` module
otherwise), look every piece up in a dict (a miss goes through the same tokenizer reduced to its byte-level
map and model) and concatenate at C speed: ~3x fewer CPU-seconds than ``encode_batch_fast`` on source code.

When it applies (:func:`plan_for` parses the tokenizer's own JSON and returns ``None`` otherwise):
- model BPE without dropout (dropout is random; every other BPE option lives inside the model, which we call);
- no normalizer; no truncation or padding;
- pre-tokenizer ``ByteLevel(use_regex=True)`` (GPT-2's regex, ``add_prefix_space`` honoured) or
  ``Sequence[Split(<a known regex>, Isolated), ByteLevel(use_regex=False, add_prefix_space=False)]``
  (Llama-3 style); only regexes listed in :data:`KNOWN_PATTERNS`, whose every character class we probe;
- post-processor none, ``ByteLevel`` (offsets only), ``TemplateProcessing`` whose single-sequence template is
  special tokens around the sequence (their ids are added as a fixed prefix/suffix), or a ``Sequence`` of those.

Per document, the fast path is used only when it provably gives the pipeline's result: a document containing
the text of any added token (special or not) goes the slow way, since the pipeline splits those out first;
so does a document with any character on which our regex engine and the tokenizer's (Oniguruma) have not been
shown to agree. Agreement is shown per character, once, by running both pre-tokenizers on probe strings
that put the character next to a letter, digit, symbol, space, newline, apostrophe and itself: with the
pattern fixed, its result depends on each character only through the classes it belongs to
(``\\p{L}``, ``\\p{N}``, ``\\s``, ``\\r\\n``, the case-folded contraction letters), which those probes reveal.
ASCII is probed up front for both splitters; any other character when first seen (~0.2 ms each, per process).
Everything else goes through ``encode_batch_fast`` of the same tokenizer, so output is always that of
``Tokenizer.encode_batch_fast(texts, add_special_tokens=True)``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

# GPT-2's split, built into tokenizers' ByteLevel pre-tokenizer (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama-3 / GPT-4 (cl100k) split, as Llama-3's tokenizer.json spells it in its Split pre-tokenizer.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The same patterns for pure-ASCII text, for the stdlib ``re`` (faster than ``regex``; no \p classes): on
# ASCII, \p{L} is [A-Za-z], \p{N} is [0-9] and \s the ASCII whitespace. Probed like the Unicode ones.
_WS = r"\t\n\x0b\x0c\r "
KNOWN_PATTERNS = {
    GPT2_PATTERN: rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""",
    LLAMA3_PATTERN: (rf"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_WS}A-Za-z0-9]+[\r\n]*"""
                     rf"""|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""),
}

# Contexts that reveal a character's classes for the known patterns (see the module docstring).
_PROBES = ("{c}", "a{c}", "{c}a", "1{c}", "{c}1", "!{c}", "{c}!", " {c}", "{c} ", "  {c}", "{c}  ", "{c}  a",
           "\n{c}", "{c}\n", "\r{c}", "{c}\r", "'{c}", "'{c}e", "'{c}l", "'r{c}", "'v{c}", "'l{c}", "'{c}{c}",
           "{c}{c}{c}{c}{c}", "a {c}a", "1{c}1", "!{c}!", "x{c} \n", "\t{c}\t")

_CACHE_LIMIT = 1 << 19  # distinct pieces kept per process (~100 MB at most); the cache restarts when full


@dataclass(frozen=True)
class PiecePlan:
    """What the fast path needs to reproduce one tokenizer's ``encode(text, add_special_tokens=True)``."""
    pattern: str  # the split regex, in ``regex``-module syntax (identical to the tokenizer's)
    add_prefix_space: bool  # ByteLevel's: a space is prepended to a text that does not start with one
    prefix: tuple[int, ...]  # post-processor ids before the sequence
    suffix: tuple[int, ...]  # ... and after it
    added: tuple[str, ...]  # added-token texts: a document containing one takes the slow path


def plan_for(backend) -> PiecePlan | None:
    """The plan for a ``tokenizers.Tokenizer`` if its pipeline is one we reproduce exactly, else ``None``."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0.0):
        return None
    if spec.get("normalizer") is not None or spec.get("truncation") is not None or spec.get("padding") is not None:
        return None
    split = _split_of(spec.get("pre_tokenizer"))
    ends = _post_ids(spec.get("post_processor"))
    if split is None or ends is None:
        return None
    added = tuple(sorted({t["content"] for t in spec.get("added_tokens") or []}))
    if not all(added):
        return None
    return PiecePlan(split[0], split[1], ends[0], ends[1], added)


def _split_of(pre) -> tuple[str, bool] | None:
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN, bool(pre.get("add_prefix_space", True))
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or ()) == 2:
        split, byte_level = pre["pretokenizers"]
        pattern = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") == "Split" and pattern in KNOWN_PATTERNS and split.get("behavior") == "Isolated"
                and not split.get("invert", False) and byte_level.get("type") == "ByteLevel"
                and byte_level.get("use_regex") is False and byte_level.get("add_prefix_space") is False):
            return pattern, False
    return None


def _post_ids(post) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(prefix ids, suffix ids) the post-processor adds to a single sequence, or None if unrecognised."""
    if post is None or post.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return (), ()
    if post.get("type") == "Sequence":
        prefix, suffix = (), ()
        for part in post.get("processors") or ():
            ends = _post_ids(part)
            if ends is None or (ends != ((), ()) and (prefix or suffix)):
                return None  # two id-adding processors: not a layout we reproduce
            prefix, suffix = ends if ends != ((), ()) else (prefix, suffix)
        return prefix, suffix
    if post.get("type") == "TemplateProcessing":
        template = post.get("single") or []
        seq = [i for i, item in enumerate(template) if "Sequence" in item]
        if len(seq) != 1 or template[seq[0]]["Sequence"].get("id") != "A":
            return None
        specials = post.get("special_tokens") or {}
        try:
            ids = [tuple(specials[item["SpecialToken"]["id"]]["ids"]) if "SpecialToken" in item else None for item in template]
        except KeyError:
            return None
        return (tuple(itertools.chain.from_iterable(ids[: seq[0]])),
                tuple(itertools.chain.from_iterable(ids[seq[0] + 1:])))
    return None


def _piece_model_json(spec: dict) -> str:
    """The same tokenizer reduced to "byte-level map one piece, then the model": no normalizer, split, added
    tokens or post-processor. Encoding a piece with it is exactly what the full pipeline does to that piece."""
    spec = dict(spec, normalizer=None, post_processor=None, decoder=None, added_tokens=[], truncation=None, padding=None,
                pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False})
    return json.dumps(spec)


class _PieceCache(dict):
    """piece -> ids. A miss is encoded on the spot by the piece tokenizer (byte-level map + model): no extra pass
    over a batch to collect misses. Starts over when full, so memory stays bounded on any corpus."""

    def __init__(self, encode):
        super().__init__()
        self._encode = encode

    def __missing__(self, piece: str) -> tuple[int, ...]:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        ids = self[piece] = tuple(self._encode(piece, add_special_tokens=False).ids)
        return ids


class PieceEncoder:
    """Encodes like ``backend.encode_batch_fast(texts, add_special_tokens=True)``, with the fast path per
    document wherever it provably applies. One per process (it keeps a piece cache and the verified characters)."""

    def __init__(self, backend, plan: PiecePlan):
        import re

        import regex
        from tokenizers import Tokenizer

        self.backend, self.plan = backend, plan
        self._pieces = Tokenizer.from_str(_piece_model_json(json.loads(backend.to_str())))
        self._findall = regex.compile(plan.pattern).findall
        self._findall_ascii = re.compile(KNOWN_PATTERNS[plan.pattern]).findall
        self._cache = _PieceCache(self._pieces.encode)
        self._added_heads = tuple({t[:2] for t in plan.added})  # cheap pre-check: most documents contain none
        ascii_chars = [chr(i) for i in range(128)]
        # ASCII documents use the ``re`` splitter; ASCII characters inside other documents the ``regex`` one
        self._ascii_bad = "".join(c for c in ascii_chars if not self._agrees(c, self._findall_ascii))
        self._good = {c for c in ascii_chars if self._agrees(c, self._findall)}
        self._bad = set(ascii_chars) - self._good

    # -- when the fast path applies -------------------------------------------------------------------------
    def _agrees(self, c: str, findall) -> bool:
        """Do our split (with ``findall``) and the tokenizer's pre-tokenizer agree on every probe of ``c``?"""
        reference = self.backend.pre_tokenizer.pre_tokenize_str
        byte_level = self._pieces.pre_tokenizer.pre_tokenize_str
        try:
            for probe in _PROBES:
                text = probe.format(c=c)
                ours = [p for piece in findall(self._prefixed(text)) for p, _ in byte_level(piece)]
                if ours != [p for p, _ in reference(text)]:
                    return False
        except Exception:  # e.g. a lone surrogate the tokenizer cannot take: the slow path reports it
            return False
        return True

    def applies(self, text: str) -> bool:
        if self._added_heads and any(h in text for h in self._added_heads) and any(t in text for t in self.plan.added):
            return False
        if text.isascii():
            return not self._ascii_bad or not any(c in text for c in self._ascii_bad)
        chars = set(text)
        if not chars <= self._good:
            for c in chars - self._good - self._bad:
                (self._good if self._agrees(c, self._findall) else self._bad).add(c)
            return not (chars & self._bad)
        return True

    # -- encoding ---------------------------------------------------------------------------------------------
    def _prefixed(self, text: str) -> str:
        """ByteLevel's add_prefix_space; the pipeline pre-tokenizes nothing for an empty text, so no space there."""
        return " " + text if self.plan.add_prefix_space and text and not text.startswith(" ") else text

    def _split(self, text: str) -> list[str]:
        text = self._prefixed(text)
        return self._findall_ascii(text) if text.isascii() else self._findall(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out: list = [None] * len(texts)
        fast = [i for i, text in enumerate(texts) if self.applies(text)]
        get, split = self._cache.__getitem__, self._split
        prefix, suffix = list(self.plan.prefix), list(self.plan.suffix)
        for i in fast:
            body = list(itertools.chain.from_iterable(map(get, split(texts[i]))))
            out[i] = prefix + body + suffix if prefix or suffix else body
        if len(fast) < len(texts):
            slow = [i for i in range(len(texts)) if out[i] is None]
            for i, enc in zip(slow, self.backend.encode_batch_fast([texts[i] for i in slow], add_special_tokens=True)):
                out[i] = enc.ids
        return out
