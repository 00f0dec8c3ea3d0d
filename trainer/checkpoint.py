"""Save and resume a training run in Megatron-LM's checkpoint layout.

``<save>/iter_0000010/`` holds the step, ``<save>/latest_checkpointed_iteration.txt`` names the newest.
``torch_dist`` (default) goes through Megatron-Core's ``dist_checkpointing`` (model + optimizer
sharded state; ``common.pt`` with ``args``, iteration, scheduler); ``torch`` writes Megatron-LM's per-rank
``mp_rank_XX[_YYY]/model_optim_rng.pt``. Both carry ``args`` (a Namespace with Megatron-LM's names, so
``interop convert``/Megatron-LM read it), ``checkpoint_version`` 3.0, the RNG states and the data
position (``args.consumed_train_samples``).

Atomic: every rank writes into ``iter_XXXXXXX.tmp-<pid of rank 0>``; after a barrier rank 0 renames it
and then replaces the tracker (temp file + rename), so a killed run leaves the previous checkpoint intact.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formats import staging
from formats.checkpoint.megatron import OPTIM_FILE, RANK_FILE
from formats.checkpoint.torch_dist import is_torch_dist_dir
from formats.checkpoint.tracker import TRACKER, Tracker, iteration_dirname, rank_dirname
from formats.errors import FormatError, OutputExistsError
from trainer.config import TrainConfig
from trainer.model import current_device

SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dirname(iteration))


def read_tracker(root: str) -> int | None:
    """The iteration named by the tracker, None when there is no tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    tracker = Tracker.read(path)  # bounded read, digits only (a 4000-digit tracker is one line, not a traceback)
    if tracker.release:
        raise FormatError("a 'release' checkpoint holds weights only; start from it with model: instead of load:", path=path)
    return tracker.iteration


def megatron_args(cfg: TrainConfig, built, layout, iteration: int, consumed: int) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores: the converters' architecture fields (``interop`` writes the same for
    its own Megatron checkpoints, so ``interop convert`` reads ours) plus the run's training fields."""
    from interop.convert_megatron import args_namespace

    extra = dict(
        padded_vocab_size=built.padded_vocab_size,
        data_parallel_size=layout.dp,
        world_size=layout.world_size,
        expert_model_parallel_size=1,
        sequence_parallel=cfg.sequence_parallelism,
        seq_length=cfg.seq_length,
        ckpt_format=cfg.ckpt_format,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch(layout.world_size),
        train_iters=cfg.train_iters,
        iteration=iteration,
        consumed_train_samples=consumed,
        consumed_valid_samples=0,
        skipped_train_samples=0,
        no_save_optim=None,
        no_save_rng=None,
        interop_train_config=cfg.to_dict(),
    )
    from interop.megatron_args import output_tokenizer_dir

    tokenizer_dir = output_tokenizer_dir(cfg.save, built.side_files or []) if cfg.save else None
    return args_namespace(built.model_config, layout, built.config.params_dtype, tokenizer_dir=tokenizer_dir, **extra)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


