"""Training samples for a run: Megatron indexed datasets (through Megatron-Core's GPTDataset and
BlendedMegatronDatasetBuilder; variants Megatron-Core cannot open are read by ``formats.indexed``),
JSONL/plain text tokenized on the fly, or synthetic tokens.

Every source yields samples as Megatron-Core's GPTDataset does: ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` of length ``seq_length``. :class:`BatchPlan` decides which global sample indices a DP
rank reads for each micro-batch of each step (Megatron-LM's pretraining sampler order), so the data
position is one integer (``consumed_samples``) that a checkpoint stores and a resume continues from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.errors import TrainConfigError


class _Tokenizer:
    """The few attributes Megatron-Core's GPTDataset reads from a tokenizer."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "interop", "vocab_size": vocab_size, "eod": eod}

    @property
    def pad(self) -> int:
        return -1


def _ltor(tokens: torch.Tensor, labels: torch.Tensor, eod: int | None, cfg: TrainConfig) -> dict:
    loss_mask = torch.ones(tokens.shape, dtype=torch.float)
    if cfg.eod_mask_loss and eod is not None:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(tokens.numel(), dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


class SyntheticSamples:
    """Random tokens, sample ``i`` always the same (benchmarks and tests)."""

    def __init__(self, cfg: TrainConfig, vocab_size: int, seed: int = 0):
        self.cfg, self.vocab, self.seed = cfg, vocab_size, seed

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, idx: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        text = torch.randint(0, self.vocab, (self.cfg.seq_length + 1,), generator=gen)
        return _ltor(text[:-1].clone(), text[1:].clone(), None, self.cfg)


class TokenStreamSamples:
    """Documents tokenized once, joined with EOD and cut into ``seq_length + 1`` windows (small jobs)."""

    def __init__(self, cfg: TrainConfig, ids: np.ndarray, eod: int | None):
        self.cfg, self.ids, self.eod = cfg, ids, eod
        self.count = (len(ids) - 1) // cfg.seq_length
        if self.count < 1:
            raise TrainConfigError(f"text gives {len(ids)} tokens, fewer than one sequence of {cfg.seq_length + 1}",
                                   path=cfg.text_path)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, idx: int) -> dict:
        start = (int(idx) % self.count) * self.cfg.seq_length
        window = torch.from_numpy(self.ids[start:start + self.cfg.seq_length + 1].astype(np.int64))
        return _ltor(window[:-1].clone(), window[1:].clone(), self.eod, self.cfg)


def load_tokenizer(path: str):
    """Kept for callers of the old name: :func:`interop.data.tokenizer.load_fast_tokenizer`."""
    from interop.data.tokenizer import load_fast_tokenizer

    return load_fast_tokenizer(path)


def eod_id(tokenizer) -> int | None:
    """The end-of-document id a ``tokenizers.Tokenizer`` defines, if any."""
    from interop.data.tokenizer import guess_eod

    return guess_eod(tokenizer)


def text_samples(cfg: TrainConfig) -> TokenStreamSamples:
    from interop.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    eod = tok.eod_id
    path = cfg.text_path
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith((".jsonl", ".json")):
                docs = []
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            docs.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise TrainConfigError(f"line {n}: not a JSON object with a 'text' field", path=path) from None
            else:
                docs = [fh.read()]
    except OSError as exc:
        raise TrainConfigError(f"cannot read: {exc.strerror}", path=path) from None
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc)
        if eod is not None:
            ids.append(eod)
    return TokenStreamSamples(cfg, np.asarray(ids, dtype=np.int64), eod)


def parse_blend(data_path: list) -> tuple[list[str], list[float] | None]:
    """``[prefix]``, ``[prefix1, prefix2]`` or ``[w1, prefix1, w2, prefix2]`` (Megatron-LM's --data-path)."""
    items = [str(x) for x in data_path]
    try:
        weights = [float(x) for x in items[0::2]]
        return items[1::2], weights if len(items) % 2 == 0 else None
    except ValueError:
        return items, None


class _FormatsLowLevel:
    """What Megatron-Core's GPTDataset reads from a low-level dataset, served by ``formats.indexed`` for the
    variants Megatron-Core cannot open (legacy lazy/cached ``TNTIDX``, fairseq)."""

    def __init__(self, prefix: str):
        from formats.indexed import open_dataset

        self.path_prefix = prefix
        self.ds = open_dataset(prefix)
        self.sequence_lengths = np.asarray(self.ds.sizes, dtype=np.int32)
        self.document_indices = np.asarray(self.ds.document_indices, dtype=np.int64)
        self.sequence_modes = None

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.ds.get(int(idx), int(offset), None if length is None else int(length))


