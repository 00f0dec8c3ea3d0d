"""ALiBi in the fast engine's Triton decode kernels (``trainer.decode_attention``, BLOOM) on a GPU: the kernels
with a per-head slope vector against PyTorch's SDPA given the explicit ``slope · (slot − write_index)`` bias,
multi-head and grouped heads, left padding, both kernel families, in a CUDA graph with the fill level changing;
and a bf16 BLOOM engine's decode steps with the kernels vs with its SDPA path."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


@pytest.fixture(params=[True, False], ids=["single-pass", "chunked"])
def kernels(request, monkeypatch):
    """trainer.decode_attention with one kernel family forced (single-pass or chunked partials + combine)."""
    from trainer import decode_attention as da

    if DEVICE == "cuda" and not da.available():
        pytest.skip("needs CUDA and Triton")
    monkeypatch.setattr(da, "SINGLE_PASS", request.param)
    return da


def alibi_reference(q, kv_new, cache, pad, w, scale, slopes):
    """Write the new K/V at slot w, then SDPA over slots [0, w] minus padding, with the ALiBi bias
    ``slope_h · (slot − w)`` as an explicit [B, G, r, L] additive mask (head ``g * r + i`` has slope
    ``slopes[g * r + i]``)."""
    cache = cache.clone()
    cache[:, :, :, w] = kv_new[:, :, :, 0]
    b, g, r, _ = q.shape
    length = cache.size(3)
    slots = torch.arange(length, device=cache.device)
    attend = (slots <= w)[None] & ~pad[:, :length]
    bias = torch.zeros(attend.shape, device=cache.device).masked_fill(~attend, float("-inf"))[:, None, None]
    bias = bias + slopes.view(1, g, r, 1) * (slots - w).float()
    out = F.scaled_dot_product_attention(q.float(), cache[0].float(), cache[1].float(), attn_mask=bias, scale=scale)
    return out.reshape(b, -1), cache


def _inputs(b, g, r, d, length):
    cache = torch.randn(2, b, g, length, d, device=DEVICE, dtype=torch.bfloat16)
    qkv = torch.randn(b, g, r + 2, d, device=DEVICE, dtype=torch.bfloat16)
    q, kv_new = qkv[:, :, :r], qkv[:, :, r:].permute(2, 0, 1, 3).unsqueeze(3)
    return cache, qkv, q, kv_new, torch.zeros(b, length, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize("b,g,r,d,length", [(16, 6, 1, 64, 256), (3, 2, 3, 16, 128), (16, 16, 1, 96, 256)])
def test_alibi_decode_attention_equals_sdpa_with_the_bias(b, g, r, d, length, kernels):
    """Steep slopes (BLOOM's first heads are 0.5): a kernel that ignored them, used another head's slope or the
    wrong sign would attend elsewhere and miss by far more than the tolerance."""
    from interop.alibi import alibi_slopes

    da = kernels
    torch.manual_seed(b + g + d)
    cache, _, q, kv_new, pad = _inputs(b, g, r, d, length)
    slopes = alibi_slopes(g * r).to(DEVICE)
    pad[1:, :5] = True
    pad[-1, : length // 2] = True
    for w in (length // 2 + 1, 70, length - 1):
        pad_w = pad.clone()
        pad_w[:, w:] = False
        ref, ref_cache = alibi_reference(q, kv_new, cache, pad_w, w, d ** -0.5, slopes)
        plain, _ = alibi_reference(q, kv_new, cache, pad_w, w, d ** -0.5, torch.zeros_like(slopes))
        assert (ref - plain).abs().max() > 0.2  # the bias matters here
        out = da.decode_attention(q, kv_new, cache, pad_w, torch.tensor([w], device=DEVICE), d ** -0.5,
                                  slopes=slopes)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(cache, ref_cache)


def test_alibi_decode_attention_in_a_cuda_graph(kernels):
    from interop.alibi import alibi_slopes

    da = kernels
    cache, qkv, q, kv_new, pad = _inputs(4, 6, 1, 64, 192)
    slopes = alibi_slopes(6).to(DEVICE)
    w = torch.tensor([10], device=DEVICE)
    da.decode_attention(q, kv_new, cache.clone(), pad, w, 0.125, slopes=slopes)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, kv_new, cache, pad, w, 0.125, slopes=slopes)
    for step in (10, 11, 70, 191):
        qkv.copy_(torch.randn_like(qkv))
        w.fill_(step)
        ref, ref_cache = alibi_reference(q, kv_new, cache, pad, step, 0.125, slopes)
        graph.replay()
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert torch.equal(cache, ref_cache)


def test_bf16_bloom_engine_with_and_without_fused_attention():
    """A bf16 BLOOM (6 heads of 16) on the engine: decode-step logits with the Triton kernels equal those of the
    SDPA path (bf16 precision), teacher-forced on the SDPA run's greedy tokens, in CUDA graphs, compiled."""
    import transformers

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests.generate_helpers import PROMPTS, hf_left_pad, megatron_from_hf
    from trainer import decode_attention, generate_fast

    if not decode_attention.available():
        pytest.skip("needs CUDA and Triton")
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=96, hidden_size=96, n_layer=2, n_head=6, initializer_range=0.25, hidden_dropout=0.0,
        attention_dropout=0.0)).eval()
    runs, tokens = {}, []
    with distributed(RuntimeConfig(layout=Layout())), torch.inference_mode():
        model, _ = megatron_from_hf(hf)
        model = model.to(torch.bfloat16)
        assert generate_fast.unsupported_reason(model) is None
        ids, mask = hf_left_pad(PROMPTS)
        ids, mask = ids.cuda(), mask.cuda()
        key_pad, positions = mask == 0, (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            for fused in (False, True):
                generate_fast.FUSED_ATTENTION = fused
                engine = generate_fast.DecodeEngine(model, ids.size(0), ids.size(1) + 8, use_graph=True,
                                                    compile=True)
                assert engine.fused_attention == fused and engine.arch.alibi
                logits = [engine.prefill(ids, positions, key_pad, False)[:, 0].float()]
                for step in range(6):
                    if not fused:
                        tokens.append(logits[-1].argmax(-1))
                    logits.append(engine.decode(tokens[step], positions[:, -1] + 1 + step, ids.size(1) + step,
                                                key_pad).float().clone())
                runs[fused] = torch.stack(logits[1:])
        finally:
            generate_fast.FUSED_ATTENTION = True
    scale = runs[False].abs().max()
    assert (runs[True] - runs[False]).abs().max() <= 0.03 * scale
