"""Whether ``load:`` can resume and ``save:`` can be written, decided before any rank starts.

``--load`` of a missing path, a file or an unrelated directory used to start from scratch silently, and a
checkpoint saved at another TP/PP with the distributed optimizer ended in Megatron-Core's raw "Global shape
mismatch" traceback after the model was built. The rules (Megatron-LM's, made explicit):

* ``load`` names a directory holding a tracker (``latest_checkpointed_iteration.txt``) and the iteration it
  names; a file, or a directory without a tracker, is an error.
* A missing or empty ``load`` directory starts from scratch only when it is also ``save`` (the resume idiom
  ``--load X --save X`` on a first run; Megatron-LM warns and starts from scratch there too); otherwise it is
  an error, since a typo would silently discard the run being resumed.
* A checkpoint saved with the distributed optimizer resumes at another TP/PP/VPP when this run uses the
  distributed optimizer too, and a ``torch`` checkpoint of a non-distributed optimizer when this run has none
  either: its state is reshaped on load (:mod:`interop.resume_layout`). Other optimizer state laid out for its
  TP/PP (a ``torch_dist`` one of a non-distributed optimizer, or a mismatch between the saved and the current
  optimizer kind) is refused up front at another layout, naming both layouts and what
  works (reshape the weights, start from them with ``model:``).
* ``save``'s final iteration directory must not be, or contain, the model or data being read (``--force``
  would delete them).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from formats.checkpoint.tracker import TRACKER
from trainer.config import TrainConfig, layout_of
from trainer.errors import TrainConfigError


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_load(cfg: TrainConfig, world_size: int) -> str | None:
    """Raise for a ``load`` that cannot resume; return a note when the run starts from scratch."""
    path = cfg.load
    if not path:
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainConfigError("load must be the save directory of a training run; this is a file", path=path)
    if not os.path.exists(path) or not os.listdir(path):
        if cfg.save and _same(cfg.save, path):
            return f"{path}: no checkpoint yet, starting from scratch (load and save are the same directory)"
        raise TrainConfigError("holds no checkpoint to resume (missing or empty); give the save directory of a "
                               "run, or the same directory as save to start a resumable run", path=path)
    if not os.path.isfile(os.path.join(path, TRACKER)):
        raise TrainConfigError(f"no {TRACKER} here: not the save directory of a training run (to start from a "
                               "model's weights, use model: instead of load:)", path=path)
    from formats.checkpoint import Tracker

    tracker = Tracker.read(os.path.join(path, TRACKER))
    if tracker.release:
        raise TrainConfigError("a 'release' checkpoint holds weights only; start from it with model: instead of "
                               "load:", path=path)
    it_dir = os.path.join(path, tracker.dirname)
    if not os.path.isdir(it_dir):
        raise TrainConfigError(f"the tracker names {tracker.dirname} but that directory is missing", path=path)
    _check_layout(cfg, it_dir, world_size)
    return None


def _check_layout(cfg: TrainConfig, it_dir: str, world_size: int) -> None:
    from formats.checkpoint import format_of, open_checkpoint

    ckpt = open_checkpoint(it_dir)  # restricted unpickling of args (common.pt / model_optim_rng.pt)
    saved, run = ckpt.layout, layout_of(cfg, world_size)
    same = (saved.tp, saved.pp, saved.vpp or 1) == (run.tp, run.pp, run.vpp or 1)
    saved_dist = bool(ckpt.arg("use_distributed_optimizer", default=False))
    per_rank = format_of(ckpt).per_rank_files
    if same or not (per_rank or saved_dist or cfg.use_distributed_optimizer):
        return
    if saved_dist and cfg.use_distributed_optimizer:
        return  # the distributed optimizer's state is reshaped on load (interop.resume_layout)
    if per_rank and not saved_dist and not cfg.use_distributed_optimizer:
        from interop.optimizer_local import local_state

        if local_state(ckpt) is not None:
            return  # so is a non-distributed optimizer's (model_optim_rng.pt), into the same kind
    why = ("per-rank torch files" if per_rank
           else "a saved distributed optimizer but none in this run (use_distributed_optimizer: true would reshape "
                "it on load)" if saved_dist else "this run's distributed optimizer")
    vpp = f" --vpp {run.vpp}" if run.vpp else ""
    raise TrainConfigError(
        f"saved at TP{saved.tp}xPP{saved.pp}{f'xVPP{saved.vpp}' if saved.vpp else ''} but this run is "
        f"TP{run.tp}xPP{run.pp}{f'xVPP{run.vpp}' if run.vpp else ''}: with {why} the optimizer state cannot move "
        f"to another layout; resume at the saved layout, or keep the weights only: interop reshape {it_dir} NEW "
        f"--tp {run.tp} --pp {run.pp}{vpp}, then train with model: NEW (fresh optimizer)", path=it_dir)


def check_save(cfg: TrainConfig, data_files: list[str]) -> None:
    """``save`` must be a directory (or not exist yet), and the iteration directories a run writes there
    must not be or contain what the run reads."""
    if not cfg.save:
        return
    if os.path.exists(cfg.save) and not os.path.isdir(cfg.save):
        raise TrainConfigError("save must be a directory; this is a file", path=cfg.save)
    root = Path(cfg.save).resolve()
    reads = [p for p in (cfg.model, cfg.text_path, cfg.tokenizer, *data_files) if p]
    for item in reads:
        src = Path(item).resolve()
        if src.parent == root and re.fullmatch(r"iter_\d{7,}", src.name) or \
                root in src.parents and re.fullmatch(r"iter_\d{7,}", src.relative_to(root).parts[0]):
            raise TrainConfigError(f"{item} lies inside an iteration directory of save, which this run may "
                                   "replace; copy it elsewhere or save to another directory", path=cfg.save)
        if src == root or src in root.parents:
            raise TrainConfigError(f"save is or lies inside {item}, which this run reads; choose another save "
                                   "directory", path=cfg.save)
