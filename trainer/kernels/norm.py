"""LayerNorm and RMSNorm as Triton kernels whose backward reads the input and the output gradient once.

Why: torch's norm backward is two passes over the activations — one kernel for the input gradient and a second that
reads the input and the output gradient again for the weight (and bias) gradient. On a 1×H100 profile of the
GPT-2 1.3B step (seq 2048, micro-batch 16, bf16, 2026-12-07) the 49 LayerNorms took 22.5 ms of a 530 ms step,
about twice what their bytes need (Llama 1.2B's 33 RMSNorms: 12.7 ms). Liger's norms do the backward in one kernel
but walk a row at a time per program and measured no faster end to end (docs/experiments.md).
Here the forward normalises a few whole rows per program and keeps each row's mean and rstd (fp32); the backward
takes a contiguous band of rows per program, a few rows per step, computes their input gradient and adds
``dy·x̂`` (and ``dy``) into fp32 partial sums held in registers, written once per program and summed by torch.

The modules subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (same parameters and state-dict names, so
checkpoints and ``param.sequence_parallel`` work unchanged). The kernels take CUDA 16-bit inputs (or CPU tensors
under Triton's interpreter, for the CPU tests) with an affine weight and a row of at most 16,384; everything else
runs torch's own forward. RMSNorm computes ``x·rstd·w`` in fp32 and rounds once (torch rounds ``x·rstd`` before
the weight: the two differ by at most a rounding in 16 bits, and not at all in fp32).
"""
from __future__ import annotations

import functools

import torch

from trainer.kernels.triton_dispatch import triton_runs

MAX_WIDTH = 16384


@functools.cache
def available() -> bool:
    """Whether Triton imports (the kernels' module compiles its decorators)."""
    try:
        import trainer.kernels.training_triton  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or Triton failing to find a backend
        return False
    return True


