"""The piece-cache encoder (interop.data.piece_cache) against its oracle, the same tokenizer's own
``encode_batch_fast(texts, add_special_tokens=True)``: on real stdlib sources and on adversarial strings, for a
GPT-2-style byte-level BPE (as the demo trains) and a Llama-3-style Split+ByteLevel tokenizer with a BOS
template, both trained here. Plus: which pipelines are recognised, and preprocess output byte-identical to the
path without the cache (fork pool and in-process)."""
import glob
import importlib
import itertools
import json
import multiprocessing
import os
import random
import sysconfig

import pytest

from interop.data import piece_cache
from interop.data.piece_cache import LLAMA3_PATTERN, PieceEncoder, plan_for
from interop.data.preprocess import PreprocessConfig, preprocess
from interop.data.train_tokenizer import train_bpe_tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer  # noqa: E402

ADVERSARIAL = [
    "", " ", "  ", "\n", "\r\n", "a\r\nb", "x  \n\n  y", "\t\t\tfoo", "trailing   ", "   leading", "a\n\n\n",
    "don't I'LL we'Ve 'S 're 'd'm 'll", "Ünïcödé wörds ñ café naïve", "数字１２３ and ٣٤٥ Ⅻ ½ ²", "emoji 😀👍🏽 👨‍👩‍👧 ok",
    "<|endoftext|>", "text <|endoftext|> more", "<|begin_of_text|>hi", "a <|eot_id|>", "TODO: fix", "x<|TODO",
    "\x1c\x1d\x1e\x1f sep", "\u00a0nbsp\u2003em\u3000ideo", "\u2028line\u2029para\x85nel", "ſ 'ſ 'K 'ſt", "\x00null\x0b\x0c",
    "12345678 3.14159 0x1F", "def f(x):\n    return x  # comment\n\n\nclass A:\n\tpass\n", "a" * 1000, "!!!???...",
    " ".join(["word"] * 50), "\u0301combining e\u0301", "\U000e0001tag \U0010fffd private", "\ufeffbom",
]
_POOL = list("aZ09'stlevrmdSTLE \t\n\r!._-<|>()[]{}#:;,\"\\") + list("ſK١Ⅻ½éß中😀\u200d\u00a0\u2028\x1c\x0b\x0c\x85\u0301ǅ") + ["the", " of", "'s"]


def _random_texts(n=300, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randrange(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def source_files():
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "json", "*.py")) + glob.glob(os.path.join(stdlib, "email", "*.py"))
                  + glob.glob(os.path.join(stdlib, "encodings", "cp12*.py")))  # cp125x: non-ASCII tables


@pytest.fixture(scope="module")
def sources(source_files):
    texts = [open(f, encoding="utf-8").read() for f in source_files]
    assert any(not t.isascii() for t in texts)
    blocks = [b for t in texts for b in t.split("\n\n")]
    return texts + blocks


def _trained(files, tmp_path_factory, style):
    out = train_bpe_tokenizer(files, str(tmp_path_factory.mktemp(style)), vocab_size=700, style=style)
    return Tokenizer.from_file(os.path.join(out, "tokenizer.json"))


@pytest.fixture(scope="module")
def gpt2_style(source_files, tmp_path_factory):
    return _trained(source_files[:40], tmp_path_factory, "gpt2")


@pytest.fixture(scope="module")
def llama3_style(source_files, tmp_path_factory):
    tok = _trained(source_files[:40], tmp_path_factory, "llama3")  # Split + ByteLevel, BOS template
    tok.add_special_tokens(["<|eot_id|>"])  # the EOD preprocess finds in a bare tokenizer.json
    tok.add_tokens(["TODO"])  # a non-special added token: split out before pre-tokenization
    return tok


def _variant(tok, **changes):
    spec = json.loads(tok.to_str())
    spec.update(changes)
    return Tokenizer.from_str(json.dumps(spec))


def _check(tok, texts):
    encoder = PieceEncoder(tok, plan_for(tok))
    assert encoder.encode_batch(texts) == [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=True)]
    return encoder


def test_plans_are_recognised_exactly(gpt2_style, llama3_style):
    plan = plan_for(gpt2_style)
    assert plan.pattern == piece_cache.GPT2_PATTERN and not plan.add_prefix_space and plan.prefix == plan.suffix == ()
    plan = plan_for(llama3_style)
    assert plan.pattern == LLAMA3_PATTERN and plan.prefix == (llama3_style.token_to_id("<|begin_of_text|>"),)
    assert plan.suffix == () and "TODO" in plan.added and "<|eot_id|>" in plan.added
    spec = json.loads(gpt2_style.to_str())
    unrecognised = [
        dict(normalizer={"type": "NFC"}),
        dict(model=dict(spec["model"], dropout=0.1)),
        dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+|\w+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}),
        dict(pre_tokenizer={"type": "Whitespace"}),
        dict(post_processor={"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                             "trim_offsets": True, "add_prefix_space": False}),
        dict(truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}),
    ]
    for changes in unrecognised:
        assert plan_for(_variant(gpt2_style, **changes)) is None, changes


@pytest.mark.parametrize("style", ["gpt2_style", "llama3_style"])
def test_matches_the_tokenizer_on_stdlib_and_adversarial_text(style, sources, request):
    tok = request.getfixturevalue(style)
    encoder = _check(tok, sources + ADVERSARIAL + _random_texts())
    assert all(encoder.applies(t) for t in sources)  # the fast path really ran on the corpus
    assert not encoder.applies("a <|eot_id|>" if style == "llama3_style" else "a <|endoftext|>")
    assert encoder._cache


