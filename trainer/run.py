"""Launching a run: in this process, under ``torchrun`` (GPUs, NCCL), or on spawned CPU gloo ranks.

``train(cfg)`` is what ``interop train`` calls. Without ``WORLD_SIZE`` in the environment, a layout of more
than one rank is run on local ranks through :func:`interop.launch.run_on_ranks` (gloo on CPU, one GPU each
with NCCL); under ``torchrun`` this process is one rank of the run. The config is validated
before anything is spawned, so impossible layouts are a one-line error.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.config import TrainConfig, env_world_size, layout_of
from trainer.loop import Trainer, TrainResult
from trainer.step import GPTTrainStep


def rank_main(cfg: TrainConfig, step: GPTTrainStep | None = None, model_init: Callable | None = None,
              after: Callable | None = None):
    """Body of one rank: bring up the runtime, set up, train; ``after(trainer, result)`` may add to the
    returned value (tests use it to collect logits)."""
    from interop.runtime import RuntimeConfig, distributed

    world = env_world_size() or 1
    with distributed(RuntimeConfig(layout=layout_of(cfg, world), seed=cfg.seed)):
        trainer = Trainer(cfg, step=step, model_init=model_init, world_size=world).setup()
        result = trainer.fit()
        if after is not None:
            return after(trainer, result)
        return result


def train(cfg: TrainConfig, step: GPTTrainStep | None = None, model_init: Callable | None = None,
          timeout_s: float = 24 * 3600) -> TrainResult:
    """Run training to ``cfg.train_iters``; returns rank 0's :class:`TrainResult`."""
    from interop.launch import run_on_ranks

    world = env_world_size()
    if world is None:  # not under torchrun: this process launches the ranks itself
        n = cfg.resolved_world_size()
        from interop.families import get_family
        from trainer.sources import model_config_for

        model_config = model_config_for(cfg)
        if model_config is not None:  # None: a T5 (trainer.model_t5 checks its architecture when it builds it)
            get_family(model_config.family).require("train")  # e.g. an encoder checkpoint: one line, before spawning
        cfg.validate(n, model_config)  # before spawning: impossible layouts are one line
        from trainer.checkpoint import check_load_source

        check_load_source(cfg.load)  # a hostile --load checkpoint is refused here, not in a rank
        if torch.cuda.is_available() and n > torch.cuda.device_count():
            from trainer.errors import TrainConfigError

            raise TrainConfigError(f"{n} ranks need {n} GPUs, this machine has {torch.cuda.device_count()}; "
                                   "use torchrun across nodes")
        if n > 1:
            cfg.world_size = n
            return run_on_ranks(rank_main, n, cfg, step, model_init, timeout_s=timeout_s)[0]
    return rank_main(cfg, step, model_init)
