"""Resume a training checkpoint at another TP/PP/VPP layout: reshape it (weights and optimizer state, for the run's
optimizer kind) into a temporary copy the run then loads as if it had been saved at its own layout.

Why here and not in the trainer: the reshape is the interop layer's job (:mod:`interop.optimizer_state`); the
trainer calls :func:`resumable_copy` before loading and :func:`drop_copy` after. A DP-only change needs no copy
(``dp_reshardable`` and ``distrib_optim.pt`` are DP-independent). The copy is made by global rank 0 in the system's
temporary directory, so all ranks must share a filesystem with it (one node); across nodes reshape offline with
``interop reshape SRC DST --tp N --pp M [--vpp K] --dp D``.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from formats.layout import Layout

_COPIES: set[str] = set()


def _layout_fields(args) -> tuple[int, int, int]:
    get = (lambda k: getattr(args, k, None))
    vpp = get("virtual_pipeline_model_parallel_size") or 1
    return int(get("tensor_model_parallel_size") or 1), int(get("pipeline_model_parallel_size") or 1), int(vpp)


def saved_args(path: str):
    from interop.conversion import open_source

    return open_source(path).args


def resumable_copy(path: str, saved, current) -> str:
    """``path`` itself when ``saved`` args (the checkpoint's) have the layout of ``current`` (the run's), else a
    reshaped copy at the run's layout (made on rank 0, the others wait)."""
    if saved is None or _layout_fields(saved) == _layout_fields(current):
        return path
    tp, pp, vpp = _layout_fields(current)
    layout = Layout(tp=tp, pp=pp, vpp=vpp if vpp > 1 else None, dp=int(getattr(current, "data_parallel_size", 1) or 1))
    fmt = "torch_dist" if os.path.exists(os.path.join(path, "metadata.json")) else "torch"
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    box = [None, None]
    if rank == 0:
        from interop.optimizer_state import reshape_for_resume

        root = tempfile.mkdtemp(prefix="interop-resume-")
        try:
            out = reshape_for_resume(path, os.path.join(root, "ckpt"), layout, fmt,
                                     distributed=bool(getattr(current, "use_distributed_optimizer", True)))
            box = [str(out / os.path.basename(os.path.normpath(path))), None]
        except Exception as exc:  # every rank must hear of it, not wait forever
            shutil.rmtree(root, ignore_errors=True)
            box = [None, exc]
    if dist:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    _COPIES.add(box[0])
    return box[0]


def drop_copy(path: str) -> None:
    """Remove a copy made by :func:`resumable_copy` once every rank has loaded it (no-op for other paths)."""
    if path not in _COPIES:
        return
    _COPIES.discard(path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            return
    root = os.path.dirname(os.path.dirname(path))
    if os.path.basename(root).startswith("interop-resume-"):
        shutil.rmtree(root, ignore_errors=True)