def test_prefix_space_and_cache_restart(gpt2_style, sources, monkeypatch):
    prefixed = _variant(gpt2_style, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                                   "trim_offsets": True, "use_regex": True})
    assert plan_for(prefixed).add_prefix_space
    _check(prefixed, ADVERSARIAL + sources[:30])
    monkeypatch.setattr(piece_cache, "_CACHE_LIMIT", 64)  # restarts the cache on almost every document
    encoder = PieceEncoder(gpt2_style, plan_for(gpt2_style))
    texts = sources[:60] + ADVERSARIAL
    assert [encoder.encode_batch([t])[0] for t in texts] == [e.ids for e in gpt2_style.encode_batch_fast(texts)]
    assert len(encoder._cache) < len({p for t in texts for p in encoder._split(t)})


def test_lone_surrogate_fails_like_the_tokenizer(gpt2_style):
    encoder = PieceEncoder(gpt2_style, plan_for(gpt2_style))
    with pytest.raises(Exception) as ours:
        encoder.encode_batch(["ok", "bad \ud800 text"])
    with pytest.raises(Exception) as ref:
        gpt2_style.encode_batch_fast(["ok", "bad \ud800 text"])
    assert type(ours.value) is type(ref.value)


@pytest.mark.parametrize("workers,other_thread", [(1, False), (2, False), (2, True)])
def test_preprocess_same_bytes_with_and_without_the_cache(llama3_style, sources, tmp_path, monkeypatch, workers,
                                                         other_thread):
    """2 workers: a forked pool, or a spawned one when another thread runs (the children rebuild the encoder)."""
    import threading

    if other_thread:
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    pool_kinds = []
    real_get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: pool_kinds.append(kind) or real_get_context(kind))
    tok_file = str(tmp_path / "tokenizer.json")
    llama3_style.save(tok_file)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sources[:80] + ADVERSARIAL))

    def run(out):
        return preprocess(PreprocessConfig([str(corpus)], tok_file, str(tmp_path / out), append_eod=True,
                                           workers=workers, batch_size=16, progress=False))

    fast = run("fast")
    if other_thread:
        stop.set()
    assert pool_kinds == ([] if workers == 1 else ["spawn" if other_thread else "fork"])
    monkeypatch.setattr(importlib.import_module("interop.data.preprocess"), "plan_for", lambda backend: None)
    slow = run("slow")
    assert fast.tokens == slow.tokens > 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fast_text_document{ext}").read_bytes() == (tmp_path / f"slow_text_document{ext}").read_bytes()


def test_sentence_level_keeps_the_rust_path_and_megatron_bytes(gpt2_style, sources, tmp_path, monkeypatch):
    """With a sentence splitter the piece cache is not used (plan only at document level); the output still
    matches Megatron-Core's builder fed as preprocess_data.py does (non-empty sentences, EOD on the last)."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import numpy as np

    pre = importlib.import_module("interop.data.preprocess")
    monkeypatch.setattr(pre, "_sentence_splitter", lambda: lambda text: text.split("\n\n"))
    tok_file = str(tmp_path / "tokenizer.json")
    gpt2_style.save(tok_file)
    texts = sources[:20] + ["", "one\n\n\n\ntwo"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pre.preprocess(PreprocessConfig([str(corpus)], tok_file, str(tmp_path / "ours"), append_eod=True,
                                    split_sentences=True, workers=2, batch_size=8, progress=False))
    eod = gpt2_style.token_to_id("<|endoftext|>")
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in texts:
        sentences = [ids for ids in (gpt2_style.encode(s).ids for s in text.split("\n\n")) if ids]
        if sentences:
            sentences[-1].append(eod)
        builder.add_document(np.array([i for s in sentences for i in s], np.int64), [len(s) for s in sentences])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours_text_sentence{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_a_character_the_engines_disagree_on_takes_the_slow_path(gpt2_style):
    """Simulate a Unicode-table difference between our regex engine and the tokenizer's: make 'é' swallow the
    whitespace after it. The probes must catch it, and documents with 'é' must still encode exactly."""
    import regex

    encoder = PieceEncoder(gpt2_style, plan_for(gpt2_style))
    encoder._findall = regex.compile(r"é\s*|" + piece_cache.GPT2_PATTERN).findall
    texts = ["(é\n        return self", "naïve the", "plain the end", "é \n the"]
    assert encoder.encode_batch(texts) == [e.ids for e in gpt2_style.encode_batch_fast(texts)]
    assert "é" in encoder._bad and "ï" in encoder._good
    assert not encoder.applies("café") and encoder.applies("naïve")  # ï: probed, agrees
    wrong = [list(itertools.chain.from_iterable(map(encoder._cache.__getitem__, encoder._split(t)))) for t in texts[:1]]
    assert wrong != [gpt2_style.encode(texts[0]).ids]  # without the probe the fast path would have been wrong


def test_an_ascii_character_the_engines_disagree_on_takes_the_slow_path(gpt2_style, monkeypatch):
    """Same for the ``re`` splitter of pure-ASCII documents: '~' made to swallow the whitespace after it."""
    ascii_pattern = piece_cache.KNOWN_PATTERNS[piece_cache.GPT2_PATTERN]
    monkeypatch.setitem(piece_cache.KNOWN_PATTERNS, piece_cache.GPT2_PATTERN, r"~\s*|" + ascii_pattern)
    encoder = PieceEncoder(gpt2_style, plan_for(gpt2_style))
    assert encoder._ascii_bad == "~"
    texts = ["x = ~\n        return self", "plain the end", "~"]
    assert encoder.encode_batch(texts) == [e.ids for e in gpt2_style.encode_batch_fast(texts)]
    assert not encoder.applies(texts[0]) and encoder.applies(texts[1])
