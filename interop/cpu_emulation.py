"""Run Megatron-Core on a machine without CUDA (gloo backend, CPU tensors).

Megatron-Core assumes CUDA in a handful of places. This module is the *only* place that works around
that, and it is enabled by :func:`enable` only when ``torch.cuda.is_available()`` is false; with a GPU
present it refuses to activate, so nothing here can change GPU numerics.

Every patched spot, and why:

1. ``torch.cuda.current_device`` -> ``0``. Megatron-Core passes it as the ``device=`` of buffers (DDP
   grad buffers, optimizer state, parallel-state helpers); the device-mapping mode below then maps it
   to the CPU.
2. ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` and
   ``tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state`` -> the CPU generator. The CUDA
   RNG tracker (``get_cuda_rng_tracker().fork()``) swaps the *device* generator state to give each TP
   rank its own dropout and init stream; on CPU the CPU generator plays that role, so the tracker keeps
   its meaning (per-TP-rank streams, data-parallel default stream).
3. Hard-coded ``device='cuda'`` / ``device=<int>`` / ``.cuda()`` / ``.to('cuda')`` in factory calls and
   tensor methods -> CPU, through a :class:`torch.overrides.TorchFunctionMode` that rewrites the device
   argument before the call.
4. ``Tensor.type()`` with no argument reports ``torch.cuda.<Kind>Tensor`` for CPU float tensors: the
   (distributed) optimizer decides fp32 vs fp16/bf16 handling by comparing that string with
   ``'torch.cuda.FloatTensor'`` and raises on anything else.
5. ``torch.cuda.synchronize``, ``torch.cuda.nvtx.range_push/pop``, ``torch.cuda.current_stream``,
   ``torch.cuda.Stream``/``stream`` and ``torch.cuda.Event`` -> no-ops: they are timing/overlap hooks
   with no meaning on CPU.

Known limits: masked softmax fusion, apex and Transformer Engine kernels stay off; CUDA graphs are not
emulated. The device-mapping mode is not active inside ``torch.autograd.backward`` (autograd runs backward
functions outside the Python mode stack), so code that allocates on "cuda" during backward (sequence-parallel
and recompute backward) needs ``deallocate_pipeline_outputs=True``, as Megatron-LM sets anyway: then the
schedule calls the autograd engine directly and the mode stays in force. With gloo, batched p2p under
interleaved pipelining can mismatch same-shaped sends/receives when the previous and next rank coincide: use
``batch_p2p_comm=False`` on CPU (the trainer does).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: "CudaToCpuMode | None" = None
_SAVED: dict[tuple[object, str], object] = {}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an ordinal means a CUDA device in torch's factory functions
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            # Tensor.cuda(...) -> the tensor itself (non_blocking etc. are irrelevant on CPU)
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            text = func(*args)
            if args[0].device.type == "cpu" and text.startswith("torch.") and not text.startswith("torch.cuda."):
                return "torch.cuda." + text[len("torch."):]
            return text
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if name == "to" and args:
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, bool) else a for a in args)
        if name == "pin_memory" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch(owner, name: str, value) -> None:
    key = (owner, name)
    if key not in _SAVED:
        _SAVED[key] = getattr(owner, name, None)
    setattr(owner, name, value)


def is_enabled() -> bool:
    return _ACTIVE_MODE is not None


def enable() -> None:
    """Activate the emulation for this process. Idempotent; refuses when CUDA is available."""
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        raise RuntimeError("CPU emulation of Megatron-Core must never run on a machine with CUDA")
    if _ACTIVE_MODE is not None:
        return
    import megatron.core.tensor_parallel.random as mcore_random

    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: 0)
    _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(cuda, "synchronize", lambda device=None: None)
    _patch(cuda, "current_stream", lambda device=None: _NullStream())
    _patch(cuda, "default_stream", lambda device=None: _NullStream())
    _patch(cuda, "Stream", _NullStream)
    _patch(cuda, "Event", _NullStream)
    _patch(cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _patch(cuda.nvtx, "range_push", lambda *a, **k: None)
    _patch(cuda.nvtx, "range_pop", lambda *a, **k: None)
    _patch(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

    _ACTIVE_MODE = CudaToCpuMode()
    _ACTIVE_MODE.__enter__()


def disable() -> None:
    """Undo :func:`enable` (used by tests and at runtime teardown)."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        _ACTIVE_MODE.__exit__(None, None, None)
        _ACTIVE_MODE = None
    for (owner, name), value in _SAVED.items():
        setattr(owner, name, value)
    _SAVED.clear()


def enable_if_needed() -> bool:
    """Enable the emulation when (and only when) CUDA is absent. Returns whether it is active."""
    if torch.cuda.is_available():
        return False
    enable()
    return True
