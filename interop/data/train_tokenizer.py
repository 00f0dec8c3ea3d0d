"""Train a small byte-level BPE tokenizer with ``tokenizers`` and save it as a Transformers directory.

The demo, the tests and the benchmarks need a real tokenizer without downloading one; this trains it on
local text (the Python standard library's sources) in seconds, with ``<|endoftext|>`` as EOS/EOD.
"""
from __future__ import annotations

import os

EOD = "<|endoftext|>"


def train_bpe_tokenizer(files: list[str], out_dir: str, vocab_size: int = 4096) -> str:
    """Train on ``files`` and save ``out_dir`` loadable by ``AutoTokenizer.from_pretrained``; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    def texts():
        for path in files:  # read leniently: a few stdlib test files are not valid UTF-8
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()

    tok.train_from_iterator(texts(), trainer, length=len(files))
    os.makedirs(out_dir, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, bos_token=EOD, unk_token=EOD)
    hf.save_pretrained(out_dir)
    return out_dir
