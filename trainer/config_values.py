"""What each training-config field may hold, as one table, checked before anything is built.

A value outside its range used to reach Megatron-Core or PyTorch and fail there with a traceback (a NaN or
negative ``lr``, ``log_interval: 0`` dividing by zero, ``arch`` as a list, a negative batch size), or worse,
run: ``micro_batch_size: 1e8`` spent minutes writing gigabytes of sample index. Every field of
:class:`~trainer.config.TrainConfig` and :class:`~trainer.config.ArchConfig` has a :class:`Rule` here (a test
keeps the tables complete), and :func:`check_memory` bounds the sizes by what this machine can hold.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from trainer.errors import TrainConfigError

_BIG = 1 << 31  # counts above this are not a run this tool can do
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("sdpa", "local")
PRECISION = ("no", "bf16", "fp16")
DECAY = ("constant", "linear", "cosine")
CKPT_FORMATS = ("torch_dist", "torch")
_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?(\s*[,/]\s*\d+(\.\d*)?){0,2}\s*$")


@dataclass(frozen=True)
class Rule:
    """``kind`` (int, float, str, bool, list), an inclusive range ``[low, high]`` (``open_low``: ``> low``,
    ``open_high``: ``< high``), allowed ``choices``, and whether None is allowed."""

    kind: type
    low: float | None = None
    high: float | None = None
    optional: bool = False
    choices: tuple = ()
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        what = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
                list: "a list"}[self.kind]
        num = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
        if self.low is not None and self.high is not None and self.high != _BIG:
            what += (f" in {'(' if self.open_low else '['}{num(self.low)}, {num(self.high)}"
                     f"{')' if self.open_high else ']'}")
        elif self.low is not None:
            what += f" {'>' if self.open_low else '>='} {num(self.low)}"
        return what + (" (or null)" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return False
        elif self.kind is list:
            if not isinstance(value, (list, tuple)):
                return False
        elif self.kind is str and self.optional and isinstance(value, os.PathLike):
            return True  # a path given as pathlib.Path by library callers
        elif not isinstance(value, self.kind):
            return False
        if self.choices and value not in self.choices:
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return False
        return True


def _count(low: int = 1, high: int = _BIG, optional: bool = False) -> Rule:
    return Rule(int, low, high, optional)


def _flag() -> Rule:
    return Rule(bool)


def _path() -> Rule:
    return Rule(str, optional=True)


TRAIN_RULES: dict[str, Rule] = {
    "model": _path(),
    "tp_degree": _count(), "pp_degree": _count(), "vpp_degree": _count(),
    "sequence_parallelism": _flag(),
    "recompute_activations": Rule(str, choices=RECOMPUTE),
    "use_distributed_optimizer": _flag(),
    "mixed_precision": Rule(str, choices=PRECISION),
    "attention_backend": Rule(str, choices=ATTENTION),
    "micro_batch_size": _count(), "global_batch_size": _count(optional=True),
    "num_micro_batches": _count(optional=True), "seq_length": _count(high=1 << 24),
    "data_path": Rule(list), "split": Rule(str), "text_path": _path(), "tokenizer": _path(),
    "synthetic_data": _flag(), "eod_mask_loss": _flag(), "reset_position_ids": _flag(),
    "reset_attention_mask": _flag(), "data_cache_path": _path(),
    "lr": Rule(float, 0.0), "min_lr": Rule(float, 0.0), "weight_decay": Rule(float, 0.0),
    "adam_beta1": Rule(float, 0.0, 1.0, open_high=True), "adam_beta2": Rule(float, 0.0, 1.0, open_high=True),
    "adam_eps": Rule(float, 0.0, open_low=True), "gradient_clipping": Rule(float, 0.0),
    "lr_warmup_iters": _count(0), "lr_decay_style": Rule(str, choices=DECAY),
    "lr_decay_iters": _count(optional=True), "loss_scale": Rule(float, 0.0, optional=True, open_low=True),
    "override_opt_param_scheduler": _flag(),
    "train_iters": _count(high=1 << 40), "eval_interval": _count(0), "eval_iters": _count(0),
    "log_interval": _count(), "seed": _count(0, 2**32 - 1),
    "save": _path(), "load": _path(), "save_interval": _count(0), "ckpt_format": Rule(str, choices=CKPT_FORMATS),
    "force": _flag(), "log_dir": _path(), "tensorboard_dir": _path(), "plot": _flag(), "progress": _flag(),
    "world_size": _count(optional=True), "peak_tflops": Rule(float, 0.0, open_low=True),
    "mask_prob": Rule(float, 0.0, 1.0), "short_seq_prob": Rule(float, 0.0, 1.0),
    "masking_max_ngram": _count(high=1 << 10), "decoder_seq_length": _count(high=1 << 24),
}
ARCH_RULES: dict[str, Rule] = {
    "family": Rule(str),  # which families can train is the family layer's answer (ArchConfig.to_model_config)
    "num_layers": _count(high=1 << 16), "hidden_size": _count(high=1 << 20), "num_attention_heads": _count(high=1 << 16),
    "num_query_groups": _count(high=1 << 16, optional=True), "ffn_hidden_size": _count(high=1 << 22, optional=True),
    "vocab_size": _count(high=1 << 26, optional=True), "max_position_embeddings": _count(high=1 << 24),
    "tie_word_embeddings": _flag(), "norm_epsilon": Rule(float, 0.0, 1.0, open_low=True),
    "rotary_base": Rule(float, 0.0, open_low=True),
    "kv_channels": _count(high=1 << 20, optional=True), "num_decoder_layers": _count(high=1 << 16, optional=True),
    "relative_attention_num_buckets": _count(high=1 << 16), "relative_attention_max_distance": _count(high=1 << 24),
    "feed_forward_proj": Rule(str),
}


def check_values(obj: Any, rules: dict[str, Rule], prefix: str = "") -> None:
    """Raise :class:`TrainConfigError` for the first field of dataclass ``obj`` its rule refuses."""
    for f in fields(obj):
        rule = rules.get(f.name)
        if rule is None:
            continue
        value = getattr(obj, f.name)
        if not rule.accepts(value):
            raise TrainConfigError(f"{prefix}{f.name} must be {rule.describe()}, got {value!r}")


def check_split(split: str) -> list[float]:
    """Megatron's ``train,valid,test`` weights (``969,30,1``; fewer parts mean zeros), normalised."""
    if not _SPLIT_RE.match(split):
        raise TrainConfigError(f"split must be up to three non-negative numbers like 969,30,1, got {split!r}")
    parts = [float(x) for x in re.split(r"[,/]", split)]
    parts += [0.0] * (3 - len(parts))
    if sum(parts) <= 0:
        raise TrainConfigError(f"split {split!r} gives every part zero weight")
    return [p / sum(parts) for p in parts]


