"""The fast engine's CUDA graph on a GPU (run by `make test-gpu` on the device machine): the replayed graph gives
the same tokens and logits as the same code run eagerly, as Megatron-Core's own path and as Transformers (fp32),
including a second call that reuses the captured graph with other prompts, and beam search (cache reordering
outside the graph). "fast" captures the torch.compile'd step (the default), "fast-graph" the uncompiled one."""
import functools

import pytest
import torch

from tests.generate_helpers import PROMPTS, ranks_or_fail, hf_generate, hf_left_pad, megatron_from_hf, tiny_hf

pytestmark = pytest.mark.gpu

NEW = 12
OTHER_PROMPTS = [[9, 9, 4], [30, 2, 8, 14, 15, 3, 7, 1], [5], [44, 12]]
CONFIGS = [dict(), dict(num_beams=4, length_penalty=0.6, early_stopping=True),
           dict(sampling=dict(do_sample=True, temperature=0.9, top_p=0.9), seed=7)]


def rank_graph_vs_eager(family: str):
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.generate import GenerationConfig, generate
    from trainer import generate_fast
    from trainer.generate_sampling import SamplingParams

    hf_model = tiny_hf(family)
    eos = hf_model.config.eos_token_id
    out = {}
    with distributed(RuntimeConfig(layout=Layout())):
        model, cfg = megatron_from_hf(hf_model)
        assert next(model.parameters()).is_cuda
        for engine in ("fast", "fast-graph", "fast-eager", "megatron"):
            generate_fast.COMPILE = engine == "fast"
            for index, kwargs in enumerate(CONFIGS):
                kwargs = dict(kwargs)
                sampling = SamplingParams(**kwargs.pop("sampling", {}))
                config = GenerationConfig(max_new_tokens=NEW, eos_token_ids=(eos,), sampling=sampling, **kwargs)
                for prompts_name, prompts in (("a", PROMPTS), ("b", OTHER_PROMPTS)):  # b replays a's graph
                    ids, mask = hf_left_pad(prompts)
                    res = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                                   engine="fast" if engine == "fast-graph" else engine)
                    out[prompts_name, index, engine] = res.tokens
                    if engine == "fast":
                        out[prompts_name, index, "captures"] = generate_fast.captures
                        out[prompts_name, index, "compiled"] = generate_fast.compiled_captures
        config = GenerationConfig(max_new_tokens=6, return_logits=True)
        ids, mask = hf_left_pad(PROMPTS)
        for engine in ("fast", "fast-graph", "fast-eager"):
            generate_fast.COMPILE = engine == "fast"
            res = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                           engine="fast" if engine == "fast-graph" else engine)
            out["logits", engine] = res.logits.cpu()
        generate_fast.COMPILE = True
    return out


@functools.lru_cache(maxsize=None)
def _run(family):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return ranks_or_fail(rank_graph_vs_eager, 1, family)[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_graph_equals_eager_and_megatron(family):
    out = _run(family)
    for index in range(len(CONFIGS)):
        assert out["a", index, "captures"] == out["b", index, "captures"] >= 1  # b replays a's graph
        assert out["a", index, "compiled"] == out["b", index, "compiled"] >= index + 1  # compiled, not fallen back
        for prompts_name in ("a", "b"):
            assert out[prompts_name, index, "fast"] == out[prompts_name, index, "fast-eager"]
            assert out[prompts_name, index, "fast-graph"] == out[prompts_name, index, "fast-eager"]
            assert out[prompts_name, index, "fast"] == out[prompts_name, index, "megatron"]
    torch.testing.assert_close(out["logits", "fast"], out["logits", "fast-eager"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["logits", "fast-graph"], out["logits", "fast-eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_graph_equals_transformers(family):
    out = _run(family)
    hf = tiny_hf(family)
    assert out["a", 0, "fast"] == hf_generate(hf, PROMPTS, max_new_tokens=NEW)
    assert out["b", 0, "fast"] == hf_generate(hf, OTHER_PROMPTS, max_new_tokens=NEW)
    assert out["a", 1, "fast"] == hf_generate(hf, PROMPTS, max_new_tokens=NEW, **CONFIGS[1])