@functools.cache
def backward_programs(device_index: int) -> int:
    """Backward programs: two per SM, so every SM holds a band of rows and the partial sums stay few."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def row_bands(n: int, programs: int, rows: int) -> tuple[int, int]:
    """``n`` rows cut into at most ``programs`` bands of whole steps of ``rows`` (the kernels' ``_band_rows``):
    ``(bands, rows per band)``; each band's program writes one row of partial sums."""
    per_band = -(-n // programs)
    per_band = -(-per_band // rows) * rows
    return -(-n // per_band), per_band


def _shape(width: int) -> tuple[int, int, int]:
    """(columns block, forward rows per program, backward rows per step) for rows of ``width``."""
    import triton

    block = triton.next_power_of_2(width)
    return block, max(1, 8192 // block), max(1, 4096 // block)


def _forward(x, weight, bias, eps: float, rms: bool, residual=None, add_bias=None, shape=None):
    """The forward kernel on rows ``x [N, H]`` (unit column stride): ``(y, mean, rstd, h)``; with a ``residual``
    (same layout) the rows normalised are ``h = x + residual (+ add_bias)``, returned too (else ``h`` is ``x``).
    New tensors are contiguous, of ``shape`` (default ``[N, H]``): not views, whatever their shape."""
    from trainer.kernels.training_triton import norm_fwd

    n, width = x.shape
    block, rows, _ = _shape(width)
    new = functools.partial(torch.empty, shape or x.shape, dtype=x.dtype, device=x.device)
    y = new()
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    add = residual is not None
    h = new() if add else x
    norm_fwd[(-(-n // rows),)](x, weight, bias if bias is not None else weight, y, mean, rstd,
                               residual if add else x, add_bias if add_bias is not None else weight, h, n, width,
                               x.stride(0), width, residual.stride(0) if add else 0, width if add else 0, eps,
                               RMS=rms, HAS_BIAS=bias is not None, ADD=add, ADD_BIAS=add_bias is not None,
                               ROWS=rows, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return y, mean, rstd, h


def _backward(dy, x, weight, mean, rstd, rms: bool, has_bias: bool, d_residual=None, sum_dx: bool = False,
              shape=None):
    """The backward kernel on rows ``[N, H]``: ``(dx, dw, db, d_added_bias)``; ``d_residual`` (the gradient
    reaching ``x`` by another path) is added to ``dx``; ``sum_dx``: also the column sums of that total (a bias added
    into ``x``). ``dx`` is contiguous, of ``shape`` (default ``[N, H]``)."""
    from trainer.kernels.training_triton import norm_bwd

    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if d_residual is not None and d_residual.stride(-1) != 1:
        d_residual = d_residual.contiguous()
    n, width = x.shape
    block, _, rows = _shape(width)
    programs, per_program = row_bands(n, backward_programs(x.device.index or 0) if x.is_cuda else 4, rows)
    dx = torch.empty(shape or x.shape, dtype=x.dtype, device=x.device)
    partial = functools.partial(torch.empty, programs, width, dtype=torch.float32, device=x.device)
    dw = partial()
    db = partial() if has_bias else dw
    ds = partial() if sum_dx else dw
    norm_bwd[(programs,)](dy, x, weight, mean, rstd, dx, dw, db, d_residual if d_residual is not None else dy, ds,
                          n, width, dy.stride(0), x.stride(0), width,
                          d_residual.stride(0) if d_residual is not None else 0, ROWS_PER_PROGRAM=per_program,
                          RMS=rms, HAS_BIAS=has_bias, HAS_DR=d_residual is not None, SUM_DX=sum_dx, ROWS=rows,
                          BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return (dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype) if has_bias else None,
            ds.sum(0) if sum_dx else None)


class _Norm(torch.autograd.Function):
    """``x [N, H]`` (unit column stride) -> LayerNorm / RMSNorm of each row with weight ``w`` and optional bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rms: bool):
        y, mean, rstd, _ = _forward(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, _ = _backward(dy, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
        return dx, dw, db, None, None


class _AddNorm(torch.autograd.Function):
    """``x, residual [..., H]`` (contiguous), optional ``add_bias [H]`` -> ``h = residual + x (+ add_bias)`` and the
    LayerNorm / RMSNorm of ``h``, both new contiguous tensors of ``x``'s shape; one kernel each way
    (:mod:`trainer.kernels.add_norm` says why). Backward: ``dh = (gradient of h from its other uses) + the norm's
    input gradient``, given to both ``x`` and ``residual``, and the added bias's gradient as the column sums of
    ``dh``, all in the norm's backward kernel."""

    @staticmethod
    def forward(ctx, x, add_bias, residual, weight, bias, eps: float, rms: bool):
        ctx.set_materialize_grads(False)  # an unused h or y gives None, not a tensor of zeros to read
        width = x.shape[-1]
        y, mean, rstd, h = _forward(x.view(-1, width), weight, bias, eps, rms, residual=residual.view(-1, width),
                                    add_bias=add_bias, shape=x.shape)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        ctx.add_bias_dtype = add_bias.dtype if add_bias is not None else None
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, mean, rstd = ctx.saved_tensors
        width = h.shape[-1]
        dy = torch.zeros_like(h) if dy is None else dy
        dh = dh.reshape(-1, width) if dh is not None else None
        dx, dw, db, d_add_bias = _backward(dy.reshape(-1, width), h.view(-1, width), weight, mean, rstd, ctx.rms,
                                           ctx.has_bias, d_residual=dh, sum_dx=ctx.add_bias_dtype is not None,
                                           shape=h.shape)
        if d_add_bias is not None:
            d_add_bias = d_add_bias.to(ctx.add_bias_dtype)
        return dx, d_add_bias, dx, dw, db, None, None


def _takes(x: torch.Tensor, weight) -> bool:
    return weight is not None and 0 < x.shape[-1] <= MAX_WIDTH and x.numel() > 0 and triton_runs(x)


def _apply(x: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _Norm.apply(rows, weight, bias, eps, rms).view(x.shape)


#: attribute of a residual sum ``h`` made by :func:`add_norm`: ``(norm module, norm(h), h's version)``, taken by that
#: module's next call on ``h`` (:func:`_take_pending`)
PENDING = "_interop_pending_norm"


def _params(norm, dtype: torch.dtype) -> tuple:
    """``(weight, bias, eps, rms)`` of one of this module's norms for inputs of ``dtype``."""
    if isinstance(norm, TritonRMSNorm):
        return norm.weight, None, norm.eps if norm.eps is not None else torch.finfo(dtype).eps, True
    return norm.weight, norm.bias, norm.eps, False


def is_triton_norm(module) -> bool:
    """Whether ``module`` is one of this module's norms (:class:`TritonLayerNorm`, :class:`TritonRMSNorm`)."""
    return isinstance(module, (TritonLayerNorm, TritonRMSNorm))


def add_norm_takes(x: torch.Tensor, add_bias, residual: torch.Tensor, norm) -> bool:
    """Whether :func:`add_norm` runs its kernel for these inputs (else the caller adds and normalises unfused)."""
    return (is_triton_norm(norm) and len(norm.normalized_shape) == 1
            and x.shape[-1] == norm.normalized_shape[0] and _takes(x, norm.weight) and residual.shape == x.shape
            and residual.dtype == x.dtype and x.is_contiguous() and residual.is_contiguous()
            and (add_bias is None or (add_bias.dim() == 1 and add_bias.shape[0] == x.shape[-1]
                                      and add_bias.is_contiguous())))


def add_norm(x: torch.Tensor, add_bias, residual: torch.Tensor, norm) -> torch.Tensor:
    """``h = residual + x (+ add_bias)``, returned; ``norm(h)`` is computed in the same kernel and left on ``h``
    (:data:`PENDING`) for ``norm``'s next call on ``h``, which returns it instead of normalising again. For inputs
    :func:`add_norm_takes`."""
    weight, bias, eps, rms = _params(norm, x.dtype)
    h, y = _AddNorm.apply(x, add_bias, residual, weight, bias, eps, rms)
    setattr(h, PENDING, (norm, y, h._version))
    return h


def _take_pending(norm, x: torch.Tensor):
    """``norm(x)`` if :func:`add_norm` computed it with ``x`` — the same tensor, unchanged since, in the same autograd
    graph (a sum that crossed an activation-checkpoint boundary was recomputed without its norm's graph) — else
    None. Taken once: the output is not kept alive by ``x`` after its use."""
    pending = getattr(x, PENDING, None)
    if pending is None:
        return None
    delattr(x, PENDING)
    owner, y, version = pending
    return y if owner is norm and x._version == version and x.grad_fn is y.grad_fn else None


class TritonLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dimension whose 16-bit CUDA path is this module's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = _take_pending(self, x)
        if pending is not None:
            return pending
        if len(self.normalized_shape) != 1 or not _takes(x, self.weight):
            return super().forward(x)
        return _apply(x, self.weight, self.bias, self.eps, rms=False)


class TritonRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dimension whose 16-bit CUDA path is this module's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = _take_pending(self, x)
        if pending is not None:
            return pending
        if len(self.normalized_shape) != 1 or not _takes(x, self.weight):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _apply(x, self.weight, None, eps, rms=True)
