"""The one typed configuration of a training run, loadable from YAML/JSON and overridable by CLI flags.

Field names follow what an Accelerate Megatron-LM plugin user already knows (``tp_degree``, ``pp_degree``,
``num_micro_batches``, ``sequence_parallelism``, ``recompute_activations``, ``use_distributed_optimizer``,
``gradient_clipping``, ``mixed_precision``) and Megatron-LM's argument names for the rest (``train_iters``,
``lr_decay_style``, ``save_interval`` ...), so that an existing config reads without a translation table.
Validation happens here, before any process is spawned, so an impossible layout is a one-line error.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from interop.families.base import groups_split_over
from trainer.config_values import (  # noqa: F401 - the choices are part of this module's interface
    ARCH_RULES,
    ATTENTION,
    CKPT_FORMATS,
    DECAY,
    PRECISION,
    RECOMPUTE,
    TRAIN_RULES,
    check_data_path,
    check_memory,
    check_split,
    check_values,
)
from trainer.errors import TrainConfigError


@dataclass
class ArchConfig:
    """A model architecture for random initialisation, in Megatron terms (any family that trains: GPT-2, Llama,
    BERT, …; and T5, built by :mod:`trainer.model_t5`).

    Used only when the run does not start from a checkpoint (``model`` unset); a checkpoint brings its own.
    T5 reads the T5-only fields below and Transformers' meanings: ``num_layers`` is the encoder's depth,
    ``feed_forward_proj`` ``relu`` with ``tie_word_embeddings: true`` is a T5 v1.0 (tied output layer, decoder
    output scaled by ``d_model ** -0.5``), ``gated-gelu`` with ``tie_word_embeddings: false`` a T5 v1.1.
    """

    family: str = "gpt2"  # gpt2 | llama | bert | … | t5
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA/MQA (llama); None = MHA
    ffn_hidden_size: int | None = None  # default 4h (gpt2, t5) or the llama rule
    vocab_size: int | None = None  # None: 128, or for T5 the tokenizer's vocabulary (its sentinels included)
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    # T5 only (Transformers' d_kv, num_decoder_layers, relative_attention_*, feed_forward_proj)
    kv_channels: int | None = None  # default hidden_size / num_attention_heads
    num_decoder_layers: int | None = None  # default num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # relu (T5 v1.0) | gated-gelu (T5 v1.1) | gated-<act> | <act>

    def to_model_config(self):
        """The ``interop.families.ModelConfig`` of this architecture (what the converters speak)."""
        from interop.families.base import families

        check_values(self, ARCH_RULES, "arch.")  # before any arithmetic on the sizes

        family = families().get(self.family)
        if family is None or "train" not in family.capabilities:
            trainable = sorted(n for n, f in families().items() if "train" in f.capabilities)
            raise TrainConfigError(f"arch.family must be {' or '.join(trainable)}, got {self.family!r}")
        return family.arch_config(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, ffn_hidden_size=self.ffn_hidden_size,
            vocab_size=self.vocab_size if self.vocab_size is not None else 128,
            max_position_embeddings=self.max_position_embeddings,
            norm_epsilon=self.norm_epsilon, tie_word_embeddings=self.tie_word_embeddings, rotary_base=self.rotary_base,
        )


@dataclass
class TrainConfig:
    """Everything a run needs. ``model`` (an HF or Megatron checkpoint) wins over ``arch`` (random init)."""

    # model source
    model: str | None = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    # parallel layout (Accelerate names)
    tp_degree: int = 1
    pp_degree: int = 1
    vpp_degree: int = 1
    sequence_parallelism: bool = False
    recompute_activations: str = "none"
    use_distributed_optimizer: bool = False
    mixed_precision: str = "no"
    # core attention: "sdpa" (PyTorch's fused kernels, never materialises the scores) or "local"
    # (Megatron-Core's unfused DotProductAttention)
    attention_backend: str = "sdpa"
    # batch
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # default micro * dp * num_micro_batches
    num_micro_batches: int | None = None  # default global / (micro * dp)
    seq_length: int = 128
    # data
    data_path: list[Any] = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "969,30,1"
    text_path: str | None = None  # JSONL ({"text": ...}) or plain text, tokenized on the fly
    tokenizer: str | None = None  # tokenizer.json or an HF tokenizer dir (for text_path)
    synthetic_data: bool = False  # random tokens (benchmarks)
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    data_cache_path: str | None = None
    # masked-LM data (BERT; Megatron-LM's --mask-prob, --short-seq-prob; its BERT max n-gram is 3)
    mask_prob: float = 0.15
    short_seq_prob: float = 0.1
    masking_max_ngram: int = 3
    decoder_seq_length: int = 128  # T5's decoder (Megatron-LM's --decoder-seq-length)
    # optimizer (AdamW) and LR schedule
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    gradient_clipping: float = 1.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None  # default train_iters
    loss_scale: float | None = None  # fp16: None = dynamic
    override_opt_param_scheduler: bool = False  # on resume, take LR settings from this config, not the checkpoint
    # loop
    train_iters: int = 100
    eval_interval: int = 0  # 0: no periodic eval
    eval_iters: int = 2
    log_interval: int = 1
    seed: int = 1234
    # checkpoints
    save: str | None = None
    load: str | None = None
    save_interval: int = 0  # 0: save only at the end (when ``save`` is set)
    ckpt_format: str = "torch_dist"
    force: bool = False
    # metrics
    log_dir: str | None = None  # metrics.jsonl + loss.png (default: ``save``)
    tensorboard_dir: str | None = None
    plot: bool = True
    progress: bool = True
    # launch
    world_size: int | None = None  # CPU: ranks to spawn (default tp*pp); GPU: from torchrun
    peak_tflops: float = 989.0  # per GPU, for MFU (H100 SXM bf16 dense)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        data = dict(data)
        arch = data.pop("arch", None) or {}
        if not isinstance(arch, dict):
            raise TrainConfigError(f"arch must be a mapping of architecture fields, got {type(arch).__name__}",
                                   path=source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown field(s) {', '.join(unknown)}", path=source)
        arch_known = {f.name for f in dataclasses.fields(ArchConfig)}
        bad = sorted(set(arch) - arch_known)
        if bad:
            raise TrainConfigError(f"unknown arch field(s) {', '.join(bad)}", path=source)
        data = {k: _coerce(cls, k, v, source) for k, v in data.items()}
        arch = {k: _coerce(ArchConfig, k, v, source) for k, v in arch.items()}
        cfg = cls(**data, arch=ArchConfig(**arch))
        if isinstance(cfg.data_path, str):
            cfg.data_path = cfg.data_path.split()
        return cfg

    @classmethod
    def load_file(cls, path: str) -> "TrainConfig":
        """Read a YAML or JSON file (by content: JSON is YAML)."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise TrainConfigError(f"cannot read config: {exc.strerror}", path=path) from None
        import yaml

        try:
            data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise TrainConfigError(f"not valid YAML/JSON: {str(exc).splitlines()[0]}", path=path) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise TrainConfigError("top level must be a mapping of field: value", path=path)
        return cls.from_dict(data, source=path)

    def override(self, pairs: dict[str, Any]) -> "TrainConfig":
        """Apply ``{field: value}`` overrides (``arch.hidden_size`` for architecture fields); values are
        parsed as YAML scalars when given as strings, so ``--set lr=1e-3`` gives a float."""
        import yaml

        cfg = dataclasses.replace(self, arch=dataclasses.replace(self.arch))
        for key, value in pairs.items():
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value) if value != "" else value
                except yaml.YAMLError:
                    pass
            target, name = (cfg.arch, key[5:]) if key.startswith("arch.") else (cfg, key)
            if not hasattr(target, name) or name == "arch":
                raise TrainConfigError(f"unknown config field {key!r}")
            if target is cfg and name == "data_path" and isinstance(value, str):
                value = value.split()
            setattr(target, name, _coerce(type(target), name, value, key))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- derived values
    def resolved_world_size(self, world_size: int | None = None) -> int:
        return world_size or self.world_size or self.tp_degree * self.pp_degree

    def dp(self, world_size: int | None = None) -> int:
        return self.resolved_world_size(world_size) // (self.tp_degree * self.pp_degree)

    def micro_batches(self, world_size: int | None = None) -> int:
        """Micro-batches per step per DP rank."""
        if self.num_micro_batches and not self.global_batch_size:
            return self.num_micro_batches
        return self.global_batch(world_size) // (self.micro_batch_size * self.dp(world_size))

    def global_batch(self, world_size: int | None = None) -> int:
        if self.global_batch_size:
            return self.global_batch_size
        return self.micro_batch_size * self.dp(world_size) * (self.num_micro_batches or 1)

    def validate(self, world_size: int | None = None, arch=None) -> None:
        """Raise :class:`TrainConfigError` for anything that cannot work, before ranks are spawned.

        ``arch`` is the model's ``ModelConfig`` (or our ArchConfig); without it the architecture checks
        are skipped (a checkpoint's architecture is checked once it is read)."""
        err = TrainConfigError
        check_values(self, TRAIN_RULES)  # every field's type and range (trainer.config_values)
        if not self.model:
            check_values(self.arch, ARCH_RULES, "arch.")
            if self.arch.hidden_size % self.arch.num_attention_heads:
                raise err(f"arch.hidden_size {self.arch.hidden_size} is not divisible by arch.num_attention_heads "
                          f"{self.arch.num_attention_heads}")
            if self.arch.num_attention_heads % (self.arch.num_query_groups or self.arch.num_attention_heads):
                raise err(f"arch.num_attention_heads {self.arch.num_attention_heads} is not divisible by "
                          f"arch.num_query_groups {self.arch.num_query_groups}")
        check_split(self.split)
        check_data_path(self.data_path)
        if self.min_lr > self.lr:
            raise err(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        world = self.resolved_world_size(world_size)
        mp = self.tp_degree * self.pp_degree
        if world % mp:
            raise err(f"world size {world} is not divisible by tp_degree*pp_degree = {mp}")
        dp = world // mp
        if self.vpp_degree > 1 and self.pp_degree < 2:
            raise err("vpp_degree > 1 needs pp_degree >= 2")
        if self.sequence_parallelism and self.tp_degree < 2:
            raise err("sequence_parallelism needs tp_degree >= 2")
        if self.sequence_parallelism and self.seq_length % self.tp_degree:
            raise err(f"seq_length {self.seq_length} is not divisible by tp_degree {self.tp_degree} (sequence parallelism)")
        if arch is not None:
            self._validate_arch(arch)
            check_memory(self, arch.vocab_size, arch.hidden_size, world)
        gb = self.global_batch(world)
        if gb % (self.micro_batch_size * dp):
            raise err(f"global_batch_size {gb} is not divisible by micro_batch_size*dp = {self.micro_batch_size * dp}")
        if self.num_micro_batches and self.global_batch_size and self.micro_batches(world) != self.num_micro_batches:
            raise err(
                f"num_micro_batches {self.num_micro_batches} contradicts global_batch_size {gb} "
                f"/ (micro_batch_size {self.micro_batch_size} * dp {dp})"
            )
        nmb = self.micro_batches(world)
        if self.vpp_degree > 1 and nmb % self.pp_degree:
            raise err(f"interleaved pipeline needs num_micro_batches ({nmb}) divisible by pp_degree ({self.pp_degree})")
        if not (self.data_path or self.text_path or self.synthetic_data):
            raise err("no training data: set data_path, text_path or synthetic_data")
        if self.text_path and not self.tokenizer:
            raise err("text_path needs a tokenizer (tokenizer.json or an HF tokenizer directory)")

    def _validate_arch(self, arch) -> None:
        err = TrainConfigError
        if arch.num_attention_heads % self.tp_degree:
            raise err(f"num_attention_heads {arch.num_attention_heads} is not divisible by tp_degree {self.tp_degree}")
        groups = arch.num_query_groups or arch.num_attention_heads
        if not groups_split_over(groups, self.tp_degree):  # fewer groups than ranks: Megatron-Core replicates K/V
            raise err(f"num_query_groups {groups} is not divisible by tp_degree {self.tp_degree}")
        chunks = self.pp_degree * self.vpp_degree
        if arch.num_layers % chunks:
            raise err(f"num_layers {arch.num_layers} is not divisible by pp_degree*vpp_degree = {chunks}")
        if self.seq_length > arch.max_position_embeddings and getattr(arch, "position_embedding_type", "") != "rope" \
                and getattr(arch, "family", "") != "llama":
            raise err(f"seq_length {self.seq_length} exceeds max_position_embeddings {arch.max_position_embeddings}")

    def log_directory(self) -> str | None:
        return self.log_dir or self.save


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    """Make a YAML/CLI value the field's type: YAML 1.1 reads ``1e-3`` as a string, flags come as text."""
    kind = next((f.type for f in dataclasses.fields(cls) if f.name == name), "")
    if value is None or not isinstance(kind, str):
        return value
    base = kind.replace(" | None", "")
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool" and isinstance(value, str):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if base == "str":
            if isinstance(value, (bool, list, dict)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{name} must be {base}, got {value!r}", path=source) from None
    return value


def layout_of(cfg: TrainConfig, world_size: int | None = None):
    """The :class:`formats.layout.Layout` a run uses."""
    from formats.layout import Layout

    return Layout(
        tp=cfg.tp_degree,
        pp=cfg.pp_degree,
        vpp=cfg.vpp_degree if cfg.vpp_degree > 1 else None,
        dp=cfg.dp(world_size),
    )


def env_world_size() -> int | None:
    """WORLD_SIZE when launched by torchrun (or our launcher), else None."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None
