"""Samples for encoder training: Megatron-Core's ``BERTMaskedWordPieceDataset`` over Megatron indexed data.

Megatron-Core does the sampling (sentence pairs, short sequences, n-gram masking, next-sentence swaps) and
``BlendedMegatronDatasetBuilder`` the split strings and blends; this module adds only what it lacks: the tokenizer
object those datasets read (special tokens from the HF tokenizer, a one-line error naming a missing one) and the
conversion of a Megatron sample to the step's batch (``tokens``, ``tokentype_ids``, ``attention_mask``, ``labels``,
``loss_mask``, ``is_random``).

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


class MaskedDatasetTokenizer:
    """What Megatron-Core's masked datasets read from a tokenizer (``vocab``, ``inv_vocab``, ``cls``, ``sep``,
    ``mask``, ``pad``, ``unique_identifiers``); ``pad`` is -1 (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], special: SpecialTokens, source: str):
        self.vocab = vocab
        self.inv_vocab = {i: t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}
        self.vocab_size = len(vocab)
        self.special = special
        self.cls, self.sep, self.mask = special.cls, special.sep, special.mask
        self.pad = -1
        self.unique_identifiers = {"class": "interop-masked", "source": os.path.abspath(source),
                                   "vocab_size": self.vocab_size, **special.__dict__}


def special_tokens(path: str) -> tuple[dict[str, int], SpecialTokens]:
    """The vocabulary and CLS/SEP/MASK/PAD ids of ``tokenizer.json`` or an HF tokenizer directory."""
    from trainer.data import load_tokenizer

    backend = load_tokenizer(path)
    vocab = backend.get_vocab(with_added_tokens=True)
    named = _hf_named_tokens(path)
    ids = {}
    for role, names in SPECIAL_NAMES.items():
        candidates = ([named[role]] if named.get(role) else []) + list(names)
        found = next((vocab[n] for n in candidates if n in vocab), None)
        if found is None:
            raise TrainConfigError(f"the tokenizer has no {role.upper()} token (looked for {', '.join(candidates)}); "
                                   "masked-LM training needs CLS, SEP, MASK and PAD", path=path)
        ids[role] = found
    return vocab, SpecialTokens(**ids)


def _hf_named_tokens(path: str) -> dict[str, str]:
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
        for role in SPECIAL_NAMES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out.setdefault(role, value)
    return out


class BertSamples:
    """A Megatron-Core BERT dataset (or a blend of them) seen as the step's samples."""

    def __init__(self, dataset, pad_id: int):
        self.dataset, self.pad_id = dataset, pad_id

    def __len__(self) -> int:
        return len(self.dataset)

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


def bert_sources(cfg: TrainConfig, binary_head: bool, counts: list[int]):
    """(train, valid) :class:`BertSamples` from ``cfg.data_path`` (blend and split as Megatron-LM reads them)."""
    from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from trainer.data import checked_blend

    if not cfg.tokenizer:
        raise TrainConfigError("masked-LM training needs a tokenizer (tokenizer.json or an HF tokenizer directory) "
                               "for its CLS, SEP, MASK and PAD tokens")
    vocab, special = special_tokens(cfg.tokenizer)
    prefixes, weights = checked_blend(cfg)
    dcfg = BERTMaskedWordPieceDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=cfg.data_cache_path,
        mmap_bin_files=True,
        tokenizer=MaskedDatasetTokenizer(vocab, special, cfg.tokenizer),
        masking_probability=cfg.mask_prob,
        short_sequence_probability=cfg.short_seq_prob,
        masking_max_ngram=cfg.masking_max_ngram,
        masking_do_full_word=False,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=binary_head,
    )
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(BERTMaskedWordPieceDataset, counts, lambda: True, dcfg).build()
    except (AssertionError, ValueError, IndexError) as exc:
        raise TrainConfigError(f"data_path {cfg.data_path}: Megatron-Core cannot build the BERT dataset: {exc}") from None
    if train is None:
        raise TrainConfigError(f"split {cfg.split!r} leaves no documents for training", path=str(cfg.data_path[-1]))
    return BertSamples(train, special.pad), BertSamples(valid, special.pad) if valid is not None else None
