"""The trainer's Triton kernels compile for the GPUs they are built for (Hopper sm_90, Ampere sm_80), from their
real launchers at the benchmark shapes, without a GPU.

Why: the CPU tests run these kernels under Triton's interpreter, which executes their Python with numpy and accepts
code that Triton's compiler rejects (a type that differs between the branches of an ``if``, a block that is not a
power of two, a constexpr used as a value) or compiles into register spills. GPU time is scarce; a kernel that fails
to compile there wastes a call. Here each launcher runs on ``meta`` tensors of the 1.3B GPT-2 / 1.2B Llama shapes
(no memory), and every launch it makes is compiled by Triton's own compiler (``triton.compile``, PTX through the
bundled ``ptxas``) for the target instead of launched. On sm_90, the card the kernels' block sizes were measured on,
the compiled kernel must also keep its values in registers (no spill); on sm_80 ``swiglu_bwd`` spills 16 bytes.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
TOKENS = 4096  # rows of the activations: what matters to the compiler is the widths (constexpr blocks)


def _arg_type(value) -> str:
    if torch.is_tensor(value):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _spills(kernel) -> int:
    """Spill stores + loads that ``ptxas -v`` reports for the kernel's PTX (the bundled ptxas, the same target)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{kernel.metadata.target.arch}" + ("a" if kernel.metadata.target.arch == 90 else "")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))


class _Compiler:
    """Stands in for ``JITFunction.run``: compiles the launch for ``target`` and records it; launches nothing."""

    def __init__(self, target: GPUTarget):
        self.target = target
        self.compiled: list[tuple[str, dict, object]] = []

    def run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        options = {key: kwargs.pop(key) for key in _LAUNCH_OPTIONS if key in kwargs}
        bound = inspect.signature(fn.fn).bind(*args, **kwargs)
        constexprs = {param.name for param in fn.params if param.is_constexpr}
        signature = {name: "constexpr" if name in constexprs else _arg_type(value)
                     for name, value in bound.arguments.items()}
        values = {(fn.arg_names.index(name),): value for name, value in bound.arguments.items() if name in constexprs}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values), target=self.target,
                                options=options)
        self.compiled.append((fn.__name__, {n: bound.arguments[n] for n in constexprs}, kernel))


@pytest.fixture(params=[90, 80], ids=["sm_90", "sm_80"])
def compiler(request, monkeypatch):
    compiler = _Compiler(GPUTarget("cuda", request.param, 32))
    monkeypatch.setattr(JITFunction, "run", lambda fn, *a, **k: compiler.run(fn, *a, **k))
    return compiler


def _meta(*shape, dtype=torch.bfloat16, grad=True):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _norms(family: str):
    from trainer.kernels.norm import _AddNorm, _Norm

    rms, width = family == "llama", 2048
    x, residual = _meta(TOKENS, width), _meta(TOKENS, width)
    weight, bias = _meta(width), (None if rms else _meta(width))
    add_bias = None if rms else _meta(width)  # GPT-2's output-projection / fc2 bias, added with the residual
    y = _Norm.apply(x, weight, bias, 1e-5, rms)
    y.backward(torch.empty_like(y))
    h, y = _AddNorm.apply(x, add_bias, residual, weight, bias, 1e-5, rms)
    torch.autograd.backward([h, y], [torch.empty_like(h), torch.empty_like(y)])  # the residual gradient too
    h, y = _AddNorm.apply(x, add_bias, residual, weight, bias, 1e-5, rms)
    y.backward(torch.empty_like(y))  # the block's final norm: no other use of the sum


def _swiglu():
    from trainer.kernels.swiglu import _SwiGLU

    out = _SwiGLU.apply(_meta(TOKENS, 2 * 8192))
    out.backward(torch.empty_like(out))


def _rope():
    from trainer.kernels.qkv_rope import _PackedRoPE

    seq, groups, per_group, head = TOKENS // 2, 8, 4, 64  # 32 query heads in 8 groups of 4, head size 64
    qkv = _meta(seq, 2, groups, (per_group + 2) * head)
    cos, sin = _meta(seq, head, grad=False), _meta(seq, head, grad=False)
    query, key, value = _PackedRoPE.apply(qkv, cos, sin, per_group, head)
    torch.autograd.backward([query, key, value], [torch.empty_like(t) for t in (query, key, value)])


