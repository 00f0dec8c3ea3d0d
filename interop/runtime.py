"""One entry point that brings up torch.distributed and Megatron-Core's parallel state, and takes them down.

NCCL with one GPU per rank when CUDA is present; gloo on CPU, with :mod:`interop.cpu_emulation` enabled so
Megatron-Core's CUDA assumptions hold. The rank/world/master address come from the environment that
``torchrun`` (or our own CPU launcher) sets; a single process without that environment runs as world 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch

from formats.layout import Layout
from interop.errors import LayoutError


@dataclass
class RuntimeConfig:
    """What a process needs to join a run: the model-parallel layout and a seed.

    ``layout.dp`` is derived from the world size when left at 1 and the world is larger.
    """

    layout: Layout = field(default_factory=Layout)
    seed: int = 1234
    backend: str | None = None  # None: nccl with CUDA, gloo without
    timeout_s: float = 600.0


@dataclass
class Runtime:
    """The live state of an initialised process."""

    config: RuntimeConfig
    rank: int
    world_size: int
    local_rank: int
    layout: Layout
    device: torch.device
    cpu_emulation: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_RUNTIME: Runtime | None = None


def current() -> Runtime | None:
    """The runtime of this process, or None before :func:`initialize`."""
    return _RUNTIME


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and Megatron-Core's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def initialize(config: RuntimeConfig | None = None) -> Runtime:
    """Initialise torch.distributed, the CPU emulation when needed, and Megatron-Core parallel state."""
    global _RUNTIME
    from megatron.core import parallel_state

    config = config or RuntimeConfig()
    if _RUNTIME is not None:
        raise RuntimeError("runtime already initialised in this process; call shutdown() first")
    cuda = torch.cuda.is_available()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    layout = config.layout
    mp = layout.model_parallel_size
    if world_size % mp != 0:
        raise LayoutError(
            f"layout {layout}: world size {world_size} is not divisible by tp*pp = {mp}"
        )
    dp = world_size // mp
    if layout.dp not in (1, dp):
        raise LayoutError(f"layout {layout}: dp={layout.dp} but world size {world_size} gives dp={dp}")
    layout = dataclasses.replace(layout, dp=dp)

    emulation = False
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        from interop import cpu_emulation

        emulation = cpu_emulation.enable_if_needed()
        device = torch.device("cpu")

    backend = config.backend or ("nccl" if cuda else "gloo")
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise LayoutError("MASTER_PORT is not set for a multi-process run")
            os.environ["MASTER_PORT"] = str(_free_port())
        torch.distributed.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=config.timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.interleaved,
    )
    _RUNTIME = Runtime(config, rank, world_size, local_rank, layout, device, emulation)
    seed_everything(config.seed)
    return _RUNTIME


def shutdown() -> None:
    """Destroy Megatron-Core parallel state and the process group; undo the CPU emulation."""
    global _RUNTIME
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if _RUNTIME is not None and _RUNTIME.cpu_emulation:
        from interop import cpu_emulation

        cpu_emulation.disable()
    _RUNTIME = None


@contextlib.contextmanager
def distributed(config: RuntimeConfig | None = None):
    """``with distributed(cfg) as rt: ...`` initialises and always tears down."""
    runtime = initialize(config)
    try:
        yield runtime
    finally:
        shutdown()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
