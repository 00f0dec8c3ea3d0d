"""Encoder-decoder generation (``trainer.generate_seq2seq``) over Megatron-Core's T5Model with our spec,
against Transformers' own ``generate`` on the same weights: greedy (right and left padded uneven inputs,
min_new_tokens) and beam search (4 beams, length penalty 0.6 / 1.5, early stopping on / off, two returned
sequences) token for token; seeded sampling reproducible; TP2 greedy = TP1."""
import functools
import itertools

import pytest

from tests.generate_helpers import ranks_or_fail
from tests.t5_helpers import GEN_DECODER_LAYERS, GEN_EOS, NEW, hf_generate, rank_generate, tiny_t5

BEAM_GRID = list(itertools.product([0.6, 1.5], [True, False]))
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, top_p_decay=0.9, top_p_bound=0.5)


def _configs():
    configs = [("right", dict(max_new_tokens=NEW)), ("left", dict(max_new_tokens=NEW)),
               ("right", dict(max_new_tokens=NEW, min_new_tokens=4))]
    configs += [("left", dict(max_new_tokens=NEW, num_beams=4, length_penalty=lp, early_stopping=es,
                              num_return_sequences=2)) for lp, es in BEAM_GRID]
    configs += [("right", dict(max_new_tokens=NEW, sampling=SAMPLING, seed=s)) for s in (11, 11, 12)]
    return configs


@functools.lru_cache(maxsize=None)
def _ours(version: str, tp: int = 1):
    configs = _configs() if tp == 1 else [_configs()[0], _configs()[-1]]
    return ranks_or_fail(rank_generate, tp, tp, version, configs)


@functools.lru_cache(maxsize=None)
def _hf(version: str):
    return tiny_t5(version, decoder_layers=GEN_DECODER_LAYERS)


@functools.lru_cache(maxsize=None)
def _hf_generate(version: str, side: str, **kwargs):
    return hf_generate(_hf(version), GEN_EOS[version], side, **kwargs)


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def version(request):
    return request.param


def test_greedy_equals_transformers(version):
    out = _ours(version)[0]
    assert out[0] == _hf_generate(version, "right")
    assert out[1] == _hf_generate(version, "left")
    assert len({len(t) for t in out[0]}) > 1  # some inputs stop at EOS early, others run to the limit


def test_min_new_tokens_equals_transformers(version):
    out = _ours(version)[0][2]
    assert out == _hf_generate(version, "right", min_new_tokens=4)
    assert all(len(t) >= 4 for t in out)


@pytest.mark.parametrize("index", range(len(BEAM_GRID)))
def test_beam_search_equals_transformers(version, index):
    lp, es = BEAM_GRID[index]
    expected = _hf_generate(version, "left", num_beams=4, length_penalty=lp, early_stopping=es,
                            num_return_sequences=2)
    assert _ours(version)[0][3 + index] == expected


def test_beam_grid_is_discriminating():
    """Different penalties / stopping rules give different outcomes, so a rule ignored would be caught."""
    outcomes = {str(_ours(v)[0][3 + i]) for v in ("1.0", "1.1") for i in range(len(BEAM_GRID))}
    assert len(outcomes) >= 6


def test_seeded_sampling_is_reproducible(version):
    out = _ours(version)[0]
    first, again, other = out[-3:]
    assert first == again
    assert first != other
    assert first != out[0]


def test_tp2_equals_tp1():
    tp1 = _ours("1.1")[0]
    ranks = _ours("1.1", 2)
    for rank_out in ranks:
        assert rank_out[0] == tp1[0]  # greedy
    assert ranks[0][1] == ranks[1][1]  # seeded sampling: the same tokens on every TP rank


def test_bad_inputs_are_refused_before_any_work():
    import torch

    from trainer.errors import TrainConfigError
    from trainer.generate import GenerationConfig
    from trainer.generate_seq2seq import generate_seq2seq

    config = GenerationConfig(max_new_tokens=2)
    with pytest.raises(TrainConfigError, match="at least one token"):
        generate_seq2seq(None, torch.zeros((2, 0), dtype=torch.long), config=config, vocab_size=10)
    with pytest.raises(TrainConfigError, match="does not match"):
        generate_seq2seq(None, torch.ones((2, 3), dtype=torch.long), torch.ones((2, 4)), config=config, vocab_size=10)
    with pytest.raises(TrainConfigError, match="no prompt|decoder has none"):
        generate_seq2seq(None, torch.ones((2, 3), dtype=torch.long), config=GenerationConfig(return_prompt_logits=True),
                         vocab_size=10)
