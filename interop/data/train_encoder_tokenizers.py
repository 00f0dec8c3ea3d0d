"""Train the encoder models' tokenizers with ``tokenizers`` and save them as Transformers directories.

``train_wordpiece_tokenizer``: BERT's WordPiece (lower-cased, ``[PAD] [UNK] [CLS] [SEP] [MASK]``). No
post-processor: Megatron-LM tokenizes BERT sentences without special tokens (its dataset adds CLS/SEP itself), so
``interop data preprocess`` writes the bare word pieces; the HF wrapper names the special tokens for Transformers.
``train_unigram_tokenizer``: a SentencePiece-style unigram model for T5 (``<pad>`` = 0 = decoder start, ``</s>``,
``<unk>``, then ``<extra_id_0>`` … sentinels at the end of the vocabulary, as T5's own tokenizer has them).
"""
from __future__ import annotations

import os
from typing import Iterable

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 4096) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                                             show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir


def train_unigram_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 4096, sentinels: int = 100) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size - sentinels, special_tokens=T5_SPECIALS,
                                                           unk_token="<unk>", show_progress=False))
    extra = [f"<extra_id_{i}>" for i in range(sentinels)]
    tok.add_special_tokens(extra)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 additional_special_tokens=extra)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir
