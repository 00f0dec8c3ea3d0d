"""The fast engine's decode attention kernels (``trainer.decode_attention``) on a GPU against PyTorch's SDPA over
the same cache: MHA and GQA, head sizes 64 and 128 and off powers of two (96: BLOOM-1b1, 80), left padding, the
first decode slot and a full cache, replayed in a CUDA graph with the fill level changing between replays, and
through the beam row table; and the bf16 engine's decode steps with and without them, and with beams reordered
through the table vs by moving the cache. (On the CPU, ``test_decode_attention_interpreted.py`` runs the same
kernels under Triton's interpreter.)"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.fixture(params=[True, False], ids=["single-pass", "chunked"])
def kernels(request, monkeypatch):
    """trainer.decode_attention with one kernel family forced (single-pass or chunked partials + combine)."""
    from trainer import decode_attention as da

    if not da.available():
        pytest.skip("needs CUDA and Triton")
    monkeypatch.setattr(da, "SINGLE_PASS", request.param)
    return da


def _inputs(b, g, r, d, length, dtype):
    """A random layer cache, the QKV output of one step with the engine's strided q / new-K/V views, no padding."""
    cache = torch.randn(2, b, g, length, d, device="cuda", dtype=dtype)
    qkv = torch.randn(b, g, r + 2, d, device="cuda", dtype=dtype)
    q, kv_new = qkv[:, :, :r], qkv[:, :, r:].permute(2, 0, 1, 3).unsqueeze(3)
    return cache, qkv, q, kv_new, torch.zeros(b, length, dtype=torch.bool, device="cuda")


def _reference(q, kv_new, cache, pad, w, scale):
    """Write the new K/V at slot w, then SDPA over slots [0, w] minus padding."""
    cache = cache.clone()
    cache[:, :, :, w] = kv_new[:, :, :, 0]
    length = cache.size(3)
    attend = (torch.arange(length, device=cache.device) <= w)[None] & ~pad[:, :length]
    bias = torch.zeros(attend.shape, device=cache.device).masked_fill(~attend, float("-inf"))[:, None, None]
    out = F.scaled_dot_product_attention(q.float(), cache[0].float(), cache[1].float(), attn_mask=bias, scale=scale)
    return out.reshape(q.size(0), -1), cache


@pytest.mark.parametrize("b,g,r,d,length", [(16, 16, 1, 128, 384), (4, 2, 4, 64, 128), (3, 1, 8, 64, 64),
                                           (16, 16, 1, 96, 256), (4, 2, 3, 80, 128)])  # head sizes off powers of 2
