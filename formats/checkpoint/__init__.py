"""Checkpoint artifacts: Hugging Face and Megatron (legacy/mcore keys, ``torch`` and ``torch_dist``), read lazily.

Stable API (used by ``interop`` convert/reshape; the format facts in ``docs/checkpoint-formats.md``):

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

import os
from pathlib import Path

from formats.checkpoint.common import TensorInfo
from formats.checkpoint.hf import HFCheckpoint, is_hf_dir
from formats.checkpoint.megatron import MegatronCheckpoint, MegatronTorchCheckpoint, resolve_iteration_dir
from formats.checkpoint.torch_dist import TorchDistCheckpoint, is_torch_dist_dir
from formats.checkpoint.tracker import TRACKER, Tracker
from formats.checkpoint.writers import HFCheckpointWriter, MegatronTorchWriter, TorchDistWriter, extra_state_keys
from formats.errors import FormatError


def open_checkpoint(path: str | os.PathLike) -> HFCheckpoint | MegatronCheckpoint:
    """Detect the checkpoint kind at ``path`` and open it lazily (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or directory", path=p)
    hf_file = p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "model.safetensors.index.json",
                                                                   "pytorch_model.bin.index.json")
    if p.is_dir() and is_hf_dir(p) or p.is_file() and hf_file:
        return HFCheckpoint.open(p)
    if p.is_dir() and (p / "config.json").is_file() and not (p / TRACKER).exists():
        return HFCheckpoint.open(p)  # reports the missing weights precisely
    it_dir, _ = resolve_iteration_dir(p)
    if is_torch_dist_dir(it_dir):
        return TorchDistCheckpoint.open(p)
    if p.is_file() or any(it_dir.glob("mp_rank_*")):
        return MegatronTorchCheckpoint.open(p)
    raise FormatError(
        "not a checkpoint: expected a Hugging Face dir (config.json + model*.safetensors / pytorch_model*.bin), a "
        "Megatron save dir (latest_checkpointed_iteration.txt), an iter_*/release dir with mp_rank_*/ or metadata.json, "
        "or a model_optim_rng.pt file",
        path=p,
    )


__all__ = [
    "open_checkpoint", "TensorInfo", "HFCheckpoint", "MegatronCheckpoint", "MegatronTorchCheckpoint",
    "TorchDistCheckpoint", "Tracker", "HFCheckpointWriter", "MegatronTorchWriter", "TorchDistWriter",
    "extra_state_keys",
]
