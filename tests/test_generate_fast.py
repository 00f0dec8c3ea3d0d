"""The fast decode engine (``trainer.generate_fast``, eager on CPU) against Megatron-Core's own path and against
Transformers' ``generate``: same tiny random weights, uneven left-padded prompts, greedy / beam 4 / seeded
sampling, GPT-2 and Llama GQA (plus Qwen2 MQA with QKV bias and Llama-3 RoPE scaling), fp32."""
import functools

import pytest
import torch

from tests.generate_helpers import PROMPTS, ranks_or_fail, hf_generate, hf_left_pad, megatron_from_hf, tiny_hf

NEW = 10
BEAMS = [dict(num_beams=4, length_penalty=0.6, early_stopping=True, num_return_sequences=2),
         dict(num_beams=4, length_penalty=1.5, early_stopping=False)]
CONFIGS = [dict(), *BEAMS,  # min_new_tokens: test_generate_hf checks it through engine="auto"
           dict(sampling=dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9), seed=5)]
VARIANT_CONFIGS = [dict(), BEAMS[0]]
VARIANTS = {  # extra Llama-family shapes: MQA + QKV bias (Qwen2-like), Llama-3 RoPE scaling
    "qwen2_mqa": dict(num_key_value_heads=1),  # Qwen2: QKV bias
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0,
                                                               original_max_position_embeddings=8192)),
}


#: GPT-2 with the trainer's Triton norm modules (``norm_kernel``, on by default in 16-bit GPU training; their CPU
#: forward here is torch's): the engine must take these subclasses as the torch norms they are
TRITON_NORMS = "gpt2_triton_norms"


