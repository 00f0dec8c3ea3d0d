"""Generation over Megatron-Core models against Transformers' own ``generate`` (same weights, converted with
the project's converter), for a batch of uneven, left-padded prompts; TP2 / PP2 against TP1."""
import functools
import itertools

import pytest
import torch

from interop.launch import run_on_ranks
from tests.generate_helpers import PROMPTS, ranks_or_fail, hf_generate, rank_gather_dp, rank_generate, rank_generate_logits, tiny_hf

NEW = 12
BEAM_GRID = list(itertools.product([0.6, 1.5], [True, False]))
DECAY_TO_GREEDY = dict(do_sample=True, temperature=1.5, top_p=0.999, top_p_decay=0.01, top_p_bound=1e-6)
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, top_p_decay=0.9, top_p_bound=0.5)


def _configs():
    configs = [dict(max_new_tokens=NEW), dict(max_new_tokens=NEW, min_new_tokens=6)]
    configs += [
        dict(max_new_tokens=NEW, num_beams=4, length_penalty=lp, early_stopping=es, num_return_sequences=2)
        for lp, es in BEAM_GRID
    ]
    configs.append(dict(max_new_tokens=NEW, sampling=DECAY_TO_GREEDY, seed=3))
    configs += [dict(max_new_tokens=NEW, sampling=SAMPLING, seed=s) for s in (11, 11, 12)]
    return configs


@functools.lru_cache(maxsize=None)
def _single_rank(family):
    """All configs at TP1/PP1, one launch per family for the whole module."""
    out = ranks_or_fail(rank_generate, 1, family, 1, 1, PROMPTS, _configs())[0]
    return family, tiny_hf(family), out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_run(request):
    return _single_rank(request.param)


def test_greedy_equals_transformers(family_run):
    family, hf, out = family_run
    expected = hf_generate(hf, PROMPTS, max_new_tokens=NEW)
    assert out[0] == expected
    assert len({len(t) for t in expected}) > 1 or family == "llama"  # some prompts stop at EOS early


def test_min_new_tokens_equals_transformers(family_run):
    family, hf, out = family_run
    assert out[1] == hf_generate(hf, PROMPTS, max_new_tokens=NEW, min_new_tokens=6)
    assert all(len(t) >= 6 for t in out[1])


@functools.lru_cache(maxsize=None)
def _hf_beam(family, index):
    lp, es = BEAM_GRID[index]
    return hf_generate(tiny_hf(family), PROMPTS, max_new_tokens=NEW, num_beams=4, length_penalty=lp,
                       early_stopping=es, num_return_sequences=2)


@pytest.mark.parametrize("index", range(len(BEAM_GRID)))
def test_beam_search_equals_transformers(family_run, index):
    family, _, out = family_run
    assert out[2 + index] == _hf_beam(family, index)


def test_beam_grid_is_discriminating():
    """The grid must produce different outcomes, else the comparisons above could not catch a wrong rule
    (length penalty or early stopping ignored)."""
    assert len({str(_hf_beam("gpt2", i)) for i in range(len(BEAM_GRID))}) >= 3


def test_seeded_sampling_is_reproducible(family_run):
    family, hf, out = family_run
    first, again, other = out[-3:]
    assert first == again
    assert first != other
    assert first != out[0]  # it did not fall back to greedy


def test_top_p_decay_narrows_the_nucleus_each_token(family_run):
    """p = 0.999 for the first token, then 0.00999 (< any top probability): every later token must be the
    argmax of Transformers' logits for the sampled prefix, while the first token is a real sample."""
    family, hf, out = family_run
    from tests.generate_helpers import hf_left_pad

    sampled = out[2 + len(BEAM_GRID)]
    ids, mask = hf_left_pad([p + s for p, s in zip(PROMPTS, sampled)])
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    pad = ids.size(1) - torch.tensor([len(p) + len(s) for p, s in zip(PROMPTS, sampled)])
    for row, (prompt, tokens) in enumerate(zip(PROMPTS, sampled)):
        start = int(pad[row]) + len(prompt)
        greedy_next = logits[row, start:start + len(tokens) - 1].argmax(-1).tolist()
        assert tokens[1:] == greedy_next
    assert [t[0] for t in sampled] != [t[0] for t in out[0]]  # the first token was sampled (T = 1.5)


def test_logits_and_logprobs_equal_transformers():
    tokens, logits, logprobs, prompt_logits = run_on_ranks(rank_generate_logits, 1, "llama", PROMPTS, 6)[0]
    hf = tiny_hf("llama")
    from tests.generate_helpers import hf_left_pad

    ids, mask = hf_left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref_logits = torch.stack(ref.logits, dim=1)
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    lp = torch.log_softmax(ref_logits, -1).gather(-1, ref.sequences[:, ids.size(1):, None])[..., 0]
    for row, expected in zip(logprobs, lp):
        torch.testing.assert_close(torch.tensor(row), expected[: len(row)], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref_prompt = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()  # padded positions carry no meaning on either side
    torch.testing.assert_close(prompt_logits[real], ref_prompt[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,tp,pp", [("llama", 2, 1), ("gpt2", 1, 2)])
def test_model_parallel_equals_tp1(family, tp, pp):
    _, _, single = _single_rank(family)
    beam = BEAM_GRID.index((1.5, True))
    configs = [_configs()[0], _configs()[2 + beam]]
    outs = ranks_or_fail(rank_generate, tp * pp, family, tp, pp, PROMPTS, configs)
    assert outs[0] == [single[0], single[2 + beam]]
    assert all(o == outs[0] for o in outs)  # every rank returns the same tokens


def test_gather_across_data_parallel():
    outs = run_on_ranks(rank_gather_dp, 2, [2, 3])
    expected = torch.tensor([0.0] * 2 + [1.0] * 3)[:, None].expand(5, 3)
    for out in outs:
        assert torch.equal(out, expected)
