"""The fast T5 decode engine (``trainer.generate_seq2seq_fast``, CPU fp32, eager) against Transformers' own
``generate`` on the same weights: greedy over right- and left-padded uneven inputs, beam search (4 beams, length
penalty 0.6 / 1.5, early stopping on / off), for v1.0 (ReLU, tied head with output scaling) and v1.1 (gated GELU,
untied head) tiny models with perturbed norms; seeded sampling gives the Megatron-Core path's tokens. Every run
asserts that the fast engine served it, so a silent fallback fails the test."""
import functools
import itertools

import pytest

from tests.generate_helpers import ranks_or_fail
from tests.t5_helpers import GEN_DECODER_LAYERS, GEN_EOS, GEN_INPUTS, NEW, hf_generate, tiny_t5

BEAM_GRID = list(itertools.product([0.6, 1.5], [True, False]))
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, top_p_decay=0.9, top_p_bound=0.5)
CONFIGS = [("right", dict(max_new_tokens=NEW), "auto"), ("left", dict(max_new_tokens=NEW), "auto")]
CONFIGS += [("left", dict(max_new_tokens=NEW, num_beams=4, length_penalty=lp, early_stopping=es), "auto")
            for lp, es in BEAM_GRID]
CONFIGS += [("right", dict(max_new_tokens=NEW, sampling=SAMPLING, seed=7), engine) for engine in ("fast", "megatron")]


def rank_fast_generate(tp: int, version: str, configs):
    """Per (padding side, GenerationConfig kwargs, engine): our tokens, the engine that ran and why not the
    fast one; and the fast engine's run counter before and after."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests.t5_helpers import PAD, megatron_t5, pad_batch
    from trainer import generate_seq2seq, generate_seq2seq_fast
    from trainer.generate import GenerationConfig
    from trainer.generate_sampling import SamplingParams

    out = []
    with distributed(RuntimeConfig(layout=Layout(tp=tp))):
        _, cfg, model = megatron_t5(version, decoder_layers=GEN_DECODER_LAYERS)
        for side, kwargs, engine in configs:
            ids, mask = pad_batch(GEN_INPUTS, side)
            kwargs = dict(kwargs)
            sampling = SamplingParams(**kwargs.pop("sampling", {}))
            config = GenerationConfig(eos_token_ids=(GEN_EOS[version],), sampling=sampling, **kwargs)
            before = generate_seq2seq_fast.runs
            tokens = generate_seq2seq.generate_seq2seq(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                                                       decoder_start_token_id=PAD, engine=engine).tokens
            out.append((tokens, generate_seq2seq.last_engine, generate_seq2seq_fast.runs - before))
    return out


@functools.lru_cache(maxsize=None)
def _ours(version: str):
    return ranks_or_fail(rank_fast_generate, 1, 1, version, CONFIGS)[0]


@functools.lru_cache(maxsize=None)
def _hf(version: str):
    return tiny_t5(version, decoder_layers=GEN_DECODER_LAYERS)


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def version(request):
    return request.param


def _fast(result):
    tokens, engine, runs = result
    assert engine == ("fast", None) and runs == 1, f"the fast engine did not run: {engine}"
    return tokens


def test_fast_greedy_equals_transformers(version):
    ours = _ours(version)
    assert _fast(ours[0]) == hf_generate(_hf(version), GEN_EOS[version], "right")
    assert _fast(ours[1]) == hf_generate(_hf(version), GEN_EOS[version], "left")
    assert len({len(t) for t in _fast(ours[0])}) > 1  # per-sequence stopping: some rows stop early


@pytest.mark.parametrize("index", range(len(BEAM_GRID)))
def test_fast_beam_search_equals_transformers(version, index):
    lp, es = BEAM_GRID[index]
    expected = hf_generate(_hf(version), GEN_EOS[version], "left", num_beams=4, length_penalty=lp, early_stopping=es)
    assert _fast(_ours(version)[2 + index]) == expected


def test_fast_sampling_equals_megatron_path(version):
    fast, megatron = _ours(version)[-2:]
    assert megatron[1][0] == "megatron" and megatron[2] == 0
    assert _fast(fast) == megatron[0]
    assert _fast(fast) != _fast(_ours(version)[0])  # sampling, not greedy


def test_unknown_engine_is_refused():
    import torch

    from trainer.errors import TrainConfigError
    from trainer.generate import GenerationConfig
    from trainer.generate_seq2seq import generate_seq2seq

    with pytest.raises(TrainConfigError, match="engine must be one of"):
        generate_seq2seq(None, torch.ones((1, 2), dtype=torch.long), config=GenerationConfig(max_new_tokens=2),
                         vocab_size=10, engine="turbo")


def rank_compiled_vs_eager(tp: int, version: str, steps: int):
    """The engine's decode-step logits with the torch.compile'd step functions (what the CUDA graph replays on a
    GPU; fullgraph, so a graph break fails) and with the eager ones, greedy-fed for ``steps`` steps."""
    import torch

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from interop.t5.forward import megatron_masks
    from tests.t5_helpers import megatron_t5, pad_batch
    from trainer.generate_seq2seq_fast import Seq2SeqDecodeEngine

    with distributed(RuntimeConfig(layout=Layout(tp=tp))), torch.inference_mode():
        _, cfg, model = megatron_t5(version, decoder_layers=GEN_DECODER_LAYERS)
        ids, mask = pad_batch(GEN_INPUTS, "left")
        enc_mask = megatron_masks(mask)[0]
        encoder_out = model(ids, None, enc_mask, None, None, output_encoder_hidden_only=True)
        out = []
        for compile in (False, True):
            engine = Seq2SeqDecodeEngine(model, ids.size(0), ids.size(1), steps, use_graph=False, compile=compile)
            engine.load(encoder_out, enc_mask[:, 0, 0], 1)
            tokens, logits = torch.zeros(ids.size(0), dtype=torch.long), []
            for step in range(steps):
                logits.append(engine.decode(tokens, step).clone())
                tokens = logits[-1][:, : cfg.vocab_size].argmax(-1)
            out.append((engine.compiled, torch.stack(logits)))
    return out


def test_compiled_step_equals_eager_step():
    (eager_flag, eager), (compiled_flag, compiled) = ranks_or_fail(rank_compiled_vs_eager, 1, 1, "1.1", 4)[0]
    assert compiled_flag and not eager_flag  # the compiled functions ran (no fallback to the eager ones)
    assert (compiled - eager).abs().max() < 1e-4 * eager.abs().max()
