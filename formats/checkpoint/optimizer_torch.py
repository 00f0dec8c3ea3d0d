"""``distrib_optim.pt``: the distributed optimizer's per-(TP, PP) state file of the per-rank ``torch`` format
(docs/checkpoint-formats.md §7.1, current format since Megatron-Core 2024-04-30): ``{'buckets_coalesced': True, gbuf_idx: {(param
dtype, grad dtype): {'param', 'exp_avg', 'exp_avg_sq': fp32[N], 'numel_unpadded': N}}}``, the vectors being the
buckets' unpadded parts concatenated. Older layouts (per-bucket lists, per-DP-rank ``optim.pt``) are refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from formats.errors import FormatError

OPTIM_FILE = "distrib_optim.pt"


def check_distrib_optim(state, path: Path) -> dict:
    """The state of one ``distrib_optim.pt`` after structural checks (one optimizer, coalesced buckets)."""
    if isinstance(state, list):
        raise FormatError("several chained optimizers (expert parallelism) are not supported", path=path)
    if not isinstance(state, dict):
        raise FormatError(f"expected a dict, found {type(state).__name__}", path=path)
    if not state.get("buckets_coalesced"):
        raise FormatError("pre-2024-04 distributed-optimizer layout (no 'buckets_coalesced'); re-save it with a "
                          "current Megatron-Core", path=path)
    for g, per_dtype in state.items():
        if g == "buckets_coalesced":
            continue
        if not isinstance(g, int) or not isinstance(per_dtype, dict):
            raise FormatError(f"unexpected entry {g!r}", path=path)
        for dtypes, entry in per_dtype.items():
            n = entry.get("numel_unpadded") if isinstance(entry, dict) else None
            if not isinstance(n, int):
                raise FormatError(f"buffer {g} {dtypes}: no numel_unpadded", path=path)
            for kind in ("param", "exp_avg", "exp_avg_sq"):
                t = entry.get(kind)
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
                    raise FormatError(f"buffer {g} {dtypes}: {kind} is not a vector of {n} elements", path=path)
    return state


def distrib_optim_entry(state: dict, gbuf: int, path: Path) -> tuple[tuple, dict]:
    """``(dtypes, {'param', 'exp_avg', 'exp_avg_sq', 'numel_unpadded'})`` of grad buffer ``gbuf``."""
    per_dtype = state.get(gbuf)
    if not per_dtype:
        raise FormatError(f"no grad buffer {gbuf}", path=path)
    if len(per_dtype) != 1:
        raise FormatError(f"grad buffer {gbuf} has {len(per_dtype)} dtypes; only one is supported", path=path)
    return next(iter(per_dtype.items()))


def save_distrib_optim(buffers: dict[int, tuple[tuple, dict[str, torch.Tensor]]], path: Path) -> None:
    """Write ``{gbuf: (dtypes, {'param', 'exp_avg', 'exp_avg_sq'})}`` as Megatron-Core does."""
    out: dict = {"buckets_coalesced": True}
    for g, (dtypes, tensors) in sorted(buffers.items()):
        out[g] = {tuple(dtypes): {**tensors, "numel_unpadded": int(tensors["param"].numel())}}
    torch.save(out, path)
