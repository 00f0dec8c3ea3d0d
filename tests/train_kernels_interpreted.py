"""Runs the trainer's Triton kernels (packed QKV RoPE, SwiGLU, LayerNorm / RMSNorm) under Triton's interpreter on the
CPU and saves what they computed, for ``tests/test_trainer_kernels_interpreted.py`` (which asserts on it).

A process of its own, like ``tests/decode_interpreted.py``: ``TRITON_INTERPRET=1`` takes effect only if it is set
before ``triton`` is first imported, and the training runs' rank processes (forked from this process's server)
inherit it.

    python -m tests.train_kernels_interpreted CORPUS_DIR RESULTS.pt

RESULTS.pt: ``{"ops": {name: [(kernel tensors, oracle tensors), ...]}, "curves": {name: (losses, active kernels,
kernel ran)}}``.
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

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


def _norm_case(shape, seed):
    """LayerNorm (weight and bias) and RMSNorm through the kernels against torch's own norms, gradients of the input,
    the weight and the bias included; perturbed weights and biases."""
    from trainer.kernels.norm import TritonLayerNorm, TritonRMSNorm

    n, width = shape
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, width, generator=gen) * 2 + 0.5
    g = torch.randn(n, width, generator=gen)
    ours, oracle, fns = [], [], []
    for cls, oracle_cls in ((TritonLayerNorm, torch.nn.LayerNorm), (TritonRMSNorm, torch.nn.RMSNorm)):
        modules = cls(width, eps=1e-5), oracle_cls(width, eps=1e-5)
        with torch.no_grad():
            for param in modules[0].parameters():
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
        modules[1].load_state_dict(modules[0].state_dict())
        for module, out in zip(modules, (ours, oracle)):
            x = x0.clone().requires_grad_()
            y = module(x)
            y.backward(g)
            out += [y, x.grad] + [p.grad for p in module.parameters()]
            if module is modules[0]:
                fns.append(_autograd_name(y))
    return ours, oracle, "+".join(fns)


def _curve(data, family, world, layout, forced, state):
    """One tiny run with ``forced`` kernels (``tests.test_trainer_kernels._kernel_run``) plus whether the Triton
    kernels take a CPU tensor in this rank process (the interpreter reached it)."""
    from tests.test_trainer_kernels import _kernel_run
    from trainer.kernels.triton_dispatch import triton_runs

    losses, _, _, captured, on = _kernel_run(data, family, world, layout, forced, state)
    ran = triton_runs(torch.zeros(4))
    return losses, on, ran, captured


#: (name, family, world, layout, forced kernels); each is compared with the same family's one-rank unfused run
CURVES = (
    ("llama", "llama", 1, {}, ("qkv_rope", "swiglu_fusion", "swiglu_kernel", "norm_kernel")),
    ("llama-tp2-sp", "llama", 2, dict(tp_degree=2, sequence_parallelism=True),
     ("qkv_rope", "swiglu_fusion", "swiglu_kernel", "sdpa_gqa", "norm_kernel")),
    ("gpt2", "gpt2", 1, {}, ("bias_gelu_fusion", "norm_kernel")),
    ("gpt2-tp2-sp", "gpt2", 2, dict(tp_degree=2, sequence_parallelism=True), ("norm_kernel",)),
)


def main(corpus: str, out: str) -> None:
    from interop.launch import run_on_ranks

    ops = {"rope": [_rope_case(s, i) for i, s in enumerate(ROPE_SHAPES)],
           "swiglu": [_swiglu_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)],
           "norm": [_norm_case(s, i) for i, s in enumerate(ACTIVATION_SHAPES)]}
    curves, refs = {}, {}
    for family in ("llama", "gpt2"):
        losses, on, ran, captured = run_on_ranks(_curve, 1, corpus, family, 1, {}, (), None, timeout_s=600)[0]
        refs[family] = (losses, on, ran, captured)
    for name, family, world, layout, forced in CURVES:
        state = refs[family][3]
        runs = run_on_ranks(_curve, world, corpus, family, world, layout, forced, state, timeout_s=600)
        curves[name] = [(losses, on, ran) for losses, on, ran, _ in runs]
    torch.save({"ops": ops, "curves": curves, "refs": {k: v[:3] for k, v in refs.items()}}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
