"""Runs the trainer's Triton kernels (packed QKV RoPE, SwiGLU, LayerNorm / RMSNorm, residual add + norm, AdamW, the
QKV split's backward) under Triton's interpreter on the CPU and saves what they computed, for
``tests/test_trainer_kernels_interpreted.py`` (which asserts on it).

A process of its own, like ``tests/decode_interpreted.py``: ``TRITON_INTERPRET=1`` takes effect only if it is set
before ``triton`` is first imported, and the training runs' rank processes (forked from this process's server)
inherit it.

    python -m tests.train_kernels_interpreted CORPUS_DIR RESULTS.pt

RESULTS.pt: ``{"ops": {name: [(kernel tensors, oracle tensors), ...]}, "curves": {name: [(losses, active kernels,
kernel ran, host reads of a step) per rank]}, "refs": {name: the same for a run without forced kernels}}``.
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))).replace(os.sep, "/")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

#: packed RoPE shapes (s, b, groups, query heads per group, head dim): GQA, MHA (1 per group), MQA (one group),
#: a head dim whose half is not a power of two
ROPE_SHAPES = ((7, 2, 2, 3, 8), (5, 3, 4, 1, 16), (4, 2, 1, 4, 12))
#: SwiGLU / norm inputs (rows, width): widths off the kernels' blocks, rows off the norm backward's row steps
ACTIVATION_SHAPES = ((37, 20), (300, 515), (5, 1030))


def _autograd_name(tensor: torch.Tensor) -> str:
    """The autograd node that made ``tensor``, looking through views (which kernel or fallback ran)."""
    fn = tensor.grad_fn
    while fn is not None and type(fn).__name__.startswith(("View", "Reshape", "Unsafe")):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def _rope_case(shape, seed):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from trainer.kernels.qkv_rope import packed_qkv_rope

    s, b, ng, qpg, hn = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(s, b, ng, (qpg + 2) * hn, generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, hn, 2).float() / hn))
    freqs = torch.outer(torch.arange(s + 3).float(), inv)
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # longer than s, as a cached table may be
    grads = [torch.randn(s, b, heads, hn, generator=gen) for heads in (ng * qpg, ng, ng)]
    grads[0] = grads[0].transpose(0, 1).contiguous().transpose(0, 1)  # a strided query gradient ([b, s] order)
    x = qkv.clone().requires_grad_()
    out = packed_qkv_rope(x, freqs, freqs, [qpg * hn, hn, hn])
    torch.autograd.backward(out, grads)
    # oracle: Megatron-Core's split + its own (unfused) RoPE on each of query and key
    y = qkv.clone().requires_grad_()
    query, key, value = torch.split(y, [qpg * hn, hn, hn], dim=3)
    query = query.reshape(s, b, ng * qpg, hn)
    ref = (_apply_rotary_pos_emb_bshd(query, freqs[:s]), _apply_rotary_pos_emb_bshd(key, freqs[:s]), value)
    torch.autograd.backward(ref, grads)
    return [*out, x.grad], [*ref, y.grad], _autograd_name(out[0])


def _swiglu_case(shape, seed):
    from trainer.kernels.swiglu import swiglu

    n, width = shape
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.randn(n, 2 * width, generator=gen) * 2
    g = torch.randn(n, width, generator=gen)
    y = y0.clone().requires_grad_()
    out = swiglu(y)
    out.backward(g)
    z = y0.clone().requires_grad_()
    a, b = z.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(a) * b  # the definition, through autograd
    ref.backward(g)
    return [out, y.grad], [ref, z.grad], _autograd_name(out)


def _norm_pairs(width, gen):
    """(our LayerNorm, torch's) and (our RMSNorm, torch's), each pair with the same perturbed weights and biases."""
    from trainer.kernels.norm import TritonLayerNorm, TritonRMSNorm

    for cls, oracle_cls in ((TritonLayerNorm, torch.nn.LayerNorm), (TritonRMSNorm, torch.nn.RMSNorm)):
        modules = cls(width, eps=1e-5), oracle_cls(width, eps=1e-5)
        with torch.no_grad():
            for param in modules[0].parameters():
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
        modules[1].load_state_dict(modules[0].state_dict())
        yield modules


def _norm_case(shape, seed):
    """LayerNorm (weight and bias) and RMSNorm through the kernels against torch's own norms, gradients of the input,
    the weight and the bias included; perturbed weights and biases."""
    n, width = shape
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, width, generator=gen) * 2 + 0.5
    g = torch.randn(n, width, generator=gen)
    ours, oracle, fns = [], [], []
    for modules in _norm_pairs(width, gen):
        for module, out in zip(modules, (ours, oracle)):
            x = x0.clone().requires_grad_()
            y = module(x)
            y.backward(g)
            out += [y, x.grad] + [p.grad for p in module.parameters()]
            if module is modules[0]:
                fns.append(_autograd_name(y))
    return ours, oracle, "+".join(fns)


def _add_norm_case(shape, seed):
    """A residual add (with and without an added bias) fused with LayerNorm / RMSNorm against the same sum through
    autograd and torch's own norms: the sum, the norm's output (handed back by the norm module's next call on the
    sum), and the gradients of both addends, the added bias, the norm's weight and bias, with a gradient reaching
    the sum along the residual stream too; perturbed weights and biases."""
    from trainer.kernels.norm import add_norm, add_norm_takes

    n, width = shape
    gen = torch.Generator().manual_seed(seed)
    x0, r0 = torch.randn(2, max(n // 2, 1), 2, width, generator=gen).unbind(0)  # [s, b, h] like a layer's
    x0, r0 = x0 * 2, r0 + 0.5
    c0 = torch.randn(width, generator=gen)
    gh, gy = torch.randn(2, *x0.shape, generator=gen).unbind(0)
    ours, oracle, fns = [], [], []
    for with_bias in (True, False):
        for modules in _norm_pairs(width, gen):
            for module, out in zip(modules, (ours, oracle)):
                x, r, c = (t.clone().requires_grad_() for t in (x0, r0, c0))
                bias = c if with_bias else None
                if module is modules[0]:
                    assert add_norm_takes(x, bias, r, module)
                    h = add_norm(x, bias, r, module)
                    fns.append(type(h.grad_fn).__name__)
                    y = module(h)
                    assert module(h) is not y  # handed back once: a second call normalises again
                else:
                    h = r + (x + c if with_bias else x)
                    y = module(h)
                torch.autograd.backward([h, y], [gh, gy])
                out += [h, y, x.grad, r.grad] + ([c.grad] if with_bias else []) + [p.grad for p in module.parameters()]
    return ours, oracle, "+".join(fns)


class _QKVLinearStandIn(torch.autograd.Function):
    """Stands in for the QKV linear in :func:`_qkv_split_case`: the identity, asking for the split's column sums
    as :class:`trainer.kernels.bias_epilogue.LinearWithBiasEpilogue` does, and keeping what its backward got."""

    taken: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.takes_column_sums = True
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        from trainer.kernels.bias_epilogue import take_column_sums

        _QKVLinearStandIn.taken += [take_column_sums(grad), take_column_sums(grad)]
        return grad


def _qkv_split_case(shape, seed):
    """Megatron-Core's QKV split through :func:`trainer.kernels.qkv_split.split_along_dim`: the backward packs the
    query, key and value gradients (strided, as SDPA's come back through the permutes) and sums the packed gradient
    over the tokens, against ``torch.split``'s own backward (a concatenation) and the column sum the QKV linear would
    take; the sums reach the linear's backward through a view of the gradient, once."""
    from trainer.kernels import qkv_split

    s, b, groups, qpg, hn = shape
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, groups * (qpg + 2) * hn, generator=gen)
    sizes = [qpg * hn, hn, hn]
    # gradients laid out [b, g, s, d] in memory and seen as [s, b, g, d], as the attention core returns them
    grads = [torch.randn(b, groups, s, w, generator=gen).permute(2, 0, 1, 3) for w in sizes]
    x = mixed.clone().requires_grad_()
    _QKVLinearStandIn.taken = []
    parts = qkv_split.split_along_dim(_QKVLinearStandIn.apply(x).view(s, b, groups, -1), 3, sizes)
    torch.autograd.backward(parts, grads)
    sums, again = _QKVLinearStandIn.taken
    assert again is None  # taken once
    y = mixed.clone().requires_grad_()
    torch.autograd.backward(torch.split(y.view(s, b, groups, -1), sizes, dim=3), grads)
    return [x.grad, sums], [y.grad, y.grad.reshape(s * b, -1).sum(0)], _autograd_name(parts[0])


