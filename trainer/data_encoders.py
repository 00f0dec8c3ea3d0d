"""Samples for encoder training: Megatron-Core's ``BERTMaskedWordPieceDataset`` and ``T5MaskedWordPieceDataset``
over Megatron indexed data.

Megatron-Core does the sampling (sentence pairs, short sequences, n-gram masking, next-sentence swaps) and
``BlendedMegatronDatasetBuilder`` the split strings and blends; this module adds only what it lacks: the tokenizer
object those datasets read (special tokens from the HF tokenizer, a one-line error naming a missing one) and the
conversion of a Megatron sample to the step's batch (BERT: ``tokens``, ``tokentype_ids``, ``attention_mask``,
``labels``, ``loss_mask``, ``is_random``; T5: ``tokens``, ``attention_mask``, ``decoder_tokens``,
``decoder_attention_mask``, ``labels``, ``loss_mask``). T5's sentinels are the tokenizer's ``<extra_id_N>`` tokens
(in N order) and its decoder starts with the pad token, as Transformers' ``decoder_start_token_id``.

The datasets pad with ``tokenizer.pad`` and derive the padding mask by *writing that id* into a ones vector, which
is only a mask when the id is 0 or negative; the dataset-facing tokenizer therefore reports ``pad = -1`` (Megatron-Core's
own "no pad token" value) and the real pad id is written into the padded positions here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.errors import TrainConfigError

#: names a special token has in the tokenizers we meet (first match wins) when no HF tokenizer config names it
SPECIAL_NAMES = {
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
}


@dataclass
class SpecialTokens:
    cls: int
    sep: int
    mask: int
    pad: int


T5_SPECIAL_NAMES = {"pad": ("<pad>", "[PAD]"), "eos": ("</s>", "[SEP]", "<eos>")}


class MaskedDatasetTokenizer:
    """What Megatron-Core's masked datasets read from a tokenizer (``vocab``, ``inv_vocab``, ``cls``, ``sep``,
    ``mask``, ``pad``, ``unique_identifiers``); ``pad`` is -1 (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], special, source: str):
        self.vocab = vocab
        self.inv_vocab = {i: t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}
        self.vocab_size = len(vocab)
        self.special = special
        self.pad = -1
        self.unique_identifiers = {"class": "interop-masked", "source": os.path.abspath(source),
                                   "vocab_size": self.vocab_size, **{k: str(v) for k, v in special.__dict__.items()}}
        if isinstance(special, SpecialTokens):
            self.cls, self.sep, self.mask = special.cls, special.sep, special.mask
        else:  # T5: no CLS/SEP (ids no token has); masked spans become sentinels
            self.cls, self.sep = -2, -3
            self.additional_special_tokens_ids = list(special.sentinels)
            self.mask = special.sentinels[0]
            self.bos, self.eos = special.pad, special.eos


@dataclass
class T5SpecialTokens:
    pad: int
    eos: int
    sentinels: tuple[int, ...]


def special_tokens(path: str) -> tuple[dict[str, int], SpecialTokens]:
    """The vocabulary and CLS/SEP/MASK/PAD ids of ``tokenizer.json`` or an HF tokenizer directory."""
    vocab, ids = _lookup(path, SPECIAL_NAMES, "masked-LM training needs CLS, SEP, MASK and PAD")
    return vocab, SpecialTokens(**ids)


def t5_special_tokens(path: str) -> tuple[dict[str, int], T5SpecialTokens]:
    """The vocabulary, PAD, EOS and sentinel (``<extra_id_0>``, ``<extra_id_1>``, …) ids of a T5 tokenizer."""
    vocab, ids = _lookup(path, T5_SPECIAL_NAMES, "T5 span corruption needs PAD and EOS")
    sentinels = []
    while f"<extra_id_{len(sentinels)}>" in vocab:
        sentinels.append(vocab[f"<extra_id_{len(sentinels)}>"])
    if not sentinels:
        raise TrainConfigError("the tokenizer has no sentinel tokens (<extra_id_0>, <extra_id_1>, …); "
                               "T5 span corruption needs them", path=path)
    return vocab, T5SpecialTokens(ids["pad"], ids["eos"], tuple(sentinels))


