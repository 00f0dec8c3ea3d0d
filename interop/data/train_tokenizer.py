"""Train a small byte-level BPE tokenizer with ``tokenizers`` and save it as a Transformers directory.

The demo, the tests and the benchmarks need a real tokenizer without downloading one; this trains it on
local text (the Python standard library's sources) in seconds. Two pipelines, the two that real models use:
``style="gpt2"`` (ByteLevel pre-tokenizer with GPT-2's regex, ``<|endoftext|>`` as EOS/EOD) and
``style="llama3"`` (Llama-3's Split regex + ByteLevel, a ``<|begin_of_text|>`` BOS added by the post-processor,
``<|end_of_text|>`` as EOS/EOD).
"""
from __future__ import annotations

import os

EOD = "<|endoftext|>"
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def train_bpe_tokenizer(files: list[str], out_dir: str, vocab_size: int = 4096, style: str = "gpt2") -> str:
    """Train on ``files`` and save ``out_dir`` loadable by ``AutoTokenizer.from_pretrained``; return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        special, names = [EOD], dict(eos_token=EOD, bos_token=EOD, unk_token=EOD)
    elif style == "llama3":
        from interop.data.piece_cache import LLAMA3_PATTERN

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        special, names = [LLAMA3_BOS, LLAMA3_EOS], dict(bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS)
    else:
        raise ValueError(f"unknown tokenizer style {style!r} (gpt2, llama3)")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    def texts():
        for path in files:  # read leniently: a few stdlib test files are not valid UTF-8
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()

    tok.train_from_iterator(texts(), trainer, length=len(files))
    if style == "llama3":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A $B",
                                          special_tokens=[(LLAMA3_BOS, tok.token_to_id(LLAMA3_BOS))])])
    os.makedirs(out_dir, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    hf.save_pretrained(out_dir)
    return out_dir