def test_decode_attention_equals_sdpa(b, g, r, d, length, kernels):
    da = kernels
    torch.manual_seed(b * g + d)
    cache, _, q, kv_new, pad = _inputs(b, g, r, d, length, torch.bfloat16)
    assert da.supported(cache, r, d)
    pad[1:, : min(5, length // 2)] = True
    pad[-1, : length // 2] = True
    for w in (length // 2, 0 if b == 3 else length // 2 + 1, length - 1):
        pad_w = pad.clone()
        pad_w[:, w:] = False  # the new token is never padding
        ref, ref_cache = _reference(q, kv_new, cache, pad_w, w, d ** -0.5)
        out = da.decode_attention(q, kv_new, cache, pad_w, torch.tensor([w], device="cuda"), d ** -0.5)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(cache, ref_cache)  # exactly one slot written, with the new K and V


def test_decode_attention_in_a_cuda_graph(kernels):
    da = kernels
    cache, qkv, q, kv_new, pad = _inputs(4, 4, 2, 64, 192, torch.float16)
    w = torch.tensor([10], device="cuda")
    da.decode_attention(q, kv_new, cache.clone(), pad, w, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, kv_new, cache, pad, w, 0.125)
    for step in (10, 11, 70, 191):
        qkv.copy_(torch.randn_like(qkv))
        w.fill_(step)
        ref, ref_cache = _reference(q, kv_new, cache, pad, step, 0.125)
        graph.replay()
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(cache, ref_cache)


@contextlib.contextmanager
def _bf16_model(family, repeat=1):
    """A tiny bf16 Megatron-Core model on the GPU (TP1) and the test prompts, each repeated ``repeat`` times:
    (model, ids, key padding, positions); the engine's FUSED_ATTENTION switch is restored afterwards."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests.generate_helpers import PROMPTS, hf_left_pad, megatron_from_hf, tiny_hf
    from trainer import decode_attention, generate_fast

    if not decode_attention.available():
        pytest.skip("needs CUDA and Triton")
    with distributed(RuntimeConfig(layout=Layout())), torch.inference_mode():
        model, _ = megatron_from_hf(tiny_hf(family))
        ids, mask = hf_left_pad(PROMPTS)
        ids, mask = ids.repeat_interleave(repeat, 0).cuda(), mask.repeat_interleave(repeat, 0).cuda()
        try:
            yield model.to(torch.bfloat16), ids, mask == 0, (mask.cumsum(-1) - 1).clamp(min=0)
        finally:
            generate_fast.FUSED_ATTENTION = True


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_engine_with_and_without_fused_attention(family):
    """A bf16 model's decode steps give the same logits (to bf16 precision) with the fused attention as with
    SDPA, step after step on the same tokens (teacher-forced: in bf16 a free-running greedy row may take the
    other side of a near-tie and the rows would stop being comparable)."""
    from trainer import generate_fast

    with _bf16_model(family) as (model, ids, key_pad, positions):
        runs, tokens = {}, None
        for fused in (False, True):
            generate_fast.FUSED_ATTENTION = fused
            engine = generate_fast.DecodeEngine(model, ids.size(0), ids.size(1) + 8, use_graph=True, compile=True)
            assert engine.fused_attention == fused
            logits = [engine.prefill(ids, positions, key_pad, False)[:, 0].float()]
            if tokens is None:  # the SDPA run's greedy tokens, fed to both engines
                tokens = []
            for step in range(6):
                if not fused:
                    tokens.append(logits[-1].argmax(-1))
                logits.append(engine.decode(tokens[step], positions[:, -1] + 1 + step, ids.size(1) + step,
                                            key_pad).float().clone())
            assert engine.graphs
            runs[fused] = torch.stack(logits[1:])
    scale = runs[False].abs().max()
    assert (runs[True] - runs[False]).abs().max() <= 0.03 * scale


def test_decode_attention_through_a_row_table(kernels):
    """Beam search: slot s of query row b is read from cache row ``rows[b, s]``; the new K/V go into row b."""
    da = kernels
    b, g, r, d, length = 8, 2, 2, 64, 128
    torch.manual_seed(3)
    cache, _, q, kv_new, pad = _inputs(b, g, r, d, length, torch.bfloat16)
    pad[::2, :3] = True
    for w in (0, 7, 77, length - 1):
        pad_w = pad.clone()
        pad_w[:, w:] = False  # the new token is never padding
        rows = torch.randint(0, b, (b, length), dtype=torch.int32, device="cuda")
        slots = torch.arange(length, device="cuda")
        gathered = cache[:, rows.long(), :, slots[None, :]].permute(2, 0, 3, 1, 4)  # [2, b, g, L, d] by owner
        ref, _ = _reference(q, kv_new, gathered.contiguous(), pad_w, w, d ** -0.5)
        expected = cache.clone()
        expected[:, :, :, w] = kv_new[:, :, :, 0]
        out = da.decode_attention(q, kv_new, cache, pad_w, torch.tensor([w], device="cuda"), d ** -0.5, rows=rows)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(cache, expected)  # the cache itself never moves: only slot w of each own row


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_engine_beam_reorder_through_row_table(family):
    """Reordering beams through the row table (fused attention: the cache stays) gives the logits of reordering
    the cache itself (SDPA path), step after step on the same tokens and the same beam moves."""
    from trainer import generate_fast

    with _bf16_model(family, repeat=2) as (model, ids, key_pad, positions):  # 2 beams a prompt
        n, s = ids.shape
        gen = torch.Generator().manual_seed(0)
        moves = [(torch.arange(n).view(-1, 2)[:, torch.randint(0, 2, (2,), generator=gen)]).flatten().cuda()
                 for _ in range(6)]  # each beam continues one of its prompt's two beams
        tokens = [torch.randint(0, 100, (n,), generator=gen).cuda() for _ in range(6)]
        runs = {}
        for fused in (False, True):
            generate_fast.FUSED_ATTENTION = fused
            engine = generate_fast.DecodeEngine(model, n, s + 8, use_graph=True, compile=True)
            engine.prefill(ids, positions, key_pad, False)
            logits = []
            for step in range(6):
                engine.reorder(moves[step], s + step)
                logits.append(engine.decode(tokens[step], positions[:, -1] + 1 + step, s + step, key_pad)
                              .float().clone())
            assert engine.use_row_table == fused
            runs[fused] = torch.stack(logits)
    scale = runs[False].abs().max()
    assert (runs[True] - runs[False]).abs().max() <= 0.03 * scale