def _qkv_split(groups, per_group, head):
    from trainer.kernels.qkv_split import concat_with_column_sums

    seq, batch = TOKENS // 2, 2
    grads = [_meta(batch, groups, seq, width, grad=False).permute(2, 0, 1, 3)  # strided, as SDPA's come back
             for width in (per_group * head, head, head)]
    concat_with_column_sums(*grads)


def _adamw(model_dtype, multi_tensor=False):
    from trainer.kernels import adamw

    params = [_meta(2048, 2048, dtype=torch.float32, grad=False), _meta(2048, dtype=torch.float32, grad=False),
              _meta(8192, dtype=torch.float32, grad=False)]
    for param in params:
        param.grad = torch.empty_like(param)
    part = types.SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1),
                                 _interop_steps={}, **{adamw._MULTI: multi_tensor},
                                 _interop_copies={id(p): torch.empty_like(p, dtype=model_dtype) for p in params
                                                  if model_dtype is not None})
    adamw._step_with_ready_grads(part)


CASES = {
    "norm_kernel+add_norm (GPT-2 LayerNorm)": (lambda: _norms("gpt2"), {"norm_fwd": 3, "norm_bwd": 3}),
    "norm_kernel+add_norm (Llama RMSNorm)": (lambda: _norms("llama"), {"norm_fwd": 3, "norm_bwd": 3}),
    "swiglu_kernel": (_swiglu, {"swiglu_fwd": 1, "swiglu_bwd": 1}),
    "qkv_rope": (_rope, {"packed_rope_fwd": 1, "packed_rope_bwd": 1}),
    "qkv_split (GPT-2: 16 heads of 128)": (lambda: _qkv_split(16, 1, 128), {"qkv_concat_bwd": 1}),
    "qkv_split (Llama: 8 groups of 4 x 64)": (lambda: _qkv_split(8, 4, 64), {"qkv_concat_bwd": 1}),
    "adamw_kernel (bf16 model)": (lambda: _adamw(torch.bfloat16), {"adamw_step": 3}),
    "adamw_kernel (fp32 model)": (lambda: _adamw(None), {"adamw_step": 3}),
    "adamw_multi_tensor (bf16 model)": (lambda: _adamw(torch.bfloat16, True), {"adamw_step": 1, "adamw_step_multi": 1}),
    "adamw_multi_tensor (fp16 model)": (lambda: _adamw(torch.float16, True), {"adamw_step": 1, "adamw_step_multi": 1}),
    "adamw_multi_tensor (fp32 model)": (lambda: _adamw(None, True), {"adamw_step": 1, "adamw_step_multi": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_the_gpu_without_spills(compiler, case):
    launch, expected = CASES[case]
    launch()
    launched = {}
    for name, _, _ in compiler.compiled:
        launched[name] = launched.get(name, 0) + 1
    assert launched == expected  # every launch was compiled (none fell back to torch on the meta tensors)
    for name, constexprs, kernel in compiler.compiled:
        assert kernel.asm["cubin"], name
        if compiler.target.arch == 90:
            assert _spills(kernel) == 0, f"{name} {constexprs} spills registers on {compiler.target}"


def test_a_kernel_the_compiler_rejects_fails_here(compiler):
    """The check has teeth: a kernel whose ``if`` gives a float variable an int (numpy, under the interpreter, does
    not mind) is refused by the compiler, and the refusal reaches the test."""
    import triton.language as tl
    from triton.compiler.errors import CompilationError

    @triton.jit
    def mixed(x_ptr, FLAG: tl.constexpr):
        value = tl.load(x_ptr)
        if tl.program_id(0) == 0:
            value = 1
        tl.store(x_ptr, value)

    with pytest.raises(CompilationError, match="then block redefines"):
        mixed[(1,)](_meta(4, dtype=torch.float32, grad=False), FLAG=True)