def _lookup(path: str, roles: dict, why: str) -> tuple[dict[str, int], dict[str, int]]:
    from trainer.data import load_tokenizer

    backend = load_tokenizer(path)
    vocab = backend.get_vocab(with_added_tokens=True)
    named = _hf_named_tokens(path, roles)
    ids = {}
    for role, names in roles.items():
        candidates = ([named[role]] if named.get(role) else []) + list(names)
        found = next((vocab[n] for n in candidates if n in vocab), None)
        if found is None:
            raise TrainConfigError(f"the tokenizer has no {role.upper()} token (looked for {', '.join(candidates)}); "
                                   f"{why}", path=path)
        ids[role] = found
    return vocab, ids


def _hf_named_tokens(path: str, roles: dict) -> dict[str, str]:
    """``cls_token`` … of a directory's ``tokenizer_config.json`` / ``special_tokens_map.json`` (read as JSON)."""
    import json

    out: dict[str, str] = {}
    if not os.path.isdir(path):
        return out
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            raise TrainConfigError("not a readable JSON file", path=file) from None
        for role in roles:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out.setdefault(role, value)
    return out


class _Samples:
    """A Megatron-Core masked dataset (or a blend of them) seen as the step's samples; ``pad_id`` is written into
    the padded positions."""

    def __init__(self, dataset, pad_id: int):
        self.dataset, self.pad_id = dataset, pad_id

    def __len__(self) -> int:
        return len(self.dataset)


class BertSamples(_Samples):
    def __getitem__(self, idx: int) -> dict:
        s = self.dataset[int(idx)]
        real = torch.from_numpy(np.asarray(s["padding_mask"]) == 1)
        tokens = torch.from_numpy(np.asarray(s["text"], dtype=np.int64)).clone()
        tokens[~real] = self.pad_id
        types = torch.from_numpy(np.asarray(s["types"], dtype=np.int64)).clamp(min=0)
        return {
            "tokens": tokens,
            "tokentype_ids": types,
            "attention_mask": real.long(),
            "labels": torch.from_numpy(np.asarray(s["labels"], dtype=np.int64)).clamp(min=0),
            "loss_mask": torch.from_numpy(np.asarray(s["loss_mask"])).float(),
            "is_random": torch.tensor(int(s["is_random"]), dtype=torch.long),
        }


class T5Samples(_Samples):
    def __getitem__(self, idx: int) -> dict:
        s = self.dataset[int(idx)]
        enc_mask = torch.from_numpy(np.asarray(s["enc_mask"], dtype=np.int64))
        dec_mask = torch.from_numpy(np.asarray(s["dec_mask"], dtype=np.int64))
        enc = torch.from_numpy(np.asarray(s["text_enc"], dtype=np.int64)).clone()
        dec = torch.from_numpy(np.asarray(s["text_dec"], dtype=np.int64)).clone()
        enc[enc_mask == 0] = self.pad_id
        dec[dec_mask == 0] = self.pad_id
        return {
            "tokens": enc,
            "attention_mask": enc_mask,
            "decoder_tokens": dec,
            "decoder_attention_mask": dec_mask,
            "labels": torch.from_numpy(np.asarray(s["labels"], dtype=np.int64)).clamp(min=0),
            "loss_mask": torch.from_numpy(np.asarray(s["loss_mask"])).float(),
        }


