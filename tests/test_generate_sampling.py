"""Step filters against Transformers' own logits warpers; decay schedule; seeded sampling."""
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trainer.errors import TrainConfigError
from trainer.generate_sampling import SamplingParams, choose_tokens, decayed_top_p, filter_logits


def _hf(logits, temperature, top_k, top_p):
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(torch.zeros(logits.size(0), 1, dtype=torch.long), logits.clone())


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (0.8, 20, 0.9), (1.3, 3, 0.5), (0.5, 0, 0.05),
     (1.0, 1, 1.0), (2.0, 200, 0.999)],
)
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    logits = torch.randn(16, 100, generator=gen) * 3
    logits[0, :10] = 1.5  # ties at the top-k threshold and inside the nucleus
    ours = filter_logits(logits, temperature, top_k, top_p)
    theirs = _hf(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours, theirs)


def test_filters_actually_filter():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    kept = ~torch.isinf(filter_logits(logits, 1.0, 7, 1.0))
    assert kept.sum(-1).tolist() == [7] * 4
    kept = ~torch.isinf(filter_logits(logits, 1.0, 7, 0.3))
    assert (kept.sum(-1) < 7).all() and (kept.sum(-1) >= 1).all()


def test_top_p_decay_is_floored():
    p, seen = 0.9, []
    for _ in range(6):
        p = decayed_top_p(p, 0.5, 0.2)
        seen.append(round(p, 6))
    assert seen == [0.45, 0.225, 0.2, 0.2, 0.2, 0.2]
    assert decayed_top_p(0.9, 1.0, 0.5) == 0.9


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=10, top_p=0.95)
    a = [choose_tokens(logits, params, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = torch.stack([choose_tokens(logits, params, generator=torch.Generator().manual_seed(s)) for s in range(30)])
    allowed = ~torch.isinf(filter_logits(logits, 0.9, 10, 0.95))
    assert allowed.gather(1, draws.T).all()
    assert len({tuple(d.tolist()) for d in draws}) > 1  # it does sample
    assert torch.equal(choose_tokens(logits, SamplingParams()), logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p_decay=1.5)])
def test_bad_params_are_one_line_errors(kwargs):
    with pytest.raises(TrainConfigError):
        SamplingParams(**kwargs)
