"""Optimizer-state keys of Megatron-Core ``torch_dist`` checkpoints (docs/checkpoint-formats.md §6.5), and which sharding type a
checkpoint holds.

``dp_reshardable`` (Megatron-Core >= 0.15 default) stores, per model-parallel rank ``m`` (= pp * TP + tp), each
distributed-optimizer bucket flat under ``optimizer.distributed.dp_group_idx_{m}.gbuf_idx_{g}.dtype_{(param
dtype, grad dtype)}.bucket_idx_{b}.{param,exp_avg,exp_avg_sq}`` plus per-``m`` objects (param groups with the
step, bucket sizes, grad scaler). ``fully_reshardable`` and ``fully_sharded_model_space`` store model-shaped
tensors under ``optimizer.state.{param|fp32_param,exp_avg,exp_avg_sq}.{model key}``.
"""
from __future__ import annotations

from typing import Any

import torch

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
MODEL_SPACE = "fully_sharded_model_space"
MOMENTS = ("exp_avg", "exp_avg_sq")
STATE_KINDS = ("param",) + MOMENTS  # what the distributed optimizer keeps per parameter


def sharding_type(common: dict, tensor_keys) -> str | None:
    """The optimizer sharding type of a torch_dist checkpoint, None when it holds no optimizer state."""
    opt = common.get("optimizer")
    declared = None
    if isinstance(opt, dict):
        declared = opt.get("param_state_sharding_type")
    meta = common.get("content_metadata") or {}
    declared = declared or meta.get("distrib_optim_sharding_type")
    keys = [k for k in tensor_keys if k.startswith("optimizer.")]
    if not keys:
        return None
    if declared:
        return str(declared)
    if any(k.startswith("optimizer.distributed.") for k in keys):
        return DP_RESHARDABLE
    return MODEL_SPACE if any(".fp32_param." in k for k in keys) else FULLY_RESHARDABLE


def group_prefix(m: int) -> str:
    return f"optimizer.distributed.dp_group_idx_{m}"


def dtype_tag(dtypes: tuple[torch.dtype, torch.dtype]) -> str:
    """``dtype_(torch.float32, torch.float32)``: Megatron-Core formats the dtype tuple with ``str``."""
    return f"dtype_{tuple(dtypes)}"


def bucket_key(m: int, gbuf: int, dtypes: tuple[torch.dtype, torch.dtype], bucket: int, kind: str) -> str:
    return f"{group_prefix(m)}.gbuf_idx_{gbuf}.{dtype_tag(dtypes)}.bucket_idx_{bucket}.{kind}"


def object_key(m: int, name: str) -> str:
    """A per-model-parallel-rank ShardedObject (``optimizer``, ``grad_scaler``, ``per_bucket_numel[_unpadded]``)."""
    return f"{group_prefix(m)}.{name}/shard_0_1"


def model_space_key(kind: str, model_key: str, sharding: str) -> str:
    if kind == "param" and sharding == MODEL_SPACE:
        kind = "fp32_param"
    return f"optimizer.state.{kind}.{model_key}"


def first(obj: Any) -> Any:
    """Megatron stores a ShardedObject as the list of the rank's objects with that key: take the one."""
    return obj[0] if isinstance(obj, list) and len(obj) == 1 else obj
