"""Pre-flight check of a Megatron checkpoint before it is handed to Megatron-Core or torch to load themselves.

Why: ``megatron.core.dist_checkpointing.load`` reads ``.metadata`` with plain ``pickle.load`` (DCP's
``FileSystemReader``), every bytes entry of the ``.distcp`` files with ``torch.load(weights_only=False)`` (DCP's
``DefaultLoadPlanner.load_bytes``), ``common.pt`` with ``torch.load`` (weights-only only while torch's default
holds) and follows every ``relative_path`` of the metadata. A hostile file would run code there. So before any
such hand-off (``train --load``, ``verify`` of a ``torch_dist`` checkpoint) every file it will unpickle is first
read completely by our restricted unpicklers, with Megatron classes limited to the exact names Megatron-Core
resolves (``strict``), and every path and byte range is checked. What passes holds only inert, allow-listed
types, so Megatron-Core's own unpickling of the same bytes constructs nothing else.

``metadata.json`` must be a JSON object. Per-rank ``torch`` files are loaded by our own loader (the trainer,
``verify``), never by Megatron-Core; here they get the same check (placeholders allowed).
"""
from __future__ import annotations

import os
from pathlib import Path

from formats.checkpoint.megatron import OPTIM_FILE, RANK_FILE, resolve_iteration_dir
from formats.checkpoint.unpickle import load_megatron_pickle
from formats.errors import FormatError


def check_checkpoint_pickles(path: str | os.PathLike) -> Path:
    """Check every pickle and path of the Megatron checkpoint at ``path`` (save dir, iteration dir or rank
    dir/file); returns the iteration directory. Raises :class:`FormatError` naming the file and the refused
    global (or bad entry)."""
    from formats.checkpoint.torch_dist import TorchDistCheckpoint, is_torch_dist_dir

    it_dir, _ = resolve_iteration_dir(Path(path))
    if is_torch_dist_dir(it_dir):
        # opening reads metadata.json (type-checked), common.pt and .metadata through the restricted
        # unpicklers and confines every storage path and byte range
        ckpt = TorchDistCheckpoint.open(it_dir)
        load_megatron_pickle(it_dir / "common.pt", mmap=False, strict=True)
        for key in ckpt.objects():  # Megatron-Core/DCP torch.load these with weights_only=False
            ckpt.load_object(key, strict=True)
        for extra in sorted(it_dir.rglob("*.pt")):  # sharded objects of the older common strategy
            if extra.name != "common.pt" or extra.parent != it_dir:
                load_megatron_pickle(extra, mmap=True, strict=True)
        return it_dir
    files = sorted(it_dir.glob(f"mp_rank_*/{RANK_FILE}")) + sorted(it_dir.glob(f"mp_rank_*/{OPTIM_FILE}"))
    if not files:
        raise FormatError(f"not a Megatron checkpoint: no metadata.json and no mp_rank_*/{RANK_FILE}", path=it_dir)
    from formats.checkpoint.confine import check_inside, confinement_root

    root = confinement_root(it_dir)
    for f in files:
        check_inside(f, f"rank file {f.parent.name}/{f.name}", root)
        load_megatron_pickle(f, mmap=True)
    return it_dir
