"""Weight-gradient GEMMs that write the first gradient of a step (β = 0) instead of adding it to a zeroed buffer.

Why: Megatron-Core's DDP zeroes its whole fp32 gradient buffer at the start of every step (``zero_grad_buffer``:
5.2 GB for GPT-2 1.3B, ≈ 1.7 ms of an H100's memory bandwidth), and with gradient-accumulation fusion
(:mod:`trainer.kernels.grad_accum`) each linear layer's first weight-gradient GEMM of the step then adds onto
those zeros. Most of the buffer is the linear layers' weights, whose gradient arrives only through that GEMM: here
the first GEMM of a step into such a weight's ``main_grad`` overwrites it, and the zeroing leaves its range alone.

How: :func:`install` gives each DDP-wrapped chunk a :class:`FirstWrite`, which replaces the chunk's
``zero_grad_buffer`` and tags every ``main_grad`` view (Megatron-Core hands the same view to the GEMM). A range is
left unzeroed only if its weight's first gradient of the previous step was such a GEMM (learned, so the output
layer whose weight the fused loss differentiates, the embeddings, biases and norms are always zeroed), and the GEMM
overwrites only a range that was left unzeroed and only while Megatron-Core's ``grad_added_to_main_grad`` is still
false for the step (its first fused GEMM; later micro-batches accumulate). A weight also reached by autograd (GPT-2's
tied embedding under the output layer's fused GEMM, ``zero_out_wgrad``) gets that gradient added by DDP's hook after
the GEMM of the same backward pass, as before. When the backward pass ends (before the gradients are reduced or
clipped) a range left unzeroed whose GEMM did not run this step is zeroed, and zeroed every step from then on (a
gradient that reached such a weight through autograd alone in that one step would be lost with it; the trainer's
models run the same layers every step).

Scope: DDP without overlapped gradient reduction (the trainer's setting: its bucket reductions start only after
the backward pass), gradient-accumulation fusion on. Candidate: off until a GPU run shows it faster.
"""
from __future__ import annotations

import weakref

import torch

#: attribute of a tagged ``main_grad`` view: (weak reference to its FirstWrite, weak reference to its parameter)
_TAG = "_interop_first_write"


class FirstWrite:
    """The first-write bookkeeping of one DDP-wrapped model chunk."""

    def __init__(self, ddp):
        self.ddp = ddp
        self.buffers = list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))
        self.skipped: set[int] = set()  # ids of the parameters whose range this step's zeroing left alone
        self.written: dict[int, torch.nn.Parameter] = {}  # first-written (or first-fused) this step
        self.never: set[int] = set()  # left unzeroed once without a GEMM to write them: always zeroed now
        self.first_writes = 0  # GEMMs that overwrote a range so far (tests, reports)
        self._views: tuple[frozenset, list[torch.Tensor]] | None = None
        for param in ddp.params_with_grad:
            main_grad = getattr(param, "main_grad", None)
            if main_grad is not None:
                setattr(main_grad, _TAG, (weakref.ref(self), weakref.ref(param)))

    def zero_grad_buffer(self) -> None:
        """Megatron-Core's ``DistributedDataParallel.zero_grad_buffer`` that zeroes everything but the ranges the
        previous step's fused GEMMs wrote first."""
        ddp = self.ddp
        for param in ddp.params_with_grad:
            param.grad_added_to_main_grad = False
        skip = frozenset(k for k in self.written if k not in self.never)
        if self._views is None or self._views[0] != skip:
            self._views = (skip, self._complement(skip))
        torch._foreach_zero_(self._views[1])
        self.skipped, self.written = set(skip), {}
        for group in list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", [])):
            group.reset()

    def _complement(self, skip: frozenset) -> list[torch.Tensor]:
        """Views of every buffer's ranges outside the parameters in ``skip`` (padding included)."""
        views = []
        for buffer in self.buffers:
            ranges = sorted((start, end) for param, (start, end, _) in buffer.param_index_map.items()
                            if id(param) in skip)
            at = 0
            for start, end in ranges + [(buffer.grad_data.numel(), buffer.grad_data.numel())]:
                if start > at:
                    views.append(buffer.grad_data[at:start])
                at = max(at, end)
        return views

    def overwrites(self, param) -> bool:
        """Whether this fused GEMM into ``param.main_grad`` is its first of the step into a range left unzeroed
        (then it must overwrite); records the first fused GEMM of every parameter for the next step's zeroing."""
        if param.grad_added_to_main_grad:
            return False
        key = id(param)
        self.written[key] = param
        if key in self.skipped:
            self.first_writes += 1
            return True
        return False

    def finish_backward(self) -> None:
        """Zero the ranges left unzeroed whose fused GEMM did not run this step (and keep zeroing them)."""
        missed = self.skipped.difference(self.written)
        if not missed:
            return
        self.never |= missed
        params = {id(p): p for p in self.ddp.params_with_grad}
        torch._foreach_zero_([params[k].main_grad for k in missed if k in params])


def overwrites(main_grad: torch.Tensor) -> bool:
    """Whether a fused weight-gradient GEMM into this ``main_grad`` view must overwrite it (β = 0) instead of
    accumulating (:meth:`FirstWrite.overwrites`); False for an untagged view."""
    tag = getattr(main_grad, _TAG, None)
    if tag is None:
        return False
    tracker, param = tag[0](), tag[1]()
    return tracker is not None and param is not None and tracker.overwrites(param)


def applies(ddp) -> bool:
    """DDP chunks whose gradient reduction starts only after the backward pass."""
    return not ddp.ddp_config.overlap_grad_reduce and hasattr(ddp, "buffers")


def install(chunks: list, config) -> list[FirstWrite]:
    """A :class:`FirstWrite` on each DDP chunk (replacing its ``zero_grad_buffer``) and ``config``'s
    ``finalize_model_grads_func`` wrapped to run :meth:`FirstWrite.finish_backward` first. Returns them."""
    trackers = []
    for ddp in chunks:
        tracker = FirstWrite(ddp)
        ddp.zero_grad_buffer = tracker.zero_grad_buffer
        ddp._interop_first_write = tracker
        trackers.append(tracker)
    finalize = config.finalize_model_grads_func

    def finalize_model_grads(*args, **kwargs):
        for tracker in trackers:
            tracker.finish_backward()
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = finalize_model_grads
    return trackers


def tracker_of(chunk) -> FirstWrite | None:
    """The :class:`FirstWrite` of a DDP chunk, if installed."""
    return getattr(chunk, "_interop_first_write", None)