def _gpt_dataset_class():
    """Megatron-Core's GPTDataset, opening non-mmap variants through ``formats.indexed``."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    class InteropGPTDataset(GPTDataset):
        @staticmethod
        def build_low_level_dataset(dataset_path, config):
            if _is_mcore_mmap(dataset_path):
                return GPTDataset.build_low_level_dataset(dataset_path, config)
            return _FormatsLowLevel(dataset_path)

    return InteropGPTDataset


def _is_mcore_mmap(prefix: str) -> bool:
    """Megatron's own MMIDIDX (fairseq's shares the magic but has no document index)."""
    from formats.indexed import Variant, read_header

    return read_header(prefix).variant == Variant.MMAP


def checked_blend(cfg: TrainConfig) -> tuple[list[str], list[float] | None]:
    """``parse_blend(cfg.data_path)`` with every prefix's ``.idx``/``.bin`` present."""
    prefixes, weights = parse_blend(cfg.data_path)
    if weights is not None and len(weights) != len(prefixes):
        raise TrainConfigError(f"data_path: weights and prefixes do not pair up: {cfg.data_path}")
    if weights is not None and (any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0):
        raise TrainConfigError(f"data_path: blend weights must be non-negative and not all zero: {weights}")
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            if not os.path.exists(prefix + ext):
                raise TrainConfigError("indexed dataset file is missing", path=prefix + ext)
        verify_structure(prefix)
    return prefixes, weights


def indexed_samples(cfg: TrainConfig, vocab_size: int, eod: int, counts: list[int]):
    """Train/valid/test datasets from Megatron indexed datasets via Megatron-Core's builder.

    A split that gets no documents comes back as ``None`` (never a hang)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    prefixes, weights = checked_blend(cfg)
    matrix = split_matrix(cfg, prefixes, counts)
    dcfg = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        tokenizer=_Tokenizer(vocab_size, eod),
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
        path_to_cache=cfg.data_cache_path,
        mmap_bin_files=True,
    )
    dcfg.split_matrix = matrix
    counts = [c if m is not None else 0 for c, m in zip(counts, matrix)]
    try:
        datasets = BlendedMegatronDatasetBuilder(_gpt_dataset_class(), counts, lambda: True, dcfg).build()
    except (AssertionError, ValueError, IndexError) as exc:
        raise TrainConfigError(f"data_path {cfg.data_path}: Megatron-Core cannot build the GPT dataset: {exc}") from None
    return datasets


def verify_structure(prefix: str) -> None:
    """The dataset's index must be sound before anything trains on it (``formats.indexed.verify``: lengths,
    pointers, document index, ``.bin`` size; O(sequences), tokens are not read). A corrupt index trained
    silently on garbage or read past the end of ``.bin``."""
    from formats.indexed.verify import verify

    report = verify(prefix)
    if not report.ok:
        bad = next(f for f in report.findings if not f.ok)
        raise TrainConfigError(f"corrupt dataset ({bad.check}): {bad.message} (see interop data verify)",
                               path=prefix)


def split_tokens(prefix: str, bounds: list) -> list[int]:
    """Tokens in each split of one dataset, with Megatron-Core's document boundaries (round(fraction x docs))."""
    from formats.indexed import open_dataset

    with open_dataset(prefix) as ds:
        docs = np.asarray(ds.document_indices, dtype=np.int64)
        ends = np.concatenate([[0], np.cumsum(np.asarray(ds.sizes, dtype=np.int64))])
    n = len(docs) - 1
    out = []
    for b in bounds:
        if b is None:
            out.append(0)
            continue
        beg, end = int(round(b[0] * float(n))), int(round(b[1] * float(n)))
        out.append(int(ends[docs[end]] - ends[docs[beg]]) if end > beg else 0)
    return out


