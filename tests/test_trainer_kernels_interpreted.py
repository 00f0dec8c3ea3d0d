"""The trainer's Triton kernels (``qkv_rope``, ``swiglu_kernel``, ``norm_kernel``, ``add_norm``, ``adamw_kernel``,
``qkv_split``) run under Triton's interpreter on the CPU, in fp32: each op's outputs and gradients equal an
independent oracle (Megatron-Core's split + unfused RoPE; SwiGLU through autograd; torch's LayerNorm and RMSNorm,
after the residual add through autograd; torch's AdamW; ``torch.split``'s backward and a column sum) within 1e-5, and
tiny Llama / GPT-2 runs with the kernels forced on train the unfused curve, on one rank and at TP 2 with sequence
parallelism (the norms' weight gradients are partial sums there, all-reduced by Megatron-Core), and a training step
with them reads no more tensor values on the host (device syncs on a GPU) than one without them.

The work happens once, in a subprocess (``tests/train_kernels_interpreted.py``): the interpreter must be switched
on before Triton is first imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_trainer_helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels")
    corpus = write_corpus(str(tmp / "counting"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "tests.train_kernels_interpreted", corpus, str(tmp / "out.pt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"the interpreted kernels' subprocess failed:\n{proc.stderr[-4000:]}")
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("op,autograd_fn", [("rope", "_PackedRoPEBackward"), ("swiglu", "_SwiGLUBackward"),
                                            ("norm", "_NormBackward+_NormBackward"),
                                            ("add_norm", "+".join(["_AddNormBackward"] * 4)),
                                            ("adamw", "adamw_step"), ("adamw_multi", "adamw_step_multi"),
                                            ("loss", "_BiasEpilogueLossBackward"),
                                            ("qkv_split", "_QKVSplitBackward")])
def test_kernels_equal_their_oracles_in_fp32(interpreted, op, autograd_fn):
    if op not in interpreted["ops"]:
        pytest.skip("Liger (a GPU extra) is not installed: its cross-entropy kernel is not here")
    cases = interpreted["ops"][op]
    assert len(cases) == 3
    for ours, oracle, fn in cases:
        assert fn == autograd_fn  # the kernel ran, not the fallback
        assert len(ours) == len(oracle)
        for a, b in zip(ours, oracle):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert b.abs().max() > 0.1  # nothing vacuous (no all-zero gradient)


@pytest.mark.parametrize("name,ref,expected,tol", [
    ("llama", "llama", {"qkv_rope", "swiglu_fusion", "swiglu_kernel", "norm_kernel", "add_norm", "adamw_kernel"}, 1e-5),
    ("llama-tp2-sp", "llama", {"qkv_rope", "swiglu_fusion", "swiglu_kernel", "sdpa_gqa", "norm_kernel", "add_norm",
                               "adamw_kernel"}, 1e-5),
    ("gpt2", "gpt2", {"bias_gelu_fusion", "norm_kernel", "add_norm", "adamw_kernel", "bias_epilogue", "qkv_split"},
     1e-5),
    ("gpt2-tp2-sp", "gpt2", {"norm_kernel", "add_norm", "adamw_kernel"}, 1e-5),
    # bf16: the kernel's copy truncates under the interpreter where torch's rounds to nearest
    ("gpt2-bf16-clip", "gpt2-bf16-clip", {"adamw_kernel"}, 2e-3),
    ("gpt2-bf16-clip-multi", "gpt2-bf16-clip", {"adamw_kernel", "adamw_multi_tensor"}, 2e-3)])
def test_forced_kernels_train_the_unfused_curve(interpreted, name, ref, expected, tol):
    ref, ref_on, ref_ran, _ = interpreted["refs"][ref]
    assert ref_on == set() and ref_ran
    assert len(ref) >= 5 and ref[-1] < ref[0] - 0.05, ref  # it learns: the comparison is not vacuous
    for losses, on, ran, _ in interpreted["curves"][name]:
        assert ran and on == expected, on
        assert losses == pytest.approx(ref, rel=tol, abs=tol)


#: the host reads of tensor values a training step makes (each a device sync on a GPU): the gradient norm that
#: Megatron-Core's clipping decides on, the step's loss sums for the log, and the token-id range check of the samples
#: (host tensors, no sync)
EXPECTED_HOST_READS = {("_local_scalar_dense", "megatron/core/optimizer/clip_grads.py:get_grad_norm_fp32"),
                       ("_local_scalar_dense", "trainer/loop.py:_reduce_sums"),
                       ("_local_scalar_dense", "trainer/data.py:__getitem__")}
#: at TP > 1 also Megatron-Core's model-parallel RNG tracker (the CPU emulation's stand-in for the CUDA RNG state)
TP_HOST_READS = {("_local_scalar_dense", "megatron/core/tensor_parallel/random.py:fork")}


@pytest.mark.parametrize("name", ["llama", "llama-tp2-sp", "gpt2", "gpt2-tp2-sp", "gpt2-bf16-clip",
                                  "gpt2-bf16-clip-multi"])
def test_the_kernels_add_no_host_read_to_a_training_step(interpreted, name):
    """No kernel's host code reads a tensor's value during a step (a sync that stalls the GPU each time: the
    AdamW kernel's step counters once cost one per parameter, by ``==`` on tensor keys); the step's reads are the
    same as without the kernels."""
    unfused = interpreted["refs"][name.split("-tp2")[0].removesuffix("-multi")][3]
    assert unfused == EXPECTED_HOST_READS  # the recording sees the reads there are
    expected = unfused | (TP_HOST_READS if "-tp2" in name else set())
    for *_, reads in interpreted["curves"][name]:
        assert reads == expected, reads ^ expected


def test_multi_tensor_adamw_trains_exactly_the_per_parameter_curve(interpreted):
    """``adamw_multi_tensor`` is the per-parameter AdamW kernel's arithmetic in another launch layout: its bf16,
    clipped curve is that kernel's, loss for loss (the curve above only bounds both against torch's AdamW)."""
    (single, *_), = interpreted["curves"]["gpt2-bf16-clip"]
    (multi, *_), = interpreted["curves"]["gpt2-bf16-clip-multi"]
    assert multi == single
