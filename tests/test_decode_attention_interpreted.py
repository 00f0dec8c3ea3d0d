"""The fast engine's Triton decode kernels (``trainer.decode_attention``) on the CPU, under Triton's interpreter
(``TRITON_INTERPRET=1``), against a plain fp32 ``softmax(q kᵀ · scale + bias) v`` (SDPA in fp32 with the explicit
mask and ALiBi bias): every kernel (the single pass, and the chunk partials + combine) at head sizes 64, 96, 80 and
128 — those that are not powers of two walk a masked power-of-two width — with and without ALiBi, multi-head,
grouped (6 query heads over 2 K/V heads) and multi-query attention, rows filled to uneven lengths (left padding),
the beam row table, fp32 (1e-5) and fp16; and a tiny BLOOM whose head size (20) is not a power of two, generating
greedily through the fast engine with the interpreted kernels, token- and logit-identical to Transformers'
``generate``.

The interpreter only takes effect if it is set before Triton is first imported, which Megatron-Core and
Transformers do on import: the kernels run in one subprocess (``tests/decode_interpreted.py``) for the whole
module, and each test asserts on its part of the results. Tiny shapes: the interpreter runs every program in numpy.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from packaging.version import Version

triton = pytest.importorskip("triton", reason="Triton is not installed: its interpreter runs the decode kernels on "
                                              "the CPU (the test extra installs it)")
if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
    # the kernels' loop bound is a loaded scalar, which these interpreters turn into an int through a 1-element array
    pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__} (3.7+ does)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
HEAD_SIZES = [64, 96, 80, 128]
# (kv groups, query heads per group): multi-head, grouped (6 query heads over 2 K/V heads), multi-query
HEADS = {"mha": (3, 1), "gqa": (2, 3), "mqa": (1, 6)}
VARIANTS = [("mha", True), ("gqa", True), ("gqa", False), ("mqa", True)]
FAMILIES = {"single-pass": True, "chunked": False}
LENGTH = 128  # two chunks of 64 slots (the engine's CHUNK) of one 64-slot tile each
# write indices: in the second chunk (both chunks, a partial tile), for every case; within the first tile (the
# last row's 90 padding slots cover everything before it: only the new token attends there) at head size 96
ENDS = (101, 30)
GENERATE = dict(prompts=[[5, 17, 33, 2, 9, 41, 12], [7, 3], [60, 22, 8, 14], [11]], max_new_tokens=6)


def _case(family, d, heads, alibi, end, dtype=torch.float32, row_table=False) -> dict:
    g, r = HEADS[heads]
    return dict(single_pass=FAMILIES[family], b=3, g=g, r=r, d=d, length=LENGTH, end=end, alibi=alibi,
                dtype=dtype, seed=d + g + end, row_table=row_table)


CASES = {
    **{(f, d, h, a, ENDS[0]): _case(f, d, h, a, ENDS[0])
       for f, d, (h, a) in itertools.product(FAMILIES, HEAD_SIZES, VARIANTS)},
    **{(f, 96, h, a, ENDS[1]): _case(f, 96, h, a, ENDS[1]) for f, (h, a) in itertools.product(FAMILIES, VARIANTS)},
    **{(f, d, "gqa", True, "fp16"): _case(f, d, "gqa", True, 77, torch.float16)
       for f, d in itertools.product(FAMILIES, (64, 96))},
    **{(f, 96, "gqa", True, "rows"): _case(f, 96, "gqa", True, 90, row_table=True) for f in FAMILIES},
    **{(f, 80, "mqa", True, "first"): _case(f, 80, "mqa", True, 0) for f in FAMILIES},  # only the new token
}


def bloom_head_dim_20():
    """The generation tests' peaked tiny BLOOM (perturbed biases and norms, eager attention) with 6 heads of 20
    (hidden 120): neither a power of two."""
    from tests.alibi_mqa_tiny import peaked

    return peaked("bloom", bloom_hidden=120)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case and the BLOOM generation, run once in a subprocess with TRITON_INTERPRET=1."""
    tmp = tmp_path_factory.mktemp("interpreted")
    bloom_head_dim_20().save_pretrained(tmp / "bloom")
    torch.save({"kernels": list(CASES.values()), "generate": dict(hf_dir=str(tmp / "bloom"), **GENERATE)},
               tmp / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "tests.decode_interpreted", str(tmp / "cases.pt"),
                           str(tmp / "results.pt")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the interpreted kernels' subprocess failed:\n{proc.stderr[-4000:]}")
    results = torch.load(tmp / "results.pt", weights_only=True)
    return dict(zip(CASES, results["kernels"])), results["generate"]


@pytest.mark.parametrize("heads,alibi", VARIANTS, ids=[f"{h}-{'alibi' if a else 'plain'}" for h, a in VARIANTS])
@pytest.mark.parametrize("d,end", [(d, ENDS[0]) for d in HEAD_SIZES] + [(96, ENDS[1])])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_equal_plain_attention_fp32(family, d, end, heads, alibi, interpreted):
    """fp32 (the interpreter's dots are exact fp32): output within 1e-5 of the reference, and exactly slot
    ``end`` of each row's own cache row written (K and V, all d columns, nothing past d)."""
    out, reference, cache_ok = interpreted[0][(family, d, heads, alibi, end)]
    g, r = HEADS[heads]
    assert out.shape == reference.shape == (3, g * r * d)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert cache_ok


@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_fp16(family, d, interpreted):
    """fp16 caches (a 16-bit engine; the interpreter holds bf16 as raw bits, so fp16 stands in), GQA + ALiBi."""
    out, reference, cache_ok = interpreted[0][(family, d, "gqa", True, "fp16")]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=0)
    assert cache_ok


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_through_the_beam_row_table(family, interpreted):
    """Head size 96: slot s of query row b read from cache row ``rows[b, s]``; the new K/V into row b only."""
    out, reference, cache_ok = interpreted[0][(family, 96, "gqa", True, "rows")]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert cache_ok


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_first_decode_slot(family, interpreted):
    """Write index 0 (nothing filled yet): the output is the new token's own value."""
    out, reference, cache_ok = interpreted[0][(family, 80, "mqa", True, "first")]
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert cache_ok


