"""Where the streaming writers used to live (one module for all three); kept so existing imports still work.

New code imports from :mod:`formats.checkpoint` (or :func:`formats.checkpoint.writer_for`); each writer lives in
its format's module (``format_hf``, ``format_torch``, ``format_torch_dist``), their shared helpers in
:mod:`formats.checkpoint.streaming`.
"""
from formats.checkpoint.format_hf import HFCheckpointWriter, parse_size, plan_shards
from formats.checkpoint.format_torch import MegatronTorchWriter, nest_legacy
from formats.checkpoint.format_torch_dist import TORCH_DIST_METADATA, TorchDistWriter, extra_state_keys
from formats.checkpoint.streaming import ZIP32_LIMIT, StreamingTorchFile, patch_zip_crcs, plain_args

__all__ = ["HFCheckpointWriter", "MegatronTorchWriter", "TorchDistWriter", "extra_state_keys", "parse_size",
           "plan_shards", "nest_legacy", "TORCH_DIST_METADATA", "ZIP32_LIMIT", "StreamingTorchFile", "patch_zip_crcs",
           "plain_args"]