class SyntheticEncoderSamples:
    """Random batches in the shape of :class:`BertSamples` (``decoder_seq_length`` 0) or :class:`T5Samples`, sample
    ``i`` always the same: ``synthetic_data: true`` for benchmarks, the encoder analogue of
    :class:`trainer.data.SyntheticSamples`. Every position is real; ``mask_prob`` of them carry a loss (all
    decoder positions for T5)."""

    def __init__(self, cfg: TrainConfig, vocab_size: int, seed: int, decoder: bool):
        self.cfg, self.vocab, self.seed, self.decoder = cfg, vocab_size, seed, decoder

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, idx: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        seq = self.cfg.seq_length
        tokens = torch.randint(0, self.vocab, (seq,), generator=gen)
        if self.decoder:
            dec = self.cfg.decoder_seq_length
            return {"tokens": tokens, "attention_mask": torch.ones(seq, dtype=torch.long),
                    "decoder_tokens": torch.randint(0, self.vocab, (dec,), generator=gen),
                    "decoder_attention_mask": torch.ones(dec, dtype=torch.long),
                    "labels": torch.randint(0, self.vocab, (dec,), generator=gen), "loss_mask": torch.ones(dec)}
        return {"tokens": tokens, "tokentype_ids": (torch.arange(seq) >= seq // 2).long(),
                "attention_mask": torch.ones(seq, dtype=torch.long),
                "labels": torch.randint(0, self.vocab, (seq,), generator=gen),
                "loss_mask": (torch.rand(seq, generator=gen) < self.cfg.mask_prob).float(),
                "is_random": torch.randint(0, 2, (), generator=gen)}


def synthetic_sources(cfg: TrainConfig, vocab_size: int, decoder: bool):
    """(train, valid) :class:`SyntheticEncoderSamples`."""
    return tuple(SyntheticEncoderSamples(cfg, vocab_size, cfg.seed + i, decoder) for i in (0, 1))


def _masking(cfg: TrainConfig) -> dict:
    """Megatron-LM's masking settings (n-gram masking, no whole-word/permutation/geometric variants)."""
    return dict(masking_probability=cfg.mask_prob, short_sequence_probability=cfg.short_seq_prob,
                masking_max_ngram=cfg.masking_max_ngram, masking_do_full_word=False, masking_do_permutation=False,
                masking_use_longer_ngrams=False, masking_use_geometric_distribution=False)


def _build(cls, cfg: TrainConfig, dcfg, counts: list[int], kind: str):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, counts, lambda: True, dcfg).build()
    except (AssertionError, ValueError, IndexError) as exc:
        raise TrainConfigError(f"data_path {cfg.data_path}: Megatron-Core cannot build the {kind} dataset: {exc}") from None
    if train is None:
        raise TrainConfigError(f"split {cfg.split!r} leaves no documents for training", path=str(cfg.data_path[-1]))
    return train, valid


def _require_tokenizer(cfg: TrainConfig) -> None:
    if not cfg.tokenizer:
        raise TrainConfigError("masked-LM/span-corruption training needs a tokenizer (tokenizer.json or an HF "
                               "tokenizer directory) for its special tokens")


def t5_sources(cfg: TrainConfig, counts: list[int]):
    """(train, valid) :class:`T5Samples` from ``cfg.data_path``: encoder ``seq_length``, decoder
    ``decoder_seq_length`` tokens."""
    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig

    from trainer.data import checked_blend

    _require_tokenizer(cfg)
    vocab, special = t5_special_tokens(cfg.tokenizer)
    prefixes, weights = checked_blend(cfg)
    dcfg = T5MaskedWordPieceDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, sequence_length_decoder=cfg.decoder_seq_length,
        blend=(prefixes, weights), split=cfg.split, path_to_cache=cfg.data_cache_path, mmap_bin_files=True,
        tokenizer=MaskedDatasetTokenizer(vocab, special, cfg.tokenizer), **_masking(cfg))
    train, valid = _build(T5MaskedWordPieceDataset, cfg, dcfg, counts, "T5")
    return T5Samples(train, special.pad), T5Samples(valid, special.pad) if valid is not None else None


def bert_sources(cfg: TrainConfig, binary_head: bool, counts: list[int]):
    """(train, valid) :class:`BertSamples` from ``cfg.data_path`` (blend and split as Megatron-LM reads them)."""
    from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig

    from trainer.data import checked_blend

    _require_tokenizer(cfg)
    vocab, special = special_tokens(cfg.tokenizer)
    prefixes, weights = checked_blend(cfg)
    dcfg = BERTMaskedWordPieceDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, blend=(prefixes, weights), split=cfg.split,
        path_to_cache=cfg.data_cache_path, mmap_bin_files=True,
        tokenizer=MaskedDatasetTokenizer(vocab, special, cfg.tokenizer), classification_head=binary_head,
        **_masking(cfg))
    train, valid = _build(BERTMaskedWordPieceDataset, cfg, dcfg, counts, "BERT")
    return BertSamples(train, special.pad), BertSamples(valid, special.pad) if valid is not None else None