def _adamw_against_torch(params, grads, split: int, copies: dict, **part_attrs) -> list[list[torch.Tensor]]:
    """Three steps (``grads``) of the AdamW kernel against torch's own AdamW with the gradients scaled beforehand (a
    clip factor of 0.5 in the second step), ``params[:split]`` in a group with weight decay and the rest in one
    without, ``copies`` ({parameter index: bf16 tensor}) the 16-bit copies: for ours and for torch's, each parameter,
    both moments and the step counter, then 1 where each copy is its updated parameter rounded to bf16 (within one
    bf16 unit: the interpreter truncates, a GPU rounds to nearest even)."""
    import types

    from trainer.kernels import adamw

    runs = []
    for ours in (True, False):
        leaves = [p.clone().requires_grad_() for p in params]
        groups = [{"params": leaves[:split], "weight_decay": 0.1}, {"params": leaves[split:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.8, 0.9), eps=1e-6)
        part = types.SimpleNamespace(optimizer=opt, _interop_copies={id(leaves[i]): c for i, c in copies.items()},
                                     _interop_steps={}, **part_attrs)
        for i, step_grads in enumerate(grads):
            scale = 0.5 if i == 1 else 1.0
            for leaf, grad in zip(leaves, step_grads):
                leaf.grad = grad.clone() if ours else grad * scale
            if ours:
                if scale != 1.0:
                    setattr(part, adamw._SCALE, scale)
                adamw._step_with_ready_grads(part)
            else:
                opt.step()
        runs.append([t.detach().reshape(-1) for leaf in leaves
                     for t in (leaf, opt.state[leaf]["exp_avg"], opt.state[leaf]["exp_avg_sq"],
                               opt.state[leaf]["step"])])
        if ours:
            runs[0] += [((c.float() - leaves[i].detach()).abs() <= leaves[i].detach().abs() * 2.0 ** -7).float()
                        .reshape(-1) for i, c in copies.items()]
    runs[1] += [torch.ones(c.numel()) for c in copies.values()]
    return runs


def _adamw_case(shape, seed):
    """The AdamW kernel (:func:`_adamw_against_torch`): a matrix with weight decay and a 16-bit copy, a vector
    without either."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen), torch.randn(shape[1], generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) * 3 for p in params] for _ in range(3)]
    ours, torchs = _adamw_against_torch(params, grads, 1, {0: torch.empty(shape, dtype=torch.bfloat16)})
    return ours, torchs, "adamw_step"


def _adamw_multi_case(shape, seed):
    """The ``adamw_multi_tensor`` launches (:func:`_adamw_against_torch`): a matrix above
    :data:`trainer.kernels.adamw.SMALL` (its own launch) and four small parameters in two groups (weight decay and a
    bf16 copy in one, neither in the other: one multi-tensor launch each, per step)."""
    from trainer.kernels import adamw

    gen = torch.Generator().manual_seed(seed)
    rows, width = shape
    shapes = [shape, (width,), (rows + 3,), (width,), (7,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(p.shape, generator=gen) * 3 for p in params] for _ in range(3)]
    copies = {i: torch.empty(shapes[i], dtype=torch.bfloat16) for i in (0, 1, 2)}
    small, adamw.SMALL = adamw.SMALL, rows * width - 1
    many, launch_many = [], adamw._launch_many
    adamw._launch_many = lambda *args: many.append(len(args[2])) or launch_many(*args)
    try:
        ours, torchs = _adamw_against_torch(params, grads, 3, copies, **{adamw._MULTI: True})
    finally:
        adamw.SMALL, adamw._launch_many = small, launch_many
    return ours, torchs, "adamw_step_multi" if many == [2, 2] * 3 else f"launches of {many}"


def _loss_case(shape, seed):
    """The fused loss with the padding mask added in the logits GEMM (``loss_bias_epilogue``, Liger's cross-entropy
    kernel) against the autograd cross entropy over the weight cut to the true vocabulary: the summed loss and the
    input and weight gradients (the padding rows' exactly zero), ignored tokens, a gradient scale other than 1,
    several chunks."""
    from trainer.kernels import linear_cross_entropy as lce

    n, width = shape
    vocab, padded = 3 * width + 5, 3 * width + 16
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, width, generator=gen), torch.randn(padded, width, generator=gen) * 0.5
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::5] = lce.IGNORE_INDEX
    chunk_const, lce.CHUNK_MEM_CONST = lce.CHUNK_MEM_CONST, 1  # two or more chunks
    runs = []
    for fused in (True, False):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            assert lce._bias_epilogue_loss_runs(x, lce.padding_bias(w, vocab))
            loss = lce.linear_cross_entropy(x, w, target, lce.padding_bias(w, vocab), bias_epilogue=True)
            name = _autograd_name(loss)
        else:
            loss = lce.reference_linear_cross_entropy(x, w[:vocab], target)
        (loss * 0.3).backward()
        runs.append([loss.detach().reshape(1), x.grad, w.grad])
    lce.CHUNK_MEM_CONST = chunk_const
    return runs[0], runs[1], name


class _HostReads(TorchDispatchMode):
    """Records the host reads of tensor values (``.item()``, ``bool()``, ``nonzero`` ...: a device sync on a GPU) made
    inside it, each by the innermost frame of this repository or Megatron-Core that made it."""

    OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.reads: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.reads.add((func.overloadpacket.__name__, _reader()))
        return func(*args, **(kwargs or {}))


def _reader() -> str:
    """``dir/file.py:function`` of the innermost function in this repository or Megatron-Core that made the call
    (not a comprehension inside it, not the CPU emulation's torch-function mode, which every call passes through,
    nor this file)."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if frame.name.startswith("<") and frame.name != "<module>":  # a comprehension: its function is outside
            continue
        if "site-packages/" in path:
            if "site-packages/megatron/" in path:
                return f"{path.split('site-packages/')[-1]}:{frame.name}"
        elif path.startswith(ROOT) and not path.endswith(("interop/cpu_emulation.py",
                                                         "tests/train_kernels_interpreted.py")):
            return f"{path[len(ROOT) + 1:]}:{frame.name}"
    return "?"


def _curve(data, family, world, layout, forced, state):
    """One tiny run with ``forced`` kernels (``tests.test_trainer_kernels._kernel_run``), whether the Triton
    kernels take a CPU tensor in this rank process (the interpreter reached it), and the host reads of the third
    training step (after the first steps' lazy set-up)."""
    from tests.test_trainer_kernels import _kernel_run
    from trainer import loop
    from trainer.kernels.triton_dispatch import triton_runs

    from trainer.kernels import adamw, bias_epilogue, norm

    calls, sums, many = [], [], []
    apply, take, launch_many = norm._AddNorm.apply, bias_epilogue.take_column_sums, adamw._launch_many
    norm._AddNorm.apply = lambda *args: calls.append(1) or apply(*args)  # counts the fused adds that ran
    bias_epilogue.take_column_sums = lambda grad: sums.append(take(grad)) or sums[-1]  # and the QKV sums handed over
    adamw._launch_many = lambda *args: many.append(1) or launch_many(*args)  # and the multi-tensor AdamW launches
    host, train_step, steps = _HostReads(), loop.Trainer.train_step, []

    def recorded_step(trainer):
        steps.append(1)
        if len(steps) != 3:
            return train_step(trainer)
        with host:
            return train_step(trainer)

    loop.Trainer.train_step = recorded_step
    losses, _, _, captured, on = _kernel_run(data, family, world, layout, forced, state)
    norm._AddNorm.apply, bias_epilogue.take_column_sums, loop.Trainer.train_step = apply, take, train_step
    adamw._launch_many = launch_many
    ran = triton_runs(torch.zeros(4)) and ("add_norm" not in on or len(calls) > 0) \
        and ("qkv_split" not in on or any(t is not None for t in sums)) \
        and ("adamw_multi_tensor" not in on or len(many) > 0)
    return losses, on, ran, captured, host.reads


#: reference runs (one rank, no kernel forced): name -> (family, layout)
REFS = {"llama": ("llama", {}), "gpt2": ("gpt2", {}),
        # bf16 (Megatron-Core's mixed-precision optimizer, main params copied to the model's) and every step clipped
        "gpt2-bf16-clip": ("gpt2", dict(mixed_precision="bf16", gradient_clipping=0.05))}
#: (name, reference, world, layout, forced kernels); each is compared with its reference run
CURVES = (
    ("llama", "llama", 1, {}, ("qkv_rope", "swiglu_fusion", "swiglu_kernel", "norm_kernel", "add_norm",
                               "adamw_kernel")),
    ("llama-tp2-sp", "llama", 2, dict(tp_degree=2, sequence_parallelism=True),
     ("qkv_rope", "swiglu_fusion", "swiglu_kernel", "sdpa_gqa", "norm_kernel", "add_norm", "adamw_kernel")),
    ("gpt2", "gpt2", 1, {}, ("bias_gelu_fusion", "norm_kernel", "add_norm", "adamw_kernel", "bias_epilogue",
                             "qkv_split")),
    ("gpt2-bf16-clip", "gpt2-bf16-clip", 1, REFS["gpt2-bf16-clip"][1], ("adamw_kernel",)),
    ("gpt2-bf16-clip-multi", "gpt2-bf16-clip", 1, REFS["gpt2-bf16-clip"][1], ("adamw_kernel", "adamw_multi_tensor")),
    ("gpt2-tp2-sp", "gpt2", 2, dict(tp_degree=2, sequence_parallelism=True), ("norm_kernel", "add_norm",
                                                                              "adamw_kernel")),
)


def main(corpus: str, out: str) -> None:
    from interop.launch import run_on_ranks
    from trainer.kernels.linear_cross_entropy import liger_function

    ops = {"rope": [_rope_case(s, i) for i, s in enumerate(ROPE_SHAPES)],
           "swiglu": [_swiglu_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "norm": [_norm_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "add_norm": [_add_norm_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "adamw": [_adamw_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "adamw_multi": [_adamw_multi_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "qkv_split": [_qkv_split_case(s, i) for i, s in enumerate(ROPE_SHAPES)]}
    if liger_function() is not None:  # Liger is a GPU extra: where it is installed, its kernel runs here too
        ops["loss"] = [_loss_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)]
    curves, refs = {}, {}
    for ref, (family, layout) in REFS.items():
        refs[ref] = run_on_ranks(_curve, 1, corpus, family, 1, layout, (), None, timeout_s=600)[0]
    for name, ref, world, layout, forced in CURVES:
        state = refs[ref][3]
        runs = run_on_ranks(_curve, world, corpus, REFS[ref][0], world, layout, forced, state, timeout_s=600)
        curves[name] = [(losses, on, ran, reads) for losses, on, ran, _, reads in runs]
    torch.save({"ops": ops, "curves": curves, "refs": {k: (*v[:3], v[4]) for k, v in refs.items()}}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