@dataclass
class TrainState:
    """What a resume restores besides the weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0


def _model_key(chunks: list, i: int) -> str:
    return "model" if len(chunks) == 1 else f"model{i}"


def _sharded_state(chunks, optimizer, scheduler, state: TrainState, args, loading: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from interop.megatron_model import unwrap

    sd: dict = {}
    for i, chunk in enumerate(chunks):  # GPTModel's own keys (Megatron-LM's layout), not the wrappers'
        sd[_model_key(chunks, i)] = unwrap(chunk).sharded_state_dict(metadata=dict(SHARDING))
    model_sd = sd["model"] if len(chunks) == 1 else {}
    if len(chunks) > 1:
        model_sd = {}
        for i in range(len(chunks)):
            model_sd.update(sd[f"model{i}"])
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=dict(SHARDING))
    sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = state.iteration
    sd["checkpoint_version"] = 3.0
    sd["num_floating_point_operations_so_far"] = 0
    sd["args"] = args
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    sd["rng_state"] = ShardedObject(
        "rng_state", [rng_state()], (pp_size, tp_size), (pp, tp),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    return sd


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _tmp_name(final: str) -> str:
    """The same temporary name on every rank (rank 0's pid, broadcast)."""
    pid = torch.tensor([os.getpid()], dtype=torch.long, device=current_device())
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(pid, src=0)
    return f"{final}.tmp-{int(pid.item())}"


def save(cfg: TrainConfig, chunks, optimizer, scheduler, state: TrainState, args, side_files=None) -> str:
    """Write ``<save>/iter_N`` atomically and point the tracker at it. Returns the directory.

    ``side_files`` (tokenizer files of the model source) are copied to ``<save>/tokenizer/`` once, where
    ``interop convert`` picks them up. The final rename never replaces an ``iter_N`` that appeared meanwhile
    unless ``force`` (:mod:`formats.staging`); on any error the temporary directory is removed and a full disk
    is a one-line error; dead runs' temporaries in ``<save>`` are swept first."""
    root = cfg.save
    final = iter_dir(root, state.iteration)
    if os.path.exists(final) and not cfg.force:  # every rank decides alike (shared filesystem)
        raise OutputExistsError("checkpoint already exists (use --force to overwrite)", path=final)
    tmp = _tmp_name(final)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        _save_into(cfg, tmp, root, rank, chunks, optimizer, scheduler, state, args, side_files)
        if rank == 0:
            _publish(cfg, tmp, final, root, state.iteration)
    except BaseException as exc:
        if rank == 0:
            staging.remove(tmp)
            staging.unregister(tmp)
        err = staging.disk_error(exc, final)
        if err is not None:
            raise err from None
        raise
    _barrier()
    return final


def _save_into(cfg: TrainConfig, tmp: str, root: str, rank: int, chunks, optimizer, scheduler, state: TrainState,
               args, side_files) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    if rank == 0:
        os.makedirs(root, exist_ok=True)
        staging.sweep_matching(root, r"iter_\d{7,}|" + re.escape(TRACKER))
        staging.register(tmp, root)
        if side_files:
            from interop.conversion import TOKENIZER_DIR

            tok = os.path.join(root, TOKENIZER_DIR)
            os.makedirs(tok, exist_ok=True)
            for f in side_files:
                shutil.copyfile(f, os.path.join(tok, os.path.basename(f)))
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    if cfg.ckpt_format == "torch_dist":
        _require_psutil()
        sd = _sharded_state(chunks, optimizer, scheduler, state, args, loading=False)
        dist_checkpointing.save(sd, tmp, content_metadata=dict(SHARDING))
    else:
        if parallel_state.get_data_parallel_rank() == 0:
            from formats.checkpoint.format_torch import save_rank_state
            from interop.megatron_model import unwrap

            sd = {_model_key(chunks, i): unwrap(c).state_dict_for_save_checkpoint() for i, c in enumerate(chunks)}
            sd.update(optimizer=optimizer.state_dict(), opt_param_scheduler=scheduler.state_dict(),
                      iteration=state.iteration, checkpoint_version=3.0, args=args, rng_state=[rng_state()])
            save_rank_state(tmp, _mp_dir(), sd)
        if cfg.use_distributed_optimizer:  # Adam's moments and fp32 params (gathered over DP onto DP rank 0)
            optimizer.save_parameter_state(os.path.join(tmp, _mp_dir(), OPTIM_FILE))
    _barrier()


def _publish(cfg: TrainConfig, tmp: str, final: str, root: str, iteration: int) -> None:
    """Rank 0: rename the finished iteration into place (replacing only with ``force``), then the tracker."""
    try:
        if cfg.force:
            old = staging.replace_swapping(tmp, final)
            if old is not None:
                staging.remove(old)
        else:
            staging.rename_noreplace(tmp, final)
    except FileExistsError:
        raise OutputExistsError("checkpoint appeared while this run was writing it; left it untouched "
                                "(use --force to overwrite)", path=final) from None
    staging.unregister(tmp)
    Tracker(iteration).write(root)


def _require_psutil() -> None:
    """Megatron-Core's torch_dist writer (``FileSystemWriterAsync``) calls psutil on every save."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        from trainer.errors import TrainConfigError

        raise TrainConfigError(
            "ckpt_format torch_dist needs the psutil package (Megatron-Core's checkpoint writer uses it); "
            "install psutil or use ckpt_format: torch"
        ) from None


def _mp_dir() -> str:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_rank()
    return rank_dirname(parallel_state.get_tensor_model_parallel_rank(),
                        pp if parallel_state.get_pipeline_model_parallel_world_size() > 1 else None)


def check_load_source(root: str | None) -> None:
    """Before any rank starts: the checkpoint ``--load`` names passes :func:`check_checkpoint_pickles` (every
    pickle read restricted, paths confined), so a hostile one is one line from the launching process."""
    iteration = read_tracker(root) if root else None
    if iteration is None:
        return
    path = iter_dir(root, iteration)
    if os.path.isdir(path):
        from formats.checkpoint.preflight import check_checkpoint_pickles

        check_checkpoint_pickles(path)


def load(cfg: TrainConfig, chunks, optimizer, scheduler, args) -> TrainState | None:
    """Resume from ``cfg.load`` (the tracker's iteration); None when there is nothing to resume."""
    from megatron.core import dist_checkpointing

    root = cfg.load
    iteration = read_tracker(root)
    if iteration is None:
        if os.path.isdir(root) and os.listdir(root):
            raise FormatError(f"no {TRACKER} here: not a training checkpoint directory", path=root)
        return None
    path = iter_dir(root, iteration)
    if not os.path.isdir(path):
        raise FormatError(f"the tracker names iteration {iteration} but its directory is missing", path=path)
    from interop.resume_layout import drop_copy, resumable_copy, saved_args

    path = resumable_copy(path, saved_args(path), args)  # saved at another TP/PP/VPP: a reshaped copy
    from formats.checkpoint.preflight import check_checkpoint_pickles
    from formats.checkpoint.unpickle import load_megatron_pickle

    dist = is_torch_dist_dir(Path(path))
    check_checkpoint_pickles(path)  # Megatron-Core unpickles these files itself: nothing unknown may be in them
    if dist:
        common = dist_checkpointing.load_common_state_dict(path)
        _check_compatible(common.get("args"), args, path)
        _init_empty_optimizer_state(optimizer)
        sd = _sharded_state(chunks, optimizer, scheduler, TrainState(), args, loading=True)
        state = dist_checkpointing.load(sd, path)
        rng = state["rng_state"]
        rng = rng[0] if isinstance(rng, list) else rng
        saved = common.get("args")
    else:
        file = os.path.join(path, _mp_dir(), RANK_FILE)
        if not os.path.exists(file):
            raise FormatError("checkpoint has no shard for this rank (saved at another layout?)", path=file)
        state = load_megatron_pickle(file, mmap=False)  # restricted unpickling: a checkpoint runs no code
        _check_compatible(state.get("args"), args, path)
        rng = state["rng_state"][0]
        saved = state.get("args")
    from interop.megatron_model import unwrap

    with torch.no_grad():  # fp32 main params of the distributed optimizer are views of the weights
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(state[_model_key(chunks, i)], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        optim_file = os.path.join(path, _mp_dir(), OPTIM_FILE)
        if not dist and cfg.use_distributed_optimizer and os.path.exists(optim_file):
            _load_parameter_state(optimizer, optim_file)
        _sync_adam_steps(optimizer)
    scheduler.load_state_dict(state["opt_param_scheduler"])
    set_rng_state(rng)
    consumed = getattr(saved, "consumed_train_samples", 0) if saved is not None else 0
    drop_copy(path)
    return TrainState(iteration=int(iteration), consumed_samples=int(consumed))


def _load_parameter_state(optimizer, path: str) -> None:
    """Megatron-Core's ``load_parameter_state`` copies *every* per-parameter state entry from the file, but the
    file has no ``step`` while torch's Adam keeps one (KeyError, Megatron-Core 0.16.1 without TE/apex): hide the
    step counters during the call; :func:`_sync_adam_steps` sets them from the param groups afterwards."""
    from trainer.optim import torch_adams

    hidden = [(state, state.pop("step")) for adam in torch_adams(optimizer) for state in adam.state.values()
              if "step" in state]
    try:
        optimizer.load_parameter_state(path)
    finally:
        for state, step in hidden:
            state["step"] = step


def _init_empty_optimizer_state(optimizer) -> None:
    """Give a fresh Adam the state entries a loading sharded state dict needs (``step``, moments).

    Megatron-Core's distributed optimizer builds its loading template from ``state_dict()``, which
    asserts one common ``step``; a never-stepped torch Adam has no state at all. Zeros are placeholders
    that the checkpoint overwrites; the parameters are not touched (unlike a dummy optimizer step)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p.data),
                        "exp_avg_sq": torch.zeros_like(p.data),
                    }


def _sync_adam_steps(optimizer) -> None:
    """torch Adam keeps ``step`` per parameter; Megatron-Core's distributed optimizer restores it into the
    param groups only (its non-fused path), so copy it down — else bias correction restarts at step 1."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" in group and group["step"] is not None:
                for p in group["params"]:
                    if "step" in inner.state.get(p, {}):
                        inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _check_compatible(saved, current, path: str) -> None:
    """The architecture must match (a mismatch would otherwise load silently wrong weights)."""
    if saved is None:
        raise FormatError("checkpoint has no 'args'; not written by a training run", path=path)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "padded_vocab_size", "normalization", "swiglu"):
        a, b = getattr(saved, name, None), getattr(current, name, None)
        if a is not None and b is not None and a != b:
            raise FormatError(f"checkpoint has {name}={a} but the run has {name}={b}", path=path)