def check_data_path(data_path: list) -> None:
    if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in data_path):
        raise TrainConfigError(f"data_path must list dataset prefixes (optionally with weights), got {data_path!r}")


def machine_memory_bytes() -> int:
    """Physical memory of this host (the bound for anything a run must hold at once)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_memory(cfg, vocab_size: int, hidden_size: int, world_size: int, memory: int | None = None) -> None:
    """Refuse sizes no machine of this kind can hold, before a dataset index or a model is built.

    Two lower bounds: one micro-batch's fp32 logits (``micro_batch_size x seq_length x vocab``, what the loss
    reads; activations only add to it) and Megatron-Core's sample index for the whole run (16 bytes per
    sample: document/offset pairs and the shuffle)."""
    memory = memory or machine_memory_bytes()
    logits = cfg.micro_batch_size * cfg.seq_length * max(vocab_size, hidden_size) * 4
    if logits > memory:
        raise TrainConfigError(
            f"micro_batch_size {cfg.micro_batch_size} x seq_length {cfg.seq_length} x vocab {vocab_size} needs "
            f"{logits / 2**30:,.0f} GiB for one micro-batch's logits; this machine has {memory / 2**30:,.0f} GiB")
    samples = cfg.train_iters * cfg.global_batch(world_size)
    index = samples * 16
    if index > memory:
        raise TrainConfigError(
            f"train_iters {cfg.train_iters} x global batch {cfg.global_batch(world_size)} = {samples:,} samples "
            f"need a {index / 2**30:,.0f} GiB sample index; this machine has {memory / 2**30:,.0f} GiB")