def test_bloom_greedy_through_the_interpreted_kernels_equals_transformers(interpreted):
    """The fast engine picks the kernels for head size 20 (it used SDPA for anything but 16/32/64/128/256 before)
    and generates Transformers' greedy tokens, every step's logits within 1e-4 of Transformers' own."""
    from tests.alibi_mqa_tiny import assert_step_logits_equal_transformers
    from tests.generate_helpers import hf_generate

    ours = interpreted[1]
    assert ours["fused_attention"]
    assert ours["kernel_calls"] >= 2 * (GENERATE["max_new_tokens"] - 1)  # 2 layers, every decode step
    hf = bloom_head_dim_20()
    greedy = hf_generate(hf, GENERATE["prompts"], max_new_tokens=GENERATE["max_new_tokens"])
    assert ours["tokens"] == greedy
    assert len({len(t) for t in greedy}) > 1 or any(len(set(t)) > 2 for t in greedy)  # not a degenerate model
    assert_step_logits_equal_transformers(hf, GENERATE["prompts"], greedy, ours["logits"])


def test_supported_head_sizes_and_caches(monkeypatch):
    """Any head size up to 256; more than 16 query heads per group, a cache length off the chunk size, bf16 under
    the interpreter (its dots would multiply raw bits) or a CPU cache without the interpreter are refused."""
    from trainer import decode_attention as da

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def cache(length, d, dtype=torch.float32):
        return torch.empty(2, 1, 2, length, d, dtype=dtype)

    for d in (8, 20, 64, 80, 96, 100, 128, 200, 256):
        assert da.supported(cache(128, d), 3, d), d
    assert [da.padded_head_dim(d) for d in (8, 20, 64, 96, 100, 256)] == [16, 32, 64, 128, 128, 256]
    assert not da.supported(cache(128, 320), 3, 320)
    assert not da.supported(cache(128, 96), 17, 96)
    assert not da.supported(cache(100, 96), 3, 96)
    assert not da.supported(cache(128, 96, torch.bfloat16), 3, 96)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not da.supported(cache(128, 96), 3, 96)
