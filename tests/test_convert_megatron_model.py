"""interop.megatron_model against Transformers' own forward: a random tiny HF model, streamed into canonical
form and loaded into Megatron-Core GPTModels at TP1 (in process) and TP2xPP2 (gloo ranks), must give HF's logits."""
from __future__ import annotations

import pytest
import torch

from formats.layout import Layout
from interop.convert_stream import hf_to_canonical
from interop.families import family_for_hf
from interop.launch import run_on_ranks

INIT = 0.1  # larger than HF's 0.02 so that logits are O(1) and layout mistakes show clearly
TOKENS = torch.tensor([[1, 5, 9, 33, 64, 2, 97, 11], [7, 7, 3, 0, 99, 42, 18, 5]])


def tiny_hf(kind: str, tie: bool = False, seed: int = 0):
    """A random tiny HF causal LM (fp32, eval mode). ``kind``: gpt2 | llama | mistral-mqa | qwen2."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        conf = transformers.GPT2Config(
            vocab_size=100, n_positions=32, n_embd=64, n_layer=4, n_head=4, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT,
        )
        model = transformers.GPT2LMHeadModel(conf)
    elif kind == "llama":
        conf = transformers.LlamaConfig(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=tie,
            rope_theta=5000.0, initializer_range=INIT,
        )
        model = transformers.LlamaForCausalLM(conf)
    elif kind == "mistral-mqa":
        conf = transformers.MistralConfig(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=32, sliding_window=None,
            tie_word_embeddings=tie, initializer_range=INIT,
        )
        model = transformers.MistralForCausalLM(conf)
    elif kind == "qwen2":
        conf = transformers.Qwen2Config(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie, initializer_range=INIT,
        )
        model = transformers.Qwen2ForCausalLM(conf)
    else:  # pragma: no cover
        raise ValueError(kind)
    with torch.no_grad():  # HF inits norms to 1 / biases to 0; randomise so that mistakes show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def canonical_of(model):
    """(cfg, {name: tensor}) of an in-memory HF model."""
    hf = model.config.to_dict()
    family = family_for_hf(hf)
    cfg = family.config_from_hf(hf)
    state = model.state_dict()
    return cfg, dict(hf_to_canonical(family, cfg, state.__getitem__))


def rank_logits(tp: int, pp: int, vpp, cfg, canonical, tokens):
    """On one rank: build, load, forward; the last stage's TP rank 0 returns the logits."""
    from megatron.core import parallel_state as ps

    from interop.megatron_model import build_gpt_chunks, forward_logits, load_canonical
    from interop.runtime import RuntimeConfig, distributed

    with distributed(RuntimeConfig(layout=Layout(tp=tp, pp=pp, vpp=vpp))):
        chunks = build_gpt_chunks(cfg)
        load_canonical(chunks, iter(canonical.items()), cfg)
        logits = forward_logits(chunks, tokens, cfg)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            return logits
    return None


def megatron_logits(cfg, canonical, tp=1, pp=1, vpp=None, tokens=TOKENS):
    n = tp * pp
    results = run_on_ranks(rank_logits, n, tp, pp, vpp, cfg, canonical, tokens, timeout_s=300)
    found = [r for r in results if r is not None]
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf("llama")
    cfg, canonical = canonical_of(model)
    return cfg, canonical, hf_logits(model)


def test_llama_tp1_in_process(llama):
    cfg, canonical, expected = llama
    got = megatron_logits(cfg, canonical)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_llama_tp2_pp2_gloo(llama):
    cfg, canonical, expected = llama
    got = megatron_logits(cfg, canonical, tp=2, pp=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gpt2_tied_tp2_pp2_gloo():
    model = tiny_hf("gpt2")
    cfg, canonical = canonical_of(model)
    assert "output_layer.weight" not in canonical
    got = megatron_logits(cfg, canonical, tp=2, pp=2)
    torch.testing.assert_close(got, hf_logits(model), atol=1e-5, rtol=0)


def test_llama3_rope_scaling_tp1():
    """Llama-3 RoPE scaling (HF rope_parameters -> Megatron-Core's rope_scaling with its fixed constants)."""
    import transformers

    torch.manual_seed(3)
    conf = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, initializer_range=INIT,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    )
    model = transformers.LlamaForCausalLM(conf).eval()
    cfg, canonical = canonical_of(model)
    assert cfg.rope_scaling_factor == 8.0 and cfg.rotary_base == 500000.0
    tokens = torch.randint(0, 100, (1, 32))
    expected = hf_logits(model, tokens)
    got = megatron_logits(cfg, canonical, tokens=tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    unscaled = megatron_logits(cfg.replace(rope_scaling_factor=None), canonical, tokens=tokens)
    assert (unscaled - expected).abs().max() > 1e-4  # the scaling is really exercised
