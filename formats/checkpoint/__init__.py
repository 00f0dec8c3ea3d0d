"""Checkpoint artifacts: Hugging Face and Megatron (legacy/mcore keys, ``torch`` and ``torch_dist``), read lazily.

Stable API (used by ``interop`` convert/reshape; the format facts in ``docs/checkpoint-formats.md``):

Formats — one module each (``format_hf``, ``format_torch_dist``, ``format_torch``) with a ``FORMAT`` object
(``name``, ``kind``, ``per_rank_files``, ``detect``, ``open``, ``writer``) listed in :mod:`.registry`, which
``open_checkpoint`` asks in order; ``writer_for(name, dst, **options)`` builds a writer by format name,
``format_of(ckpt)`` / ``format_named(name)`` give the format object, ``format_names(kind=None)`` the names.

Reading — ``open_checkpoint(path) -> HFCheckpoint | MegatronTorchCheckpoint | TorchDistCheckpoint``
    ``path`` may be an HF model dir, a Megatron save dir (with ``latest_checkpointed_iteration.txt``), an
    ``iter_XXXXXXX``/``release`` dir, an ``mp_rank_*`` dir or a ``model_optim_rng.pt`` file. Raises
    ``FormatError`` ("<path>: <what was expected>") for anything else.
    Common: ``.path``, ``.kind`` ("hf" | "megatron"), ``.format`` ("safetensors" | "bin" | "torch" | "torch_dist"),
    ``.tensors() -> list[TensorInfo]`` (name, shape, dtype, location, shard; nothing loaded), ``.load(name, ...)``.
    * ``HFCheckpoint``: ``.config`` (config.json dict), ``.side_files`` (tokenizer files, generation_config.json, …),
      ``.load(name, slices=None)``.
    * ``MegatronCheckpoint`` (both Megatron formats): ``.layout: Layout``, ``.iteration``, ``.release``,
      ``.args`` (``argparse.Namespace``; Megatron enums are inert placeholders), ``.arg(*names, default=)``,
      ``.checkpoint_version`` (0.0 when absent), ``.key_style`` ("legacy" | "mcore" | "mcore_te"),
      ``.optimizer_files`` (``distrib_optim.pt`` paths, listed, never loaded).
    * ``MegatronTorchCheckpoint`` (per-rank files, memory-mapped): ``.rank_keys()`` -> [(tp, pp, ep)],
      ``.num_chunks`` (VPP chunks per rank), ``.rank_tensors(tp, pp, chunk=0, ep=0)``,
      ``.load_rank_tensor(name, tp, pp, chunk=0, ep=0)`` (= ``.load``), ``.rank_state(...)`` (flat dict incl.
      non-tensor ``_extra_state`` entries; memory-mapped views — treat as read-only), ``.rank_file(tp, pp).top``
      (optimizer, rng, … as stored), ``.optimizer_state(tp, pp)`` (``distrib_optim.pt``, weights_only load).
      Legacy nested dicts are flattened to dotted names
      (``language_model.encoder.layers.0.self_attention.query_key_value.weight``).
    * ``TorchDistCheckpoint``: global keys as stored (stacked layers, TE norm names);
      ``.load(key, slices=None)`` reads only the chunks overlapping ``slices`` (no torch.distributed);
      ``.objects()`` / ``.load_object(key)`` for bytes entries; ``.common`` (common.pt dict); ``.optimizer_keys``.

Writing — stream tensors already named/shaped for the target; temp dir + rename; an existing ``dst`` is refused
unless ``force=True``; ``expected`` (names or name -> shape) validates the written key set (docs/checkpoint-formats.md trap T12):
    * ``HFCheckpointWriter(dst, config, max_shard_size=5 GB, side_files=(), force=False, expected=None, plan=None)``
      ``.add(name, tensor)`` / ``.finalize()`` -> sharded safetensors + index, ``{"format": "pt"}`` metadata.
      With ``plan=[(name, shape, dtype), …]`` (the ``add`` order) shards are streamed header-first (memory: one
      tensor); without, one shard is buffered.
    * ``MegatronTorchWriter(dst, layout, iteration=None, release=False, args=None, checkpoint_version=3.0, ...)``
      ``.add(name, tensor, tp, pp, chunk=0)`` / ``.finalize()`` -> ``mp_rank_TT[_PPP]/model_optim_rng.pt``
      (``model0…`` for VPP), tracker last. A rank file is streamed tensor by tensor (memory: one tensor).
    * ``TorchDistWriter(dst, iteration=None, release=False, args=None, ...)``
      ``.add(key, tensor, global_shape=None, offset=None)`` (whole tensors or chunks of a stacked one),
      ``.add_object(key, obj)``, ``.finalize()`` -> DCP files + common.pt + metadata.json + tracker; streamed.
      ``extra_state_keys(num_layers, transformer_impl)`` lists the ``_extra_state`` objects mcore requests.
"""
from __future__ import annotations

from formats.checkpoint.common import TensorInfo
from formats.checkpoint.format_hf import HFCheckpointWriter
from formats.checkpoint.format_torch import MegatronTorchWriter
from formats.checkpoint.format_torch_dist import TorchDistWriter, extra_state_keys
from formats.checkpoint.hf import HFCheckpoint
from formats.checkpoint.megatron import MegatronCheckpoint, MegatronTorchCheckpoint
from formats.checkpoint.protocol import CheckpointFormat, CheckpointReader, CheckpointWriter, FormatSpec
from formats.checkpoint.registry import (
    FORMATS, format_named, format_names, format_of, open_checkpoint, register, unregister, writer_for,
)
from formats.checkpoint.torch_dist import TorchDistCheckpoint
from formats.checkpoint.tracker import TRACKER, Tracker

__all__ = [
    "open_checkpoint", "writer_for", "format_named", "format_names", "format_of", "register", "unregister", "FORMATS",
    "CheckpointFormat", "CheckpointReader", "CheckpointWriter", "FormatSpec", "TensorInfo", "HFCheckpoint", "MegatronCheckpoint",
    "MegatronTorchCheckpoint", "TorchDistCheckpoint", "Tracker", "TRACKER", "HFCheckpointWriter",
    "MegatronTorchWriter", "TorchDistWriter", "extra_state_keys",
]
