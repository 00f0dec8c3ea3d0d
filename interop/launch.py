"""Run a function on N local ranks (CPU/gloo or one GPU each), the way ``torchrun`` would.

Used by the CLI (``interop train``/``generate``/``verify`` at TP×PP > 1 on CPU) and by the tests.
On CPU, children start from a fork server that has already imported torch and Megatron-Core, so each rank
costs a fork, not a fresh interpreter; with CUDA they are spawned. A child's exception comes back with its full traceback; a rank that
hangs is killed at the deadline and reported.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from formats.errors import InteropError


class RankFailure(InteropError):
    """A rank raised, died or timed out. ``details`` holds the child's traceback."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details

    def __str__(self) -> str:  # the one-line message; tests print details on failure
        return self.args[0]


@dataclass
class _Outcome:
    rank: int
    ok: bool
    value: Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, threads, extra_env, args, kwargs, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.update(extra_env)
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        value = fn(*args, **kwargs)
        # plain pickle (not multiprocessing's, which shares tensors through file descriptors that
        # vanish with the child)
        results.put(pickle.dumps(_Outcome(rank, True, value)))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        text = "".join(traceback.format_exception(exc))
        results.put(pickle.dumps(_Outcome(rank, False, (f"{type(exc).__name__}: {exc}", text))))


_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        import torch

        # CUDA cannot be used in forked children once the fork server has imported Megatron-Core (which
        # touches CUDA at import), so GPU runs spawn fresh interpreters; CPU runs fork from a warm server.
        default = "spawn" if torch.cuda.is_available() else "forkserver"
        method = os.environ.get("INTEROP_START_METHOD", default)
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["torch", "megatron.core", "interop.launch"])
        _CONTEXT = ctx
    return _CONTEXT


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 600.0,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks; return each rank's result in rank order.

    ``fn`` must be importable by name (a module-level function). The ranks share a fresh TCP port.
    Threads per rank default to cores // world_size (at least 1) so that ranks do not oversubscribe.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, threads_per_rank, env or {}, args, kwargs, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, _Outcome] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankFailure(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                outcome = pickle.loads(results.get(timeout=min(1.0, remaining)))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in outcomes and p.exitcode is not None
                ]
                if dead:
                    # give the queue a moment: a finished child may still be flushing its result
                    try:
                        outcome = pickle.loads(results.get(timeout=2.0))
                    except queue.Empty:
                        raise RankFailure(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                        ) from None
                else:
                    continue
            if not outcome.ok:
                summary, details = outcome.value
                raise RankFailure(f"rank {outcome.rank} failed: {summary}", details)
            outcomes[outcome.rank] = outcome
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcomes) == world_size else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outcomes[r].value for r in range(world_size)]