def tiny_variant(name: str):
    """``tiny_hf`` families, or a Llama variant of it rebuilt with the same seed and the extra config fields."""
    if name in ("gpt2", "llama", TRITON_NORMS):
        return tiny_hf(name.split("_")[0])
    import transformers

    base = tiny_hf("llama").config.to_dict()
    base.update(VARIANTS[name])
    qwen = name.startswith("qwen2")
    for key in ("model_type", "architectures") if qwen else ():
        base.pop(key, None)
    cfg = (transformers.Qwen2Config if qwen else transformers.LlamaConfig)(**base)
    torch.manual_seed(1)
    model = (transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM)(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def _use_triton_norms(model) -> None:
    """Every LayerNorm of a GPT-2 ``GPTModel`` replaced by the trainer's ``TritonLayerNorm`` with its parameters
    (how the trainer's spec builds them where ``norm_kernel`` is on)."""
    from trainer.kernels.norm import TritonLayerNorm

    def swap(owner, attr):
        old = getattr(owner, attr)
        new = TritonLayerNorm(old.normalized_shape, eps=old.eps)
        new.load_state_dict(old.state_dict())
        setattr(owner, attr, new)

    for layer in model.decoder.layers:
        swap(layer, "input_layernorm")
        swap(layer, "pre_mlp_layernorm")
    swap(model.decoder, "final_layernorm")


def rank_all(names):
    """Every model in one launch (process start-up dominates tiny models)."""
    return {name: rank_both_engines(name, CONFIGS if name in ("gpt2", "llama") else VARIANT_CONFIGS)
            for name in names}


def rank_both_engines(name: str, configs):
    """Per config: tokens from engine="megatron" and engine="fast"; plus greedy logits of both; plus checks
    that the engine shares the model's parameters (an in-place weight change changes its output)."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.errors import TrainConfigError
    from trainer.generate import GenerationConfig, generate
    from trainer.generate_fast import _ENGINES, release, unsupported_reason
    from trainer.generate_sampling import SamplingParams

    hf_model = tiny_variant(name)
    eos = hf_model.config.eos_token_id
    out = {"megatron": [], "fast": []}
    with distributed(RuntimeConfig(layout=Layout())):
        model, cfg = megatron_from_hf(hf_model)
        if name == TRITON_NORMS:
            _use_triton_norms(model)
        out["norm_type"] = type(model.decoder.layers[0].input_layernorm).__name__
        out["unsupported"] = unsupported_reason(model)
        ids, mask = hf_left_pad(PROMPTS)

        def run(engine, max_new_tokens=NEW, **kwargs):
            kwargs = dict(kwargs)
            sampling = SamplingParams(**kwargs.pop("sampling", {}))
            config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(eos,), sampling=sampling, **kwargs)
            return generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size, engine=engine)

        for kwargs in configs:
            for engine in ("megatron", "fast"):
                out[engine].append(run(engine, **kwargs).tokens)
        for engine in ("megatron", "fast"):
            res = run(engine, max_new_tokens=6, return_logits=True, return_logprobs=True, return_prompt_logits=True)
            out[f"{engine}_logits"] = (res.logits, res.logprobs, res.prompt_logits)
        if name != "llama":
            return out
        engine = _ENGINES[model]
        out["shares_params"] = all(any(p is q for q in engine.params) for p in model.parameters())
        before = run("fast", max_new_tokens=4).tokens
        out["engine_reused"] = _ENGINES[model] is engine
        with torch.no_grad():
            model.embedding.word_embeddings.weight[:, :8].mul_(-3.0)  # in place: the engine must see it
        out["after_edit"] = (before, run("fast", max_new_tokens=4).tokens, run("megatron", max_new_tokens=4).tokens)
        out["released"] = (release(model), model in _ENGINES, release(model))
        try:
            run("bogus")
            out["bad_engine"] = None
        except TrainConfigError as exc:
            out["bad_engine"] = str(exc)
    return out


NAMES = ["gpt2", "llama", *VARIANTS, TRITON_NORMS]


@functools.lru_cache(maxsize=None)
def _run_all():
    return ranks_or_fail(rank_all, 1, NAMES)[0]


def _run(name):
    return _run_all()[name]


@pytest.mark.parametrize("name", NAMES)
def test_fast_engine_equals_megatron_core(name):
    out = _run(name)
    assert out["norm_type"] == ("TritonLayerNorm" if name == TRITON_NORMS else "LayerNorm" if name == "gpt2"
                                else "RMSNorm")
    assert out["unsupported"] is None
    assert out["fast"] == out["megatron"]


@pytest.mark.parametrize("name", NAMES)
def test_fast_engine_equals_transformers(name):
    out = _run(name)
    hf = tiny_variant(name)
    configs = CONFIGS if name in ("gpt2", "llama") else VARIANT_CONFIGS
    for kwargs, tokens in zip(configs, out["fast"]):
        if "sampling" not in kwargs:
            assert tokens == hf_generate(hf, PROMPTS, max_new_tokens=NEW, **kwargs), kwargs


@pytest.mark.parametrize("name", NAMES)
def test_fast_engine_logits_equal_megatron_core(name):
    out = _run(name)
    (m_logits, m_lp, m_prompt), (f_logits, f_lp, f_prompt) = out["megatron_logits"], out["fast_logits"]
    torch.testing.assert_close(f_logits, m_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(f_lp, m_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
    real = hf_left_pad(PROMPTS)[1].bool()
    torch.testing.assert_close(f_prompt[real], m_prompt[real], rtol=1e-4, atol=1e-4)


def test_fast_engine_reads_the_models_own_parameters():
    out = _run("llama")
    assert out["shares_params"] and out["engine_reused"]
    before, fast_after, megatron_after = out["after_edit"]
    assert fast_after == megatron_after
    assert fast_after != before  # the edit mattered, and the cached engine saw it
    assert "engine must be one of" in out["bad_engine"]
    assert out["released"] == (True, False, False)


def rank_compiled_step(name: str):
    """Decode-step logits of the compiled step (inductor on CPU, no CUDA graph), of the uncompiled step and of
    an engine whose compiled functions fail at run time (must warn once and fall back), each from its own
    engine over the same model, for three steps after the prompt."""
    import time
    import warnings

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer import generate_fast
    from trainer.generate_fast import DecodeEngine

    def broken(*_):
        raise RuntimeError("simulated compiler failure")

    with distributed(RuntimeConfig(layout=Layout())):
        model, _ = megatron_from_hf(tiny_variant(name))
        ids, mask = hf_left_pad(PROMPTS)
        key_pad = mask == 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = {}
        real = generate_fast.compiled_step_functions
        for compile in (False, True, "broken"):
            if compile == "broken":
                generate_fast.compiled_step_functions = lambda *_: (broken, broken, broken)
            engine = DecodeEngine(model, ids.size(0), ids.size(1) + 4, use_graph=False, compile=bool(compile))
            start = time.perf_counter()
            with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                steps = [engine.prefill(ids, positions, key_pad, False)[:, 0]]
                for step in range(3):
                    tokens = steps[-1].argmax(-1)
                    steps.append(engine.decode(tokens, positions[:, -1] + 1 + step, ids.size(1) + step, key_pad))
            out[compile] = (torch.stack(steps[1:]), engine.compiled, time.perf_counter() - start,
                            [str(w.message) for w in caught if "torch.compile" in str(w.message)])
        generate_fast.compiled_step_functions = real
        from torch._dynamo.utils import counters

        out["graphs"] = counters["stats"]["unique_graphs"]  # one per compiled function, not one per layer
        out["layers"] = len(model.decoder.layers)
        return out


@functools.lru_cache(maxsize=None)
def _compiled(name):
    return ranks_or_fail(rank_compiled_step, 1, name)[0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compiled_decode_step_equals_uncompiled(name):
    out = _compiled(name)
    compiled_logits, compiled, _, compiled_warnings = out[True]
    eager_logits, eager_compiled, _, _ = out[False]
    assert compiled and not eager_compiled and not compiled_warnings  # really compiled (no silent fallback)
    assert out["layers"] >= 2 and out["graphs"] == 3  # shared by every layer: compile time does not grow with depth
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_compile_failure_falls_back_once_with_a_warning():
    out = _compiled("gpt2")
    logits, compiled, _, caught = out["broken"]
    assert not compiled
    assert len(caught) == 1 and "simulated compiler failure" in caught[0]
    torch.testing.assert_close(logits, out[False][0], rtol=0, atol=0)
