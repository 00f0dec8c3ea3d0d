"""Runs the fast engine's Triton decode kernels under Triton's interpreter on the CPU and saves what they computed,
for ``tests/test_decode_attention_interpreted.py`` (which asserts on it).

A process of its own: ``TRITON_INTERPRET=1`` takes effect only if it is set before ``triton`` is first imported
(``triton.language``'s own ``@jit`` helpers are decorated then), and Megatron-Core and Transformers import Triton
when they are imported — a pytest process has done so long before any test runs.

    python -m tests.decode_interpreted CASES.pt RESULTS.pt

CASES.pt: ``{"kernels": [case dict, ...], "generate": {"hf_dir": ..., "prompts": ..., "max_new_tokens": ...}}``
(either part optional). RESULTS.pt: ``{"kernels": [(out, reference, cache written as expected), ...],
"generate": {"tokens", "logits", "fused_attention", "kernel_calls"}}``.
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402


def inputs(b: int, g: int, r: int, d: int, length: int, dtype: torch.dtype, seed: int, pad_counts=(40, 90)):
    """A random layer cache and one step's QKV output with the engine's strided q / new-K/V views; row 0 has no
    padding, the next ones ``pad_counts`` slots each (rows filled to uneven lengths, as left-padded prompts leave
    them)."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, b, g, length, d, generator=gen).to(dtype)
    qkv = torch.randn(b, g, r + 2, d, generator=gen).to(dtype)
    q, kv_new = qkv[:, :, :r], qkv[:, :, r:].permute(2, 0, 1, 3).unsqueeze(3)
    pad = torch.zeros(b, length, dtype=torch.bool)
    for row, count in zip(range(1, b), pad_counts):
        pad[row, :count] = True
    return cache, q, kv_new, pad


def run_kernel_case(case: dict):
    """One decode-attention call on the case's random inputs: (output, fp32 reference, cache written exactly)."""
    from interop.alibi import alibi_slopes
    from tests.test_bloom_decode_gpu import alibi_reference
    from trainer import decode_attention as da

    b, g, r, d, length, end = (case[k] for k in ("b", "g", "r", "d", "length", "end"))
    cache, q, kv_new, pad = inputs(b, g, r, d, length, case["dtype"], case["seed"])
    pad[:, end:] = False  # the new token is never padding
    slopes = alibi_slopes(g * r).float() if case["alibi"] else None
    scale = d ** -0.5
    da.SINGLE_PASS = case["single_pass"]
    if not da.supported(cache, r, d):
        raise AssertionError(f"decode_attention.supported refuses {case}")
    source = cache
    rows = None
    if case.get("row_table"):  # beam search: slot s of row b read from cache row rows[b, s]
        rows = torch.randint(0, b, (b, length), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
        slots = torch.arange(length)
        source = cache[:, rows.long(), :, slots[None, :]].permute(2, 0, 3, 1, 4).contiguous()  # [2, b, g, L, d]
    reference, _ = alibi_reference(q, kv_new, source, pad, end, scale,
                                   slopes if slopes is not None else torch.zeros(g * r))
    expected_cache = cache.clone()
    expected_cache[:, :, :, end] = kv_new[:, :, :, 0]  # the new K/V in each query's own row, nothing else
    out = da.decode_attention(q, kv_new, cache, pad, torch.tensor([end]), scale, rows=rows, slopes=slopes)
    return out, reference, bool(torch.equal(cache, expected_cache))


def run_generate(hf_dir: str, prompts, max_new_tokens: int) -> dict:
    """Greedy generation of the HF checkpoint at ``hf_dir`` through the fast engine (TP1, CPU, fp32) with the
    interpreted kernels; counts the kernel calls so that a silent fallback to SDPA shows."""
    import transformers

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests.generate_helpers import hf_left_pad, megatron_from_hf
    from trainer import decode_attention, generate_fast
    from trainer.generate import GenerationConfig, generate

    calls = []
    kernel = decode_attention.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    decode_attention.decode_attention = counted
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with distributed(RuntimeConfig(layout=Layout())):
        model, cfg = megatron_from_hf(hf)
        ids, mask = hf_left_pad(prompts)
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(hf.config.eos_token_id,),
                                  return_logits=True)
        out = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size, engine="fast")
        engine = generate_fast.engine_of(model)
        return {"tokens": out.tokens, "logits": out.logits, "fused_attention": bool(engine.fused_attention),
                "kernel_calls": len(calls)}


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path, weights_only=True)
    results = {}
    if cases.get("kernels"):
        results["kernels"] = [run_kernel_case(case) for case in cases["kernels"]]
    if cases.get("generate"):
        results["generate"] = run_generate(**cases["generate"])
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