def split_matrix(cfg: TrainConfig, prefixes: list[str], counts: list[int]) -> list:
    """Megatron-Core's split matrix for ``cfg.split``, with the splits that must not be built set to None.

    Megatron-Core asks an empty split for samples anyway (at least one token) and its epoch count then
    never converges: ``969,30,1`` on a corpus of < ~500 documents hung forever. So: the test split is never
    built (the trainer does not use it); an empty validation split is dropped (no evaluation, said once on
    stderr); an empty training split is an error naming the dataset."""
    import sys

    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    matrix[2] = None
    for prefix in prefixes:
        tokens = split_tokens(prefix, matrix)
        if tokens[0] <= cfg.seq_length:
            raise TrainConfigError(f"split {cfg.split!r} leaves {tokens[0]} training tokens in this dataset, fewer than "
                                   f"one sample of seq_length {cfg.seq_length} + 1", path=prefix)
        if matrix[1] is not None and tokens[1] <= cfg.seq_length:
            matrix[1] = None
            if counts[1] and cfg.eval_interval and (os.environ.get("RANK", "0") == "0"):
                print(f"note: {prefix}: split {cfg.split!r} leaves no validation sample; evaluation is skipped",
                      file=sys.stderr)
    return matrix


class VocabularyCheckedSamples:
    """A dataset view that refuses token ids outside the model's vocabulary (they index past the embedding
    table: a crash on CPU, silent garbage or a device assert on GPU), naming the dataset they came from."""

    def __init__(self, samples, vocab_size: int, names: list[str]):
        self.samples, self.vocab_size, self.names = samples, vocab_size, names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        sample = self.samples[idx]
        for key in ("tokens", "labels"):
            ids = torch.as_tensor(sample[key])
            if ids.numel() and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
                source = sample.get("dataset_id") if isinstance(sample, dict) else None
                name = self.names[int(source)] if source is not None and int(source) < len(self.names) else \
                    " ".join(self.names)
                raise TrainConfigError(f"token id {bad} in sample {int(idx)} is outside the model's vocabulary "
                                       f"of {self.vocab_size} (wrong tokenizer or model for this dataset?)",
                                       path=name)
        return sample


def sample_counts(cfg: TrainConfig, world_size: int) -> list[int]:
    """Samples the run reads from each split (train, valid, test): what Megatron-Core's builder must provide."""
    gb = cfg.global_batch(world_size)
    eval_runs = (cfg.train_iters // cfg.eval_interval + 1) if cfg.eval_interval else 1
    return [cfg.train_iters * gb, eval_runs * cfg.eval_iters * gb, 0]


@dataclass
class DataSources:
    train: object
    valid: object | None


def build_sources(cfg: TrainConfig, vocab_size: int, eod: int | None, world_size: int) -> DataSources:
    if cfg.synthetic_data:
        return DataSources(SyntheticSamples(cfg, vocab_size, cfg.seed), SyntheticSamples(cfg, vocab_size, cfg.seed + 1))
    if cfg.text_path:
        samples = VocabularyCheckedSamples(text_samples(cfg), vocab_size, [cfg.text_path])
        return DataSources(samples, samples)
    train, valid, _ = indexed_samples(cfg, vocab_size, eod if eod is not None else 0, sample_counts(cfg, world_size))
    if train is None:
        raise TrainConfigError(f"split {cfg.split!r} leaves no documents for training", path=str(cfg.data_path[-1]))
    names = parse_blend(cfg.data_path)[0]
    return DataSources(VocabularyCheckedSamples(train, vocab_size, names),
                       None if valid is None else VocabularyCheckedSamples(valid, vocab_size, names))


def pinned(batch: dict) -> dict:
    """``batch`` with its host tensors in pinned (page-locked) memory, other values as they are: a non-blocking copy
    from pinned memory to the GPU waits for nothing, where one from pageable memory waits for the GPU's queue to
    drain."""
    return {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" and not v.is_pinned() else v
            for k, v in batch.items()}


class BatchPlan:
    """Which samples a DP rank reads: Megatron-LM's pretraining sampler order.

    A step consumes ``global_batch`` consecutive samples; micro-batch ``m`` of DP rank ``r`` is the
    ``micro_batch_size`` samples starting at ``consumed + m * micro * dp + r * micro``.
    """

    def __init__(self, micro: int, num_micro: int, dp: int, dp_rank: int):
        self.micro, self.num_micro, self.dp, self.dp_rank = micro, num_micro, dp, dp_rank

    @property
    def global_batch(self) -> int:
        return self.micro * self.num_micro * self.dp

    def micro_batches(self, dataset, consumed: int, wrap: int | None = None) -> list[dict]:
        out = []
        for m in range(self.num_micro):
            start = consumed + m * self.micro * self.dp + self.dp_rank * self.micro
            idx = [start + i for i in range(self.micro)]
            if wrap:
                idx = [i % wrap for i in idx]
            samples = [dataset[i] for i in idx]
            keys = ("tokens", "labels", "loss_mask", "position_ids") if "position_ids" in samples[0] else samples[0]
            out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys})
        return out
